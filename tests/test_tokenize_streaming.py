"""Bounded memory in tokenize: records read in blocks, SFT packed per window, CPT cut per chunk, cached outputs linked."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from test_tokenize_helpers import CONVERSATIONS, chatml_model, write_records  # noqa: F401

from tunepath.sections import ModelConfig
from tunepath.tokenize import TokenizeConfig, run_tokenize
from tunepath.tokenize import stage as stage_module
from tunepath.tokenize.cpt import IGNORE_INDEX, BlockCutter, cut_blocks


def _reference_blocks(docs: list[list[int]], length: int, remainder: str, isolate: bool, pad: int) -> list[dict]:
    """The cut written plainly, one token at a time."""
    flat, positions, in_block = [], [], 0
    for doc in docs:
        for k, token in enumerate(doc):
            in_block = len(flat) % length
            positions.append(min(k, in_block) if isolate else in_block)
            flat.append(token)
    rows = [{"input_ids": flat[i:i + length], "labels": flat[i:i + length], "position_ids": positions[i:i + length]}
            for i in range(0, len(flat), length)]
    if rows and len(rows[-1]["input_ids"]) < length:
        if remainder == "drop":
            rows.pop()
        elif remainder == "pad":
            short = length - len(rows[-1]["input_ids"])
            rows[-1] = {"input_ids": rows[-1]["input_ids"] + [pad] * short, "labels": rows[-1]["labels"] + [IGNORE_INDEX] * short,
                        "position_ids": rows[-1]["position_ids"] + list(range(short))}
    return rows


@settings(max_examples=150, deadline=None)
@given(
    st.lists(st.lists(st.integers(0, 999), min_size=1, max_size=30), max_size=25),
    st.integers(2, 12),
    st.sampled_from(["drop", "pad", "keep"]),
    st.booleans(),
    st.lists(st.integers(0, 25), max_size=6),
)
def test_blocks_are_the_same_however_the_documents_are_chunked(docs, length, remainder, isolate, cuts):
    expected = _reference_blocks(docs, length, remainder, isolate, pad=7)
    column = pa.array(docs, type=pa.list_(pa.int32()))
    assert cut_blocks(column, length, remainder, isolate, 7).table.to_pylist() == expected
    cutter = BlockCutter(length, remainder, isolate, 7)
    bounds = [0, *sorted(c for c in cuts if c <= len(docs)), len(docs)]
    parts = [cutter.add(column.slice(lo, hi - lo)) for lo, hi in zip(bounds, bounds[1:])] + [cutter.finish()]
    rows = [r for t in parts if t is not None for r in t.to_pylist()]
    assert rows == expected
    assert cutter.tokens + cutter.dropped_tokens == sum(map(len, docs))
    assert all(t.schema.field("input_ids").type == pa.list_(pa.int32()) for t in parts if t is not None)


def test_windows_cover_every_sample_once():
    lengths = np.array([5, 1, 9, 3, 3, 20, 2])
    windows = list(stage_module._windows(lengths, 10))
    assert [i for lo, hi in windows for i in range(lo, hi)] == list(range(len(lengths)))
    assert windows == [(0, 2), (2, 3), (3, 5), (5, 6), (6, 7)]  # each at most 10 tokens, or one sample longer than that


def test_records_read_in_small_blocks_match_one_read(tmp_path):
    import pyarrow.json as pj

    records = [{"kind": "conversation", "split": "eval" if i % 3 == 0 else "train", "messages": m} for i, m in enumerate(CONVERSATIONS * 4)]
    records += [{"kind": "text", "split": "train", "text": f"document {i} " * (i + 1)} for i in range(9)]
    write_records(tmp_path / "v", records)
    path = tmp_path / "v" / "records" / "records-00000.jsonl"
    blocks = stage_module._Records([path], tmp_path / "split", block_bytes=300)  # a few records per block
    whole = pj.read_json(path, parse_options=pj.ParseOptions(explicit_schema=stage_module._records_schema(), unexpected_field_behavior="ignore"))
    for kind, split in [("conversation", "train"), ("conversation", "eval"), ("text", "train")]:
        shards = blocks.get(kind, split)
        assert [s["offset"] for s in shards] == [sum(s["rows"] for s in shards[:i]) for i in range(len(shards))]
        got = pa.concat_tables([pa.ipc.open_stream(pa.memory_map(str(s["path"]))).read_all() for s in shards])
        want = [r for r in whole.to_pylist() if r["kind"] == kind and r["split"] == split]
        assert got.num_rows == len(want)
        for name in got.column_names:
            if name == "messages":  # narrowed to the fields some message sets
                assert got[name].to_pylist() == [[{k: m[k] for k in ("role", "content")} for m in r[name]] for r in want]
            else:
                assert got[name].to_pylist() == [r[name] for r in want]
    assert blocks.get("preference", "train") == []
    assert blocks.source("conversation", "eval", 1) == {"file": "t.jsonl", "line": 4, "chunk": None}


def _records(n: int) -> list[dict]:
    out = []
    for i in range(n):
        base = CONVERSATIONS[i % len(CONVERSATIONS)]
        messages = [{**m, "content": m["content"] * (1 + i % 4)} if m["role"] == "assistant" else m for m in base]
        out.append({"kind": "conversation", "split": "train", "messages": messages})
    return out + [{"kind": "text", "split": "train", "text": f"Paris is the capital of France, fact {i}. " * (1 + i % 5)} for i in range(40)]


def _load(path):
    from datasets import load_from_disk

    return load_from_disk(str(path))


def test_windowed_packing_and_chunked_blocks_keep_every_token(chatml_model, tmp_path, monkeypatch):
    validate = write_records(tmp_path / "v", _records(120))
    cfg = TokenizeConfig(max_length=64, cache_dir=str(tmp_path / "cache"))
    run_tokenize(cfg, ModelConfig(base=str(chatml_model)), validate, tmp_path / "whole")
    whole = json.loads((tmp_path / "whole" / "stats.json").read_text())

    monkeypatch.setattr(stage_module, "PACK_WINDOW_TOKENS", 600)
    monkeypatch.setattr(stage_module, "BYTES_PER_CPT_TOKEN", 1 << 30)  # chunks of one document
    run_tokenize(cfg.model_copy(update={"cache_dir": str(tmp_path / "cache-2")}), ModelConfig(base=str(chatml_model)), validate, tmp_path / "windows")
    windows = json.loads((tmp_path / "windows" / "stats.json").read_text())

    sft, sft_whole = windows["sft"]["train"], whole["sft"]["train"]
    assert sft_whole["pack_windows"] == 1 and sft["pack_windows"] > 3
    assert (sft["tokens"], sft["label_tokens"], sft["samples_out"]) == (sft_whole["tokens"], sft_whole["label_tokens"], sft_whole["samples_out"])
    assert sft["padding_share_packed"] >= sft_whole["padding_share_packed"]
    rows, rows_whole = _load(tmp_path / "windows" / "sft" / "train"), _load(tmp_path / "whole" / "sft" / "train")
    assert all(len(r) <= 64 for r in rows["input_ids"])

    def samples(dataset):  # each row split back into its samples at the position-id restarts
        out = []
        for ids, positions in zip(dataset["input_ids"], dataset["position_ids"]):
            starts = [i for i, p in enumerate(positions) if p == 0] + [len(ids)]
            out += [tuple(ids[a:b]) for a, b in zip(starts, starts[1:])]
        return sorted(out)

    assert samples(rows) == samples(rows_whole)
    # CPT blocks do not depend on the chunking at all.
    assert _load(tmp_path / "windows" / "cpt" / "train").to_dict() == _load(tmp_path / "whole" / "cpt" / "train").to_dict()
    assert windows["cpt"]["train"] == whole["cpt"]["train"]


def test_cached_rerun_links_outputs_without_repacking(chatml_model, tmp_path):
    validate = write_records(tmp_path / "v", _records(30))
    cfg = TokenizeConfig(max_length=64, cache_dir=str(tmp_path / "cache"))
    first = run_tokenize(cfg, ModelConfig(base=str(chatml_model)), validate, tmp_path / "out")
    before = _load(tmp_path / "out" / "sft" / "train").to_dict()
    second = run_tokenize(cfg, ModelConfig(base=str(chatml_model)), validate, tmp_path / "out")
    assert not first["cached"] and second["cached"]
    assert not any(k.endswith(("/tokenize", "/pack_and_write")) for k in second["timings"])
    assert _load(tmp_path / "out" / "sft" / "train").to_dict() == before
    shard = next((tmp_path / "out" / "sft" / "train").glob("data-*.arrow"))
    assert shard.stat().st_nlink == 2  # the output and the cache share one copy on disk
    assert json.loads((tmp_path / "out" / "stats.json").read_text())["sft"]["train"]["samples_out"] == 30
    # A changed packing setting repacks (from the cached token ids).
    third = run_tokenize(cfg.model_copy(update={"pack": False}), ModelConfig(base=str(chatml_model)), validate, tmp_path / "out")
    assert third["cached"]  # the token ids came from the cache...
    assert len(before["input_ids"]) < 30 == len(_load(tmp_path / "out" / "sft" / "train"))  # ...and the rows were rebuilt unpacked


@pytest.mark.parametrize("rows", [1, 7])
def test_shards_load_as_one_dataset(tmp_path, rows):
    from tunepath.tokenize.shards import ShardWriter

    writer = ShardWriter(tmp_path / "d", "f" * 32, shard_bytes=1)  # a new shard per write
    for i in range(rows):
        writer.write(pa.table({"input_ids": pa.array([[i, i + 1]], type=pa.list_(pa.int32()))}))
    assert writer.close() == rows
    assert sorted(p.name for p in (tmp_path / "d").glob("*.arrow")) == [f"data-{i:05d}-of-{rows:05d}.arrow" for i in range(rows)]
    assert _load(tmp_path / "d")["input_ids"] == [[i, i + 1] for i in range(rows)]


def test_progress_lines_give_rate_share_and_time_left(caplog):
    import logging

    from tunepath.progress import DataPass

    now = [0.0]
    progress = DataPass(logging.getLogger("t"), "validate: read", total_bytes=4_000_000, every_s=10, clock=lambda: now[0])
    with caplog.at_level(logging.INFO, logger="t"):
        for _ in range(2048):
            now[0] += 0.01  # 100 rows/s, 1,000 bytes a row
            progress.step(1000)
        progress.done()
    lines = [r.getMessage() for r in caplog.records]
    assert lines == [  # one line per 10 s at most, the clock read every 1,024 rows; one at the end
        "validate: read: 1,024 rows, 100 rows/s, 1 of 4 MB (26%), about 30 s left",
        "validate: read: 2,048 rows, 100 rows/s, 2 of 4 MB (51%), about 20 s left",
        "validate: read: 2,048 rows, 100 rows/s, 2 of 4 MB (51%), 20.5 s",
    ]


def test_appended_records_tokenize_only_the_new_shards(chatml_model, tmp_path, monkeypatch, caplog):
    import logging

    monkeypatch.setattr(stage_module, "READ_BLOCK_BYTES", 2000)  # a few records per block
    monkeypatch.setattr(stage_module, "SHARD_BYTES", 1)  # a shard per block
    records = _records(60)
    validate = write_records(tmp_path / "v", records[:40])
    cfg = TokenizeConfig(max_length=64, cache_dir=str(tmp_path / "cache"))
    model = ModelConfig(base=str(chatml_model))
    with caplog.at_level(logging.INFO, logger="tunepath.tokenize.stage"):
        run_tokenize(cfg, model, validate, tmp_path / "out")
        first = [r.getMessage() for r in caplog.records if "records from row" in r.getMessage()]
        caplog.clear()
        write_records(validate, records)  # the first 40 lines as they were, 60 more after them
        summary = run_tokenize(cfg, model, validate, tmp_path / "out")
        second = [r.getMessage() for r in caplog.records if "records from row" in r.getMessage()]
    assert not summary["cached"]
    sft_first = [m for m in first if m.startswith("tokenize sft/train")]
    sft_second = [m for m in second if m.startswith("tokenize sft/train")]
    assert len(sft_first) > 3
    # Only the new shards are tokenized, and at most the last old one (when its block now reads on).
    old_rows = [int(m.split("from row ")[1].split()[0]) for m in sft_first]
    new_rows = [int(m.split("from row ")[1].split()[0]) for m in sft_second]
    assert min(new_rows) >= max(old_rows) and len(new_rows) < len(sft_first)
    fresh = run_tokenize(cfg.model_copy(update={"cache_dir": str(tmp_path / "fresh")}), model, validate, tmp_path / "fresh-out")
    assert not fresh["cached"]
    for part in ("sft/train", "sft/eval", "cpt/train"):
        if (tmp_path / "fresh-out" / part).exists():
            assert _load(tmp_path / "out" / part).to_dict() == _load(tmp_path / "fresh-out" / part).to_dict()


def test_mapped_split_reads_any_span_across_its_files(tmp_path):
    """A span read through maps of its own equals the same rows of the whole split, within and across files."""
    from tunepath.tokenize.split import MappedSplit

    paths, rows = [], []
    for f, count in enumerate((7, 1, 12)):  # three files of several record batches each
        path = tmp_path / f"part-{f}.arrow"
        values = [{"input_ids": [f * 100 + r] * (1 + r % 4), "status": r % 3} for r in range(count)]
        table = pa.Table.from_pylist(values)
        with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as writer:
            for batch in table.to_batches(max_chunksize=3):
                writer.write_batch(batch)
        paths.append(path)
        rows += values
    mapped, whole = MappedSplit(paths, in_memory=False), MappedSplit(paths, in_memory=True)
    assert len(mapped) == len(whole) == len(rows) == 20
    assert mapped.table["status"].to_pylist() == [r["status"] for r in rows]
    for lo, hi in [(0, 20), (0, 1), (6, 8), (7, 8), (5, 19), (19, 20), (3, 3)]:
        span = mapped.rows(lo, hi, ["input_ids"])
        assert span.column_names == ["input_ids"]
        assert span.to_pylist() == whole.rows(lo, hi, ["input_ids"]).to_pylist() == [{"input_ids": r["input_ids"]} for r in rows[lo:hi]]


def test_memory_mapped_splits_tokenize_to_the_same_outputs(chatml_model, tmp_path, monkeypatch):
    """Every kind read a window at a time through memory maps (splits too large to read whole) writes what the
    in-memory path writes, with windows and shards small enough to cross map files."""
    from test_tokenize_pairs import _records as pair_records

    chats = [{**r, "split": "eval"} if r["kind"] == "conversation" and i % 9 == 0 else r for i, r in enumerate(_records(80))]
    validate = write_records(tmp_path / "v", chats + pair_records())
    cfg = TokenizeConfig(max_length=64, cache_dir=str(tmp_path / "cache"))
    model = ModelConfig(base=str(chatml_model))
    monkeypatch.setattr(stage_module, "READ_BLOCK_BYTES", 3000)
    monkeypatch.setattr(stage_module, "SHARD_BYTES", 1)  # a shard, so a map file, per block
    monkeypatch.setattr(stage_module, "PACK_WINDOW_TOKENS", 500)
    monkeypatch.setattr(stage_module, "SAVE_WINDOW_ROWS", 4)
    monkeypatch.setattr(stage_module, "BYTES_PER_CPT_TOKEN", 1 << 30)
    run_tokenize(cfg, model, validate, tmp_path / "in-memory")
    loaded = []
    real = stage_module._load_split

    def mapped_only(cache_root, keys, budget):
        split = real(cache_root, keys, 0)  # a budget of 0: every split memory-mapped
        loaded.append((split.in_memory, len(split.paths)))
        return split

    monkeypatch.setattr(stage_module, "_load_split", mapped_only)
    run_tokenize(cfg.model_copy(update={"cache_dir": str(tmp_path / "cache-2")}), model, validate, tmp_path / "mapped")
    assert loaded and not any(in_memory for in_memory, _ in loaded) and max(files for _, files in loaded) > 3
    for part in ("sft/train", "sft/eval", "cpt/train", "dpo/train", "dpo/eval", "kto/train", "kto/eval"):
        assert (tmp_path / "in-memory" / part).exists(), part
        assert _load(tmp_path / "mapped" / part).to_dict() == _load(tmp_path / "in-memory" / part).to_dict(), part
    stats = [json.loads((tmp_path / run / "stats.json").read_text()) for run in ("in-memory", "mapped")]
    for s in stats:
        s.pop("seconds"), s.pop("timings")
    assert stats[0] == stats[1]
