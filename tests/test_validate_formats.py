"""Every input format and file type round-trips into the canonical records of `tunepath.records`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tunepath.records import read_records
from tunepath.validate import ValidateConfig, run_validate
from tunepath.validate.formats import Normaliser
from tunepath.validate.readers import RawRow, list_data_files, read_rows

SYSTEM = {"role": "system", "content": "You are terse."}
USER = {"role": "user", "content": "What is the capital of France?"}
ANSWER = {"role": "assistant", "content": "Paris."}
CONVERSATION = [SYSTEM, USER, ANSWER]
DOC = "Lyon is a city in France. It lies where the Rhone meets the Saone."

SOURCES = {
    "openai": {"messages": CONVERSATION},
    "sharegpt": {"conversations": [{"from": "system", "value": "You are terse."},
                                   {"from": "human", "value": USER["content"]}, {"from": "gpt", "value": "Paris."}]},
    "sharegpt_top_system": {"system": "You are terse.", "conversations": [
        {"from": "USER", "value": USER["content"]}, {"from": "chatgpt", "value": "Paris."}]},
    "alpaca": {"system": "You are terse.", "instruction": USER["content"], "input": "", "output": "Paris."},
    "text": {"text": DOC},
    "preference": {"prompt": USER["content"], "chosen": "Paris.", "rejected": "Berlin."},
}


def normalise(value: dict, cfg: ValidateConfig | None = None, fmt: str = "auto", origin: str = "json"):
    return Normaliser(cfg or ValidateConfig()).normalise(RawRow("f.jsonl", 1, json.dumps(value), value, origin=origin), fmt)


@pytest.mark.parametrize("name", ["openai", "sharegpt", "sharegpt_top_system", "alpaca"])
def test_chat_formats_normalise_to_the_same_conversation(name):
    out = normalise(SOURCES[name])
    assert out.reasons == []
    assert out.kind == "conversation"
    assert out.fields == {"messages": CONVERSATION}


def test_alpaca_input_and_history_become_turns():
    out = normalise({"instruction": "Translate to French", "input": "cat", "output": "chat",
                     "history": [["Hi", "Hello!"]]})
    assert out.fmt == "alpaca"
    assert out.fields["messages"] == [
        {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "Translate to French\n\ncat"}, {"role": "assistant", "content": "chat"}]


def test_preference_strings_and_message_lists_give_the_same_record():
    as_strings = normalise(SOURCES["preference"])
    as_messages = normalise({"prompt": [USER], "chosen": [{"role": "assistant", "content": "Paris."}],
                             "rejected": [{"role": "assistant", "content": "Berlin."}]})
    implicit = normalise({"chosen": [USER, {"role": "assistant", "content": "Paris."}],
                          "rejected": [USER, {"role": "assistant", "content": "Berlin."}]})
    expected = {"prompt": [USER], "chosen": [{"role": "assistant", "content": "Paris."}],
                "rejected": [{"role": "assistant", "content": "Berlin."}]}
    assert as_strings.fields == as_messages.fields == implicit.fields == expected
    assert as_strings.kind == "preference"


def test_field_map_and_role_map_rename_fields_and_roles():
    cfg = ValidateConfig(field_map={"messages": "dialog", "role": "speaker", "content": "utterance"},
                         role_map={"customer": "user", "agent": "assistant"})
    out = normalise({"dialog": [{"speaker": "customer", "utterance": "Hi"}, {"speaker": "agent", "utterance": "Hello"}]}, cfg)
    assert out.reasons == []
    assert out.fields["messages"] == [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]


def test_forced_format_reports_the_missing_field():
    out = normalise({"text": DOC}, fmt="alpaca")
    assert [r.split(":")[0] for r in out.reasons] == ["missing_field", "missing_field"]
    assert "'instruction'" in out.reasons[0] and "'output'" in out.reasons[1]


def test_file_formats_glob_overrides_the_global_format():
    normaliser = Normaliser(ValidateConfig(format="openai", file_formats={"sft/*.jsonl": "alpaca"}))
    assert normaliser.format_for("sft/a.jsonl") == "alpaca"
    assert normaliser.format_for("other.jsonl") == "openai"


def _write_all_file_types(raw: Path) -> None:
    """The same rows as JSONL, JSON array, CSV, Parquet and plain text."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    raw.mkdir(parents=True)
    rows = [SOURCES[k] for k in ("openai", "sharegpt", "text", "preference")]
    (raw / "a.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n", encoding="utf-8")
    alpaca = [{**SOURCES["alpaca"], "output": "Paris!"}, {"instruction": "Name a colour.", "input": "", "output": "Blue."}]
    (raw / "b.json").write_text(json.dumps(alpaca, indent=2), encoding="utf-8")
    (raw / "c.csv").write_text(
        'instruction,input,output\n"Add 2 and 3.",,5\n"Say ""hi""\nnicely",,"Hi, friend!"\n', encoding="utf-8")
    # a mixed Parquet file: every row has both columns, the other format's one is null
    pq.write_table(pa.Table.from_pylist([{"messages": [USER, {"role": "assistant", "content": "Paris, France."}], "text": None},
                                         {"messages": None, "text": DOC + " Parquet."}]), raw / "d.parquet")
    (raw / "e.txt").write_text(f"{DOC} Text.\n\n\n  Second document of the corpus, long enough.\n", encoding="utf-8")
    (raw / "sub").mkdir()
    (raw / "sub" / "f.txt").write_text("A document in a sub folder of the raw data.", encoding="utf-8")
    (raw / ".hidden.jsonl").write_text("not data\n", encoding="utf-8")
    (raw / "a.jsonl.dvc").write_text("outs: []\n", encoding="utf-8")
    (raw / "notes.docx").write_bytes(b"PK\x03\x04")


