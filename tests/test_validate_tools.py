"""Tool calling, reasoning, content parts, feedback labels and the new preference layouts, one rule at a time."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tunepath.records import read_records
from tunepath.validate import DataValidationError, ValidateConfig, run_validate
from tunepath.validate.chunks import chunk_text
from tunepath.validate.formats import Normaliser
from tunepath.validate.readers import RawRow, read_rows

WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Weather of a city",
                                            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}
USER = {"role": "user", "content": "Weather in Paris?"}
CALL = {"id": "call_1", "name": "get_weather", "arguments": '{"city": "Paris"}'}
CANONICAL = [
    USER,
    {"role": "assistant", "content": "", "tool_calls": [CALL]},
    {"role": "tool", "content": '{"temp": 21}', "tool_call_id": "call_1", "name": "get_weather"},
    {"role": "assistant", "content": "It is 21 degrees."},
]
OPENAI = {"tools": [WEATHER], "messages": [
    USER,
    {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'}}]},
    {"role": "tool", "tool_call_id": "call_1", "name": "get_weather", "content": '{"temp": 21}'},
    {"role": "assistant", "content": "It is 21 degrees."},
]}
SHAREGPT = {"tools": json.dumps([WEATHER["function"]]), "conversations": [
    {"from": "human", "value": "Weather in Paris?"},
    {"from": "function_call", "value": json.dumps({"name": "get_weather", "arguments": {"city": "Paris"}})},
    {"from": "observation", "value": '{"temp": 21}'},
    {"from": "gpt", "value": "It is 21 degrees."},
]}


def normalise(value: dict, cfg: ValidateConfig | None = None, fmt: str = "auto"):
    return Normaliser(cfg or ValidateConfig()).normalise(RawRow("f.jsonl", 1, json.dumps(value), value), fmt)


def codes(reasons: list[str]) -> list[str]:
    return [r.split(":", 1)[0] for r in reasons]


def test_openai_and_sharegpt_tool_layouts_give_one_canonical_form():
    openai, sharegpt = normalise(OPENAI), normalise(SHAREGPT)
    assert openai.reasons == [] and sharegpt.reasons == []
    assert openai.fields["messages"] == CANONICAL
    assert openai.fields["tools"] == json.dumps([WEATHER])
    # ShareGPT calls carry no id; the result is named after the call it follows
    assert sharegpt.fields["messages"][1]["tool_calls"] == [{**CALL, "id": None}]
    assert sharegpt.fields["messages"][2] == {"role": "tool", "content": '{"temp": 21}', "tool_call_id": None,
                                              "name": "get_weather"}
    assert sharegpt.fields["tools"] == openai.fields["tools"]  # bare schemas are wrapped as OpenAI tools


def test_parallel_calls_and_text_before_a_call_fold_into_one_assistant_turn():
    out = normalise({"conversations": [
        {"from": "human", "value": "Paris and Rome?"},
        {"from": "gpt", "value": "Let me look."},
        {"from": "function_call", "value": json.dumps([{"name": "w", "arguments": {"city": "Paris"}},
                                                       {"name": "w", "arguments": {"city": "Rome"}}])},
        {"from": "observation", "value": "21"}, {"from": "observation", "value": "25"},
        {"from": "gpt", "value": "21 and 25."}]})
    assert out.reasons == []
    ms = out.fields["messages"]
    assert [m["role"] for m in ms] == ["user", "assistant", "tool", "tool", "assistant"]
    assert ms[1]["content"] == "Let me look." and [c["arguments"] for c in ms[1]["tool_calls"]] == [
        '{"city": "Paris"}', '{"city": "Rome"}']


def test_content_parts_are_joined_and_reasoning_moves_out_of_the_answer():
    out = normalise({"messages": [
        {"role": "user", "content": [{"type": "text", "text": "Hi "}, {"type": "text", "value": "there"}]},
        {"role": "assistant", "content": "<think>\n greet back \n</think>\n\nHello!"},
        {"role": "user", "content": "Again?"},
        {"role": "assistant", "content": "Hello again.", "reasoning_content": "same"},
        {"role": "user", "content": [{"type": "text", "value": "Once more"}]},
        {"role": "assistant", "content": [{"type": "reasoning", "value": "third"}, {"type": "text", "value": "Hi."}]}]})
    assert out.reasons == []
    ms = out.fields["messages"]
    assert ms[0] == {"role": "user", "content": "Hi there"}
    assert ms[1] == {"role": "assistant", "content": "Hello!", "reasoning": "greet back"}
    assert ms[3]["reasoning"] == "same" and ms[5] == {"role": "assistant", "content": "Hi.", "reasoning": "third"}


def test_structural_problems_of_the_new_fields_name_the_field():
    image = normalise({"messages": [{"role": "user", "content": [
        {"type": "text", "text": "What is this?"}, {"type": "image_url", "image_url": {"url": "x.png"}}]},
        {"role": "assistant", "content": "A cat."}]})
    assert codes(image.reasons) == ["non_text_content"] and "'messages[0].content[1]'" in image.reasons[0]
    assert "'image_url' part" in image.reasons[0]
    call = normalise({"conversations": [{"from": "human", "value": "x"}, {"from": "function_call", "value": "{oops"}]})
    assert codes(call.reasons) == ["bad_tool_call"] and "'conversations[1].value'" in call.reasons[0]
    tools = normalise({**OPENAI, "tools": "not json"})
    assert codes(tools.reasons) == ["bad_tools"]
    user_calls = normalise({"messages": [{"role": "user", "content": "x", "tool_calls": [CALL]}]})
    assert codes(user_calls.reasons) == ["misplaced_field"]
    media = normalise({"messages": [USER, {"role": "assistant", "content": "x"}], "images": ["a.jpg"]})
    assert codes(media.reasons) == ["non_text_content"]


def test_preference_layouts_are_detected_per_row():
    expected = {"prompt": [USER], "chosen": [{"role": "assistant", "content": "Sunny."}],
                "rejected": [{"role": "assistant", "content": "No idea."}]}
    ranking = normalise({"conversations": [{"from": "human", "value": USER["content"]}],
                         "chosen": {"from": "gpt", "value": "Sunny."}, "rejected": {"from": "gpt", "value": "No idea."}})
    alpaca = normalise({"instruction": USER["content"], "input": "", "chosen": "Sunny.", "rejected": "No idea."})
    hh = normalise({"chosen": f"\n\nHuman: {USER['content']}\n\nAssistant: Sunny.",
                    "rejected": f"\n\nHuman: {USER['content']}\n\nAssistant: No idea."})
    v1 = normalise({"chosen_messages": [USER, {"role": "assistant", "content": [{"type": "text", "value": "Sunny."}]}],
                    "rejected_messages": [USER, {"role": "assistant", "content": "No idea."}]})
    for out in (ranking, alpaca, hh, v1):
        assert (out.fmt, out.kind, out.reasons) == ("preference", "preference", [])
        assert out.fields == expected


def test_feedback_rows_keep_their_label_and_never_become_conversations():
    for row in ({"messages": [USER, {"role": "assistant", "content": "Sunny."}], "label": False},
                {"conversations": [{"from": "human", "value": USER["content"]}, {"from": "gpt", "value": "Sunny."}],
                 "kto_tag": False},
                {"instruction": USER["content"], "output": "Sunny.", "kto_tag": False}):
        out = normalise(row)
        assert (out.kind, out.reasons) == ("feedback", [])
        assert out.fields == {"messages": [USER, {"role": "assistant", "content": "Sunny."}], "label": False}


def test_text_files_split_per_line(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text("First document.\nSecond document.\n\nThird.\n", encoding="utf-8")
    rows = list(read_rows(path, "corpus.txt", text_split="line"))
    assert [(r.line, r.value["text"]) for r in rows] == [(1, "First document."), (2, "Second document."), (4, "Third.")]


def test_chunks_cut_at_blank_lines_then_lines_then_spaces():
    text = "a" * 40 + "\n\n" + "b" * 30 + "\n" + "c" * 30 + " " + "d" * 50
    # the blank line at 40 is the last one in reach; then only a line break, then only a space
    assert chunk_text(text, 60) == ["a" * 40, "b" * 30, "c" * 30, "d" * 50]
    assert chunk_text("x" * 125, 50) == ["x" * 50, "x" * 50, "x" * 25]


def _run(tmp_path: Path, rows: list[dict], **cfg):
    raw = tmp_path / "raw"
    raw.mkdir(exist_ok=True)
    (raw / "data.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n", encoding="utf-8")
    out = tmp_path / "out"
    try:
        run_validate(ValidateConfig(max_reject_share=1.0, eval_share=0.0, **cfg), raw, out)
    except DataValidationError:
        pass
    rejects = {r["source"]["line"]: r["reasons"] for r in map(json.loads, (out / "rejects.jsonl").read_text().splitlines())}
    return rejects, list(read_records(out)), json.loads((out / "report.json").read_text())


def _with(messages, **extra):
    return {"messages": messages, **extra}


def test_tool_contracts_reject_with_file_line_and_field(tmp_path):
    bad_args = json.loads(json.dumps(OPENAI))
    bad_args["messages"][1]["tool_calls"][0]["function"]["arguments"] = '{"city": "Par'
    list_args = json.loads(json.dumps(OPENAI))
    list_args["messages"][1]["tool_calls"][0]["function"]["arguments"] = ["Paris"]
    unknown = json.loads(json.dumps(OPENAI))
    unknown["messages"][1]["tool_calls"][0]["function"]["name"] = "get_time"
    wrong_id = json.loads(json.dumps(OPENAI))
    wrong_id["messages"][2]["tool_call_id"] = "call_9"
    rows = [
        OPENAI,                                                                       # 1 fine
        bad_args,                                                                     # 2
        list_args,                                                                    # 3
        unknown,                                                                      # 4
        _with([USER, {"role": "tool", "content": "21"}, {"role": "assistant", "content": "x"}]),  # 5 dangling
        wrong_id,                                                                     # 6
        {"messages": [USER, {"role": "assistant", "content": "Sunny."}], "label": "yes"},  # 7
        {"messages": [USER, {"role": "assistant", "content": "Sunny."}], "label": 1},  # 8
        {"messages": [USER, {"role": "assistant", "content": "Rainy."}], "label": False},  # 9 fine
        {"messages": [USER], "label": True},                                          # 10 nothing to judge
        {"messages": [USER, {"role": "assistant", "content": "", "tool_calls": [CALL]}], "tools": [WEATHER]},  # 11 fine
    ]
    rejects, records, report = _run(tmp_path, rows)
    assert sorted(rejects) == [2, 3, 4, 5, 6, 7, 8, 10]
    assert codes(rejects[2]) == ["bad_arguments"]
    assert "messages[1].tool_calls[0].arguments of 'get_weather' is not a JSON object" in rejects[2][0]
    assert codes(rejects[3]) == ["bad_arguments"]
    assert codes(rejects[4]) == ["undeclared_tool"] and "'get_time'" in rejects[4][0] and "['get_weather']" in rejects[4][0]
    assert set(codes(rejects[5])) == {"dangling_tool_result", "bad_turn_order"} and "messages[1]" in rejects[5][0]
    assert codes(rejects[6]) == ["dangling_tool_result"]
    assert codes(rejects[7]) == ["bad_label"] and 'label is "yes" (str)' in rejects[7][0]
    assert codes(rejects[8]) == ["bad_label"]
    assert codes(rejects[10]) == ["last_turn_not_assistant"]
    kinds = {r["source"]["line"]: r["kind"] for r in records}
    assert kinds == {1: "conversation", 9: "feedback", 11: "conversation"}
    assert report["kinds"]["feedback"]["accepted"] == 1 and "conversation_calls" in report["gx"]
    assert report["totals"]["read"] == report["totals"]["accepted"] + report["totals"]["rejected"] == len(rows)


def test_reasoning_and_calls_count_towards_length_and_ids(tmp_path):
    plain = _with([USER, {"role": "assistant", "content": "Sunny."}])
    thinking = _with([USER, {"role": "assistant", "content": "<think>hmm</think>Sunny."}])
    rejects, records, _ = _run(tmp_path, [plain, thinking, thinking])
    assert codes(rejects[3]) == ["duplicate"]  # the same reasoning is the same record
    assert records[0]["id"] != records[1]["id"]  # reasoning is content: a different record


def test_long_documents_are_rejected_when_chunking_is_off(tmp_path):
    rejects, records, _ = _run(tmp_path, [{"text": "word " * 300}], long_text="reject", text_chars={"min": 1, "max": 1000})
    assert codes(rejects[1]) == ["too_long"] and not records
    rejects, records, report = _run(tmp_path, [{"text": "word " * 300}], text_chars={"min": 1, "max": 1000})
    assert not rejects and len(records) == 2 and report["chunked"]["documents"] == 1
    assert {r["split"] for r in records} == {"train"} and all(len(r["text"]) <= 1000 for r in records)


@pytest.mark.parametrize("policy", ["warn", "reject"])
def test_placeholders_are_counted_and_follow_the_policy(tmp_path, policy):
    rows = [_with([{"role": "user", "content": "Who are you?"}, {"role": "assistant", "content": "I am {{ name }}."}]),
            _with([{"role": "user", "content": "Template?"}, {"role": "assistant", "content": "Use {{...}} in prose."}])]
    rejects, records, report = _run(tmp_path, rows, placeholder_policy=policy)
    assert report["placeholders"]["rows"] == 1 and report["placeholders"]["by_name"] == {"name": 1}
    assert (sorted(rejects) == [1]) == (policy == "reject")
    _, records, _ = _run(tmp_path, rows, placeholders={"name": "Tuna"}, placeholder_policy=policy)
    assert records[0]["messages"][1]["content"] == "I am Tuna."


def test_parquet_tool_calls_with_the_null_keys_of_a_shared_schema(tmp_path):
    """Parquet gives every message every key of the column (tool_calls, tool_call_id, name), null where unused."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    tools = json.loads(json.dumps(OPENAI))
    tools["messages"][1]["content"] = ""
    tools["tools"] = json.dumps(tools["tools"])
    plain = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}], "tools": None}
    raw = tmp_path / "raw"
    raw.mkdir()
    pq.write_table(pa.Table.from_pylist([tools, plain]), raw / "a.parquet")
    run_validate(ValidateConfig(eval_share=0.0), raw, tmp_path / "out")
    records = list(read_records(tmp_path / "out"))
    assert [r["messages"] for r in records] == [CANONICAL, plain["messages"]]
    assert "tools" in records[0] and "tools" not in records[1]


