"""Validate in chunks on a worker pool gives the outputs of one pass over the whole data.

The same folder goes through the stage twice: once as one chunk in this process, once cut into chunks of a
few KB (JSONL at line ends, Parquet at row groups) checked by two worker processes. Records, rejects, the
profile and every count of the report must be the same: dedup across chunks and files, the train/eval split
(including the rule that gives a small kind one eval record), ids and reasons do not depend on the chunks.
"""

from __future__ import annotations

import json
import random

import pytest

from tunepath.records import read_records, record_files
from tunepath.sections import DataConfig
from tunepath.validate import LengthBounds, ValidateConfig, run_validate
from tunepath.validate import parts, stream


def _chat(rng: random.Random, i: int) -> dict:
    messages = [{"role": "system", "content": "Be brief."}] if i % 3 == 0 else []
    for turn in range(rng.randint(1, 3)):
        messages += [{"role": "user", "content": f"question {i}.{turn} " + "word " * rng.randint(1, 20)},
                     {"role": "assistant", "content": "answer " * rng.randint(2, 30)}]
    return {"messages": messages}


@pytest.fixture(scope="module")
def raw(tmp_path_factory):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = random.Random(5)
    root = tmp_path_factory.mktemp("raw")
    chats = [json.dumps(_chat(rng, i)) for i in range(400)]
    bad = ['{"messages": [{"role": "user", "content": "cut', '[1, 2]',
           json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": " "}]})]
    lines = chats[:250] + bad + chats[:5] + chats[250:]  # duplicates of earlier lines, some chunks later
    (root / "a.jsonl").write_text("\n".join(lines) + "\n\n", encoding="utf-8")
    (root / "b.jsonl").write_text("\n".join(chats[100:130] + [chats[399]]) + "\n", encoding="utf-8")  # dups across files
    pairs = [{"prompt": f"pick {i}", "chosen": "the good answer here", "rejected": "a worse one"} for i in range(3)]
    (root / "c_pairs.jsonl").write_text("\n".join(map(json.dumps, pairs)) + "\n", encoding="utf-8")
    texts = [{"text": f"Document {i}. " + ("A document about things. " * rng.randint(5, 40)).strip()} for i in range(60)]
    texts.append({"text": "Long paragraph text. " * 4000})  # cut into pieces for CPT
    pq.write_table(pa.Table.from_pylist(texts + texts[:3]), root / "d_docs.parquet", row_group_size=6)
    (root / "e.csv").write_text("instruction,output\nsay hi,hello there friend\nsay bye,goodbye for now\n", encoding="utf-8")
    (root / "f_empty.jsonl").write_text("", encoding="utf-8")
    notes = "\n\n".join(f"Note number {i} about the data set{'.' * (i % 7)}" for i in range(500))
    (root / "g_notes.txt").write_text(notes + "\n\n" + notes[:2000] + "\n", encoding="utf-8")  # 20 KB, some repeated
    return root


def _outputs(out):
    report = json.loads((out / "report.json").read_text())
    for key in ("timings_s", "cpu_s", "streaming"):
        report.pop(key)
    records = [line for path in record_files(out) for line in path.read_text(encoding="utf-8").splitlines()]
    return {"records": records, "rejects": (out / "rejects.jsonl").read_text(encoding="utf-8"), "report": report,
            "profile": json.loads((out / "profile.json").read_text()), "md": (out / "report.md").read_text()}


@pytest.fixture(scope="module")
def both(raw, tmp_path_factory):
    cfg = ValidateConfig(max_reject_share=0.5, eval_share=0.02, seed=3, text_chars=LengthBounds(min=20, max=20_000))
    whole = tmp_path_factory.mktemp("whole")
    run_validate(cfg, raw, whole, data=DataConfig(num_proc=1))
    chunked = tmp_path_factory.mktemp("chunked")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(stream, "CHUNK_BYTES", 16_000)
        mp.setattr(stream, "PARQUET_GROUP_BYTES", 20_000)
        mp.setattr(parts, "SHARD_BYTES", 20_000)
        mp.setattr(stream, "WORKER_BASE", 1)  # the memory rule would otherwise allow one worker for these chunks
        mp.setattr(stream, "WORKER_EXPANSION", 1)
        summary = run_validate(cfg, raw, chunked, data=DataConfig(num_proc=2))
    return _outputs(whole), _outputs(chunked), summary, json.loads((chunked / "report.json").read_text()), chunked


def test_chunks_on_a_pool_give_the_outputs_of_one_pass(both):
    whole, chunked, summary, report, _ = both
    assert report["streaming"]["chunks"] > 6 and report["streaming"]["workers"] == 2
    assert len(report["streaming"]["records_shards"]) > 1
    assert chunked["records"] == whole["records"]
    assert chunked["rejects"] == whole["rejects"]
    assert chunked["profile"] == whole["profile"]
    assert chunked["report"] == whole["report"]
    assert chunked["md"] == whole["md"]


def test_counts_add_up_and_duplicates_point_at_the_first_row(both):
    whole, _, summary, report, out = both
    totals = report["totals"]
    assert totals["read"] == totals["accepted"] + totals["rejected"] == sum(f["read"] for f in report["files"].values())
    assert totals["read"] == 400 + 3 + 5 + 31 + 3 + 64 + 2 + 500 + 54
    rejects = [json.loads(line) for line in whole["rejects"].splitlines()]
    assert len(rejects) == totals["rejected"]
    duplicates = {(r["source"]["file"].rsplit("/", 1)[-1], r["source"]["line"]): r["reasons"] for r in rejects
                  if any(x.startswith("duplicate:") for x in r["reasons"])}
    # a.jsonl lines 254-258 repeat lines 1-5; b.jsonl repeats a.jsonl's rows 100-129 and the last one
    assert duplicates[("a.jsonl", 254)] == [f"duplicate: same content as {rejects[0]['source']['file'].rsplit('/', 1)[0]}/a.jsonl:1"]
    assert sum(1 for f, _ in duplicates if f == "b.jsonl") == 31
    assert sum(1 for f, _ in duplicates if f == "d_docs.parquet") == 3
    assert report["files"][next(n for n in report["files"] if n.endswith("f_empty.jsonl"))]["read"] == 0


def test_small_kind_gets_its_eval_record_across_chunks(both):
    whole, _, _, report, out = both
    pairs = [r for r in read_records(out, kind="preference")]
    assert len(pairs) == 3 and sum(r["split"] == "eval" for r in pairs) == 1  # eval_share 0.02 alone gives none
    assert report["kinds"]["preference"] == {"accepted": 3, "rejected": 0, "train": 2, "eval": 1}
    assert report["streaming"]["moved_for_split"] == [{"kind": "preference", "to": "eval"}] or \
        any(m["kind"] == "preference" for m in report["streaming"]["moved_for_split"])
    pieces = [r for r in read_records(out, kind="text") if "chunk" in r["source"]]
    assert len(pieces) > 1 and len({r["split"] for r in pieces}) == 1  # a cut document stays on one side


def test_the_worker_pool_is_bounded_by_the_memory_budget():
    many = DataConfig(num_proc=64)
    assert stream.workers_for(many, 1 << 30) == 1
    assert stream.workers_for(many, 64 << 30) > 4
    assert stream.workers_for(many, 64 << 30, chunks_hint=3) == 3
    assert stream.workers_for(DataConfig(num_proc=2), 64 << 30) == 2


def test_record_files_name_the_missing_records(tmp_path):
    (tmp_path / "records.jsonl").write_text("{}\n")
    with pytest.raises(FileNotFoundError, match="older version"):
        record_files(tmp_path)
    assert record_files(tmp_path / "records.jsonl") == [tmp_path / "records.jsonl"]


@pytest.mark.parametrize("chunk_bytes", [1, 7, 50, 1000])
def test_text_cut_at_blank_lines_reads_as_one_pass(tmp_path, chunk_bytes):
    from tunepath.validate.readers import read_rows, read_text_range

    rng = random.Random(chunk_bytes)
    parts = ["\ufeffFirst block\nstill first"]
    for i in range(60):
        parts.append(rng.choice(["\n\n", "\n \t\n", "\r\n\r\n", "\n\n\n   ", "\n\u2028\n\n", "\n  \n\t\n  "]))
        parts.append(rng.choice([f"block {i}", f"block {i}\nline two", f"  indented {i}", f"crlf {i}\r\nnext", f"\u00e9t\u00e9 {i}"]))
    path = tmp_path / "notes.txt"
    path.write_bytes("".join(parts).encode("utf-8") + b"\xff tail")  # an invalid byte in the last block
    whole = [(r.line, r.raw, r.reasons) for r in read_rows(path, "notes.txt")]
    cut = []
    for start, end, line in stream.plan_text(path, chunk_bytes):
        cut += [(r.line, r.raw, r.reasons) for r in read_text_range(path, "notes.txt", start, end, line, "blank_line")]
    assert len(whole) > 40 and cut == whole
