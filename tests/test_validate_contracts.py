"""The Great Expectations contracts: each rule rejects what it should, with a reason naming the field."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tunepath.validate import ValidateConfig, run_validate


def chat(*turns: tuple[str, str]) -> dict:
    return {"messages": [{"role": r, "content": c} for r, c in turns]}


OK = chat(("system", "Be nice."), ("user", "Hello?"), ("assistant", "Hi!"), ("user", "Bye?"), ("assistant", "Bye!"))
# line number -> (row, reason codes expected; [] means accepted)
CASES = {
    1: (OK, []),
    2: (chat(("user", "Q?"), ("assistant", "A.")), []),
    3: (chat(("user", "   "), ("assistant", "A.")), ["empty_content"]),
    4: (chat(("user", "Q?"), ("assistant", "\t\n")), ["empty_answer"]),
    5: (chat(("assistant", "A."), ("user", "Q?"), ("assistant", "A2.")), ["bad_turn_order"]),
    6: (chat(("user", "Q?"), ("system", "late"), ("assistant", "A.")), ["bad_turn_order"]),
    7: (chat(("user", "Q?"), ("user", "Q again?"), ("assistant", "A.")), ["bad_turn_order"]),
    8: (chat(("user", "Q?"), ("assistant", "A."), ("user", "Q2?")), ["last_turn_not_assistant"]),
    9: (chat(("user", "Q"), ("assistant", "")), ["empty_answer", "too_short"]),
    10: (chat(("user", "x" * 300), ("assistant", "A.")), ["too_long"]),
    11: (chat(("Human", "Q?"), ("narrator", "Meanwhile."), ("assistant", "A.")), ["unknown_role", "bad_turn_order"]),
    12: (OK, ["duplicate"]),
    13: (chat(("user", "Use <|im_start|>system now"), ("assistant", "No.")), []),  # warned, not rejected
    14: ({"text": "A document long enough to pass the bounds."}, []),
    15: ({"text": "short"}, ["too_short"]),
    16: ({"text": " \n\t "}, ["empty_content", "too_short"]),
    17: ({"text": "A document long enough to pass the bounds."}, ["duplicate"]),
    18: ({"text": "Text with [INST] inside it, long enough."}, []),
    19: ({"prompt": "Q?", "chosen": "Yes.", "rejected": "No."}, []),
    20: ({"prompt": "Q?", "chosen": "Same.", "rejected": "Same."}, ["identical_answers"]),
    21: ({"prompt": [{"role": "user", "content": "Q?"}, {"role": "assistant", "content": "A."}],
          "chosen": "Yes.", "rejected": "No."}, ["bad_turn_order"]),
    22: ({"prompt": "Q?", "chosen": " ", "rejected": "No."}, ["empty_answer"]),
    23: ({"prompt": "Q?", "chosen": [{"role": "user", "content": "Yes."}], "rejected": "No."}, ["bad_answer"]),
}
CFG = dict(max_reject_share=1.0, eval_share=0.0, conversation_chars={"min": 2, "max": 200},
           text_chars={"min": 20, "max": 1000})


def run(tmp: Path, **overrides):
    raw = tmp / "raw"
    raw.mkdir(exist_ok=True)
    (raw / "rows.jsonl").write_text("\n".join(json.dumps(row) for row, _ in CASES.values()) + "\n", encoding="utf-8")
    run_validate(ValidateConfig(**{**CFG, **overrides}), raw, tmp / "out")
    rejects = {r["source"]["line"]: r for r in map(json.loads, (tmp / "out" / "rejects.jsonl").read_text().splitlines())}
    return rejects, json.loads((tmp / "out" / "report.json").read_text())


@pytest.fixture(scope="module")
def outcome(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("contracts")
    return tmp, *run(tmp)


@pytest.mark.parametrize("line", sorted(CASES))
def test_rule(outcome, line):
    _, rejects, _ = outcome
    want = CASES[line][1]
    got = [r.split(":", 1)[0] for r in rejects[line]["reasons"]] if line in rejects else []
    assert sorted(got) == sorted(want), rejects.get(line)


def test_reasons_name_the_field_and_the_first_occurrence(outcome):
    _, rejects, _ = outcome
    assert rejects[4]["reasons"] == ["empty_answer: messages[1] (assistant) is empty or whitespace only"]
    assert rejects[11]["reasons"][0].startswith("unknown_role: messages[1].role 'narrator'")
    assert rejects[12]["reasons"][0].endswith("rows.jsonl:1")
    assert "validate.conversation_chars.max=200" in rejects[10]["reasons"][0]
    assert rejects[22]["reasons"] == ["empty_answer: chosen[0] (assistant) is empty or whitespace only"]


def test_report_counts_gx_statistics_and_control_tokens(outcome):
    tmp, rejects, report = outcome
    assert report["totals"]["rejected"] == len(rejects)
    assert report["reasons"]["bad_turn_order"] == 5  # rows, not reasons: row 11 counts once
    assert report["control_tokens"]["rows"] == 2
    assert report["control_tokens"]["by_token"] == {"<|im_start|>": 1, "[INST]": 1}
    gx = report["gx"]["conversation_messages"]
    assert gx["success"] is False and gx["statistics"]["evaluated_expectations"] == len(gx["expectations"])
    assert gx["rows"] == sum(len(row.get("messages", [])) for row, _ in CASES.values())
    assert report["gx"]["text"]["expectations"][0]["expectation"].startswith("ExpectColumn")
    results = json.loads((tmp / "out" / "gx_results.json").read_text())
    assert set(results) == {"conversation_messages", "conversation_records", "text", "preference_messages",
                            "preference_records"}
    assert all("unexpected_list" not in r["result"] for r in results["text"]["results"])
    md = (tmp / "out" / "report.md").read_text()
    assert "| file | format | detected by | read | accepted | rejected | top reasons |" in md and "| bad_turn_order | 5 |" in md


def test_control_token_policy_reject(tmp_path):
    rejects, report = run(tmp_path, control_token_policy="reject")
    assert rejects[13]["reasons"] == ["control_token: messages[0] contains template control text ['<|im_start|>']"]
    assert rejects[18]["reasons"] == ["control_token: text contains template control text ['[INST]']"]
    assert report["reasons"]["control_token"] == 2


def test_final_assistant_rule_can_be_turned_off(tmp_path):
    rejects, _ = run(tmp_path, require_final_assistant=False)
    assert 8 not in rejects


def test_profile_for_the_route_stage(outcome):
    tmp = outcome[0]
    profile = json.loads((tmp / "out" / "profile.json").read_text())
    assert (profile["conversations"], profile["documents"], profile["preference_pairs"]) == (3, 2, 1)
    assert profile["turns"] == 5 + 2 + 2
    assert profile["characters"]["conversation"] == 25 + 4 + 29
    assert (profile["lengths"]["conversation"]["min"], profile["lengths"]["conversation"]["max"]) == (4, 29)
    assert profile["cjk_share"] == 0.0
