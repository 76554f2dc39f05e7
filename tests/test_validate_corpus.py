"""Real public samples (tests/corpus/data, see SOURCES.md) validate as their trainers read them."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from tunepath.records import read_records
from tunepath.validate import ValidateConfig, run_validate

CORPUS = Path(__file__).parent / "corpus" / "data"
LLAMAFACTORY = CORPUS / "llamafactory"
# file -> (kind of its records, format detected per row without dataset_info.json)
SAMPLES = {
    "llamafactory/alpaca_en_demo.json": ("conversation", "alpaca"),
    "llamafactory/alpaca_zh_demo.json": ("conversation", "alpaca"),
    "llamafactory/identity.json": ("conversation", "alpaca"),
    "llamafactory/glaive_toolcall_en_demo.json": ("conversation", "sharegpt"),
    "llamafactory/glaive_toolcall_zh_demo.json": ("conversation", "sharegpt"),
    "llamafactory/reason_tool_use_demo_50.jsonl": ("conversation", "openai"),
    "llamafactory/dpo_en_demo.json": ("preference", "preference"),
    "llamafactory/dpo_zh_demo.json": ("preference", "preference"),
    "llamafactory/kto_en_demo.json": ("feedback", "feedback"),
    "llamafactory/c4_demo.jsonl": ("text", "text"),
    "llamafactory/wiki_demo.txt": ("text", "text"),
    "llamafactory_v1/v1_sft_demo.jsonl": ("conversation", "openai"),
    "llamafactory_v1/v1_dpo_demo.jsonl": ("preference", "preference"),
    "hh_rlhf/harmless_base_test.jsonl": ("preference", "preference"),
}


def _validate_alone(tmp_path: Path, name: str, with_info: bool):
    raw = tmp_path / "raw"
    raw.mkdir()
    shutil.copy(CORPUS / name, raw)
    if with_info:
        shutil.copy(LLAMAFACTORY / "dataset_info.json", raw)
    summary = run_validate(ValidateConfig(max_reject_share=1.0), raw, tmp_path / "out")
    report = json.loads((tmp_path / "out" / "report.json").read_text(encoding="utf-8"))
    return summary, report, list(read_records(tmp_path / "out"))


@pytest.mark.parametrize("name", sorted(SAMPLES))
def test_each_public_sample_validates_with_at_least_95_percent_accepted(tmp_path, name):
    kind, fmt = SAMPLES[name]
    summary, report, records = _validate_alone(tmp_path, name, with_info=False)
    assert summary["accepted"] >= 0.95 * summary["read"], report["reasons"]
    assert {r["kind"] for r in records} == {kind}
    (tally,) = report["files"].values()
    assert set(tally["formats"]) == {fmt} and tally["detection"] == "per row"


@pytest.mark.parametrize("name", [n for n in sorted(SAMPLES) if n.startswith("llamafactory/") and "reason_tool_use" not in n])
def test_each_llamafactory_sample_reads_the_same_through_dataset_info(tmp_path, name):
    kind, _ = SAMPLES[name]
    summary, report, records = _validate_alone(tmp_path, name, with_info=True)
    assert summary["accepted"] >= 0.95 * summary["read"], report["reasons"]
    assert {r["kind"] for r in records} == {kind}
    (tally,) = report["files"].values()
    assert tally["detection"].startswith("dataset_info.json: ")


def test_the_whole_llamafactory_demo_folder_passes_with_its_dataset_info(tmp_path):
    summary = run_validate(ValidateConfig(), LLAMAFACTORY, tmp_path / "out")  # default threshold: 10% rejected
    report = json.loads((tmp_path / "out" / "report.json").read_text(encoding="utf-8"))
    assert summary["kinds"]["conversation"] and summary["kinds"]["preference"]
    assert summary["kinds"]["feedback"] == 30 and summary["kinds"]["text"] == 15 + 2  # wiki_demo.txt: a line each
    files = {Path(name).name: t for name, t in report["files"].items()}
    assert "dataset_info.json" not in files  # it describes the data, it is not data
    for name, tally in files.items():
        described = not name.startswith("reason_tool_use")  # the only file its dataset_info.json does not list
        assert tally["detection"].startswith("dataset_info.json") == described, name
        if name.startswith("mllm_"):  # images, audio and video are out of scope: rejected with their own reason
            assert tally["accepted"] == 0 and set(tally["reasons"]) == {"non_text_content"}
        else:
            assert tally["accepted"] >= 0.95 * tally["read"], (name, tally["reasons"])
    assert files["kto_en_demo.json"]["formats"] == {"feedback": 30}
    assert files["dpo_en_demo.json"]["formats"] == {"preference": 12}
    # identity.json asks for {{name}} and {{author}}: flagged, not trained silently
    assert report["placeholders"]["by_name"].keys() >= {"name", "author"}
    md = (tmp_path / "out" / "report.md").read_text(encoding="utf-8")
    assert "| dataset_info.json: glaive_toolcall_en_demo |" in md and "`{{name}}`" in md


def test_glaive_tool_calls_become_canonical_calls_and_named_results(tmp_path):
    _, _, records = _validate_alone(tmp_path, "llamafactory/glaive_toolcall_en_demo.json", with_info=True)
    with_calls = [r for r in records if any(m.get("tool_calls") for m in r["messages"])]
    assert len(with_calls) >= 15
    for r in with_calls:
        names = {t["function"]["name"] for t in json.loads(r["tools"])}
        for i, m in enumerate(r["messages"]):
            for call in m.get("tool_calls", ()):
                assert call["name"] in names and isinstance(json.loads(call["arguments"]), dict)
            if m["role"] == "tool":
                before = [p for p in r["messages"][:i] if p["role"] != "tool"][-1]
                assert m["name"] in {c["name"] for c in before["tool_calls"]}


def test_hh_transcripts_split_into_a_shared_prompt_and_two_answers(tmp_path):
    _, _, records = _validate_alone(tmp_path, "hh_rlhf/harmless_base_test.jsonl", with_info=False)
    first = records[0]
    assert first["prompt"][0] == {"role": "user", "content": "what are some pranks with a pen i can do?"}
    assert [m["role"] for m in first["prompt"]][-1] == "user"
    assert first["chosen"][0]["content"].startswith("No, sorry!")
    assert first["rejected"][0]["content"].startswith("There are lots of funny things")


def test_identity_placeholders_are_filled_from_params(tmp_path):
    raw = tmp_path / "raw"
    raw.mkdir()
    shutil.copy(LLAMAFACTORY / "identity.json", raw)
    run_validate(ValidateConfig(placeholders={"name": "Tuna", "author": "the tunepath team"}), raw, tmp_path / "out")
    answers = [r["messages"][-1]["content"] for r in read_records(tmp_path / "out")]
    assert "Hello! I am Tuna, an AI assistant developed by the tunepath team. How can I assist you today?" in answers
    assert not any("{{" in a for a in answers)
    with pytest.raises(Exception, match="rejected"):
        run_validate(ValidateConfig(placeholder_policy="reject"), raw, tmp_path / "out2")
    rejects = [json.loads(x) for x in (tmp_path / "out2" / "rejects.jsonl").read_text().splitlines()]
    assert len(rejects) == 85 and all(r["reasons"][0].startswith("placeholder: {{") for r in rejects)
    assert all("{{name}}" in r["reasons"][0] or "{{author}}" in r["reasons"][0] for r in rejects)