def test_listing_skips_hidden_and_dvc_files_and_reports_unknown_types(tmp_path):
    _write_all_file_types(tmp_path / "raw")
    listing = list_data_files(tmp_path / "raw")
    assert [p.name for p in listing.files] == ["a.jsonl", "b.json", "c.csv", "d.parquet", "e.txt", "f.txt"]
    assert [p.name for p in listing.skipped] == ["notes.docx"]


def test_all_file_types_round_trip_through_the_stage(tmp_path):
    raw, out = tmp_path / "raw", tmp_path / "out"
    _write_all_file_types(raw)
    summary = run_validate(ValidateConfig(eval_share=0.0, max_reject_share=0.5), raw, out)
    # a.jsonl line 2 is the ShareGPT form of line 1: same content, same id, so it is a duplicate
    rejects = [json.loads(line) for line in (out / "rejects.jsonl").read_text().splitlines()]
    assert [(r["source"]["line"], r["reasons"]) for r in rejects] == [(2, [f"duplicate: same content as {raw}/a.jsonl:1"])]
    assert summary["read"] == 13 and summary["accepted"] == 12
    records = list(read_records(out))
    by_place = {(Path(r["source"]["file"]).name, r["source"]["line"]): r for r in records}
    assert by_place[("a.jsonl", 1)]["messages"] == CONVERSATION
    assert by_place[("a.jsonl", 3)]["text"] == DOC
    assert by_place[("a.jsonl", 4)]["chosen"] == [{"role": "assistant", "content": "Paris."}]
    assert by_place[("b.json", 2)]["messages"] == [SYSTEM, USER, {"role": "assistant", "content": "Paris!"}]
    assert by_place[("b.json", 8)]["messages"][-1] == {"role": "assistant", "content": "Blue."}
    assert by_place[("c.csv", 3)]["messages"] == [{"role": "user", "content": 'Say "hi"\nnicely'},
                                                   {"role": "assistant", "content": "Hi, friend!"}]
    assert by_place[("d.parquet", 1)]["messages"][0] == USER  # line = row number for Parquet
    assert by_place[("e.txt", 4)]["text"] == "Second document of the corpus, long enough."
    assert by_place[("d.parquet", 2)]["text"] == DOC + " Parquet."
    assert by_place[("f.txt", 1)]["kind"] == "text"
    assert len(records) == 12
    for r in records:
        assert set(r) >= {"id", "kind", "split", "source"} and len(r["id"]) == 16 and r["split"] == "train"
    report = json.loads((out / "report.json").read_text())
    assert report["skipped_files"] and report["files"][str(raw / "c.csv")]["formats"] == {"alpaca": 2}


def test_text_files_can_be_one_document_per_file(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text("Para one.\n\nPara two.\r\n", encoding="utf-8")
    rows = list(read_rows(path, "corpus.txt", text_split="file"))
    assert [(r.line, r.value) for r in rows] == [(1, {"text": "Para one.\n\nPara two."})]
    blocks = list(read_rows(path, "corpus.txt"))
    assert [(r.line, r.value["text"]) for r in blocks] == [(1, "Para one."), (3, "Para two.")]