def test_dataset_info_maps_columns_and_tags_and_names_its_own_errors(tmp_path):
    raw = tmp_path / "raw"
    raw.mkdir()
    rows = [{"dialog": [{"speaker": "customer", "text": "Weather?"}, {"speaker": "agent", "text": "Sunny."}],
             "good": False}]
    (raw / "fb.json").write_text(json.dumps(rows), encoding="utf-8")
    info = {"fb": {"file_name": "fb.json", "formatting": "sharegpt", "columns": {"messages": "dialog", "kto_tag": "good"},
                   "tags": {"role_tag": "speaker", "content_tag": "text", "user_tag": "customer", "assistant_tag": "agent"}},
            "hub_only": {"hf_hub_url": "someone/data"}}
    (raw / "dataset_info.json").write_text(json.dumps(info), encoding="utf-8")
    run_validate(ValidateConfig(eval_share=0.0), raw, tmp_path / "out")
    (record,) = read_records(tmp_path / "out")
    assert record["kind"] == "feedback" and record["label"] is False
    assert record["messages"] == [{"role": "user", "content": "Weather?"}, {"role": "assistant", "content": "Sunny."}]
    with pytest.raises(DataValidationError, match="no usable rows"):  # without it the file means nothing
        run_validate(ValidateConfig(read_dataset_info=False), raw, tmp_path / "out")
    reject = json.loads((tmp_path / "out" / "rejects.jsonl").read_text())
    assert reject["reasons"][0].startswith("missing_field: no known format: the row has keys ['dialog', 'good']")
    (raw / "dataset_info.json").write_text('{"fb": {"file_name": "fb.json", "formatting": "xml"}}', encoding="utf-8")
    with pytest.raises(DataValidationError, match=r"dataset_info.json: entry 'fb' has formatting 'xml'"):
        run_validate(ValidateConfig(), raw, tmp_path / "out")
    (raw / "dataset_info.json").write_text('{"fb": {"file_name": "fb.json",\n', encoding="utf-8")
    with pytest.raises(DataValidationError, match=r"dataset_info.json line 2: invalid JSON"):
        run_validate(ValidateConfig(), raw, tmp_path / "out")
