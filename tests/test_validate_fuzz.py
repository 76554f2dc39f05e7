"""Fuzzing: thousands of mutated lines never crash the stage, and read = accepted + rejected always holds."""

from __future__ import annotations

import copy
import json
import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tunepath.records import read_records
from tunepath.validate import DataValidationError, ValidateConfig, run_validate
from tunepath.validate.formats import Normaliser
from tunepath.validate.readers import looks_binary, read_rows
from tunepath.validate.stage import record_id

SEEDS = [
    {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi?"},
                  {"role": "assistant", "content": "Hello."}]},
    {"conversations": [{"from": "human", "value": "2+2?"}, {"from": "gpt", "value": "4"}], "system": "Maths."},
    {"instruction": "Translate", "input": "chat", "output": "cat", "history": [["Hi", "Hello"]]},
    {"text": "A plain document of some length for pretraining."},
    {"prompt": [{"role": "user", "content": "Q?"}], "chosen": "Yes.", "rejected": [{"role": "assistant", "content": "No."}]},
    # the layouts of issue 13: mutating them gives broken call JSON, unknown tool names, dangling results,
    # mixed part types and labels that are not booleans
    {"tools": [{"type": "function", "function": {"name": "w", "parameters": {"type": "object"}}}], "messages": [
        {"role": "user", "content": "Weather?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "w", "arguments": '{"city": "Oslo"}'}}]},
        {"role": "tool", "tool_call_id": "c1", "name": "w", "content": "cold"},
        {"role": "assistant", "content": "Cold.", "reasoning_content": "It said cold."}]},
    {"tools": '[{"name": "w", "parameters": {}}]', "conversations": [
        {"from": "human", "value": "Weather?"}, {"from": "function_call", "value": '{"name": "w", "arguments": {"c": 1}}'},
        {"from": "observation", "value": "cold"}, {"from": "gpt", "value": "<think>ok</think>Cold."}]},
    {"conversations": [{"from": "human", "value": "Best?"}], "chosen": {"from": "gpt", "value": "A."},
     "rejected": {"from": "gpt", "value": "B."}},
    {"chosen": "\n\nHuman: Hi?\n\nAssistant: Hello.", "rejected": "\n\nHuman: Hi?\n\nAssistant: Go."},
    {"messages": [{"role": "user", "content": [{"type": "text", "text": "Hi"}, {"type": "text", "value": "?"}]},
                  {"role": "assistant", "content": [{"type": "text", "text": "Hello."}]}], "label": True},
]
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=6,
)


def _paths(value, path=()):
    yield path
    if isinstance(value, dict):
        for k, v in value.items():
            yield from _paths(v, (*path, k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from _paths(v, (*path, i))


@st.composite
def mutated_lines(draw) -> bytes:
    obj = copy.deepcopy(draw(st.sampled_from(SEEDS)))
    for _ in range(draw(st.integers(0, 2))):  # structural mutations: replace or delete any node
        path = draw(st.sampled_from(list(_paths(obj))))
        if not path:
            obj = draw(json_values)
            continue
        parent = obj
        for key in path[:-1]:
            parent = parent[key]
        if draw(st.booleans()):
            parent[path[-1]] = draw(json_values)
        else:
            del parent[path[-1]]
    line = json.dumps(obj, ensure_ascii=draw(st.booleans())).encode("utf-8", "surrogatepass")
    op = draw(st.sampled_from(["keep", "keep", "truncate", "insert", "delete", "bom", "crlf"]))
    at = draw(st.integers(0, len(line)))
    if op == "truncate":
        line = line[:at]
    elif op == "insert":
        line = line[:at] + draw(st.binary(min_size=1, max_size=6)) + line[at:]
    elif op == "delete":
        line = line[:at] + line[at + draw(st.integers(1, 10)):]
    elif op == "bom":
        line = b"\xef\xbb\xbf" + line
    elif op == "crlf":
        line += b"\r"
    return line


def _non_blank_lines(data: bytes) -> int:
    if looks_binary(data):
        return 1  # reported once as a binary file
    text = data.removeprefix(b"\xef\xbb\xbf").decode("utf-8", "surrogateescape")
    return sum(1 for line in text.split("\n") if line.removesuffix("\r").strip())


def _random_value(rng: random.Random, depth: int = 0):
    kind = rng.randrange(8 if depth < 2 else 6)
    if kind == 6:
        return [_random_value(rng, depth + 1) for _ in range(rng.randrange(3))]
    if kind == 7:
        return {"role": _random_value(rng, depth + 1), "content": _random_value(rng, depth + 1)}
    return [None, True, rng.randint(-9, 10**20), rng.random(), "",
            "".join(chr(rng.randrange(0x20, 0x3000)) for _ in range(5))][kind]


def _get(value, path):
    for key in path:
        value = value[key]
    return value


def random_mutated_line(rng: random.Random) -> bytes:
    """The same mutations as `mutated_lines`, drawn from a seeded random generator (fast for big files)."""
    obj = copy.deepcopy(rng.choice(SEEDS))
    leaves = [p for p in _paths(obj) if p and isinstance(_get(obj, p), str)]
    path = rng.choice(leaves)  # vary the content, or most rows would only be duplicates of the seeds
    _get(obj, path[:-1])[path[-1]] += f" {rng.randrange(10**9)}"
    for _ in range(rng.randrange(3)):
        path = rng.choice(list(_paths(obj)))
        value = _random_value(rng)
        if not path:
            obj = value
            continue
        parent = obj
        for key in path[:-1]:
            parent = parent[key]
        if rng.random() < 0.5:
            parent[path[-1]] = value
        else:
            del parent[path[-1]]
    line = json.dumps(obj, ensure_ascii=rng.random() < 0.5).encode("utf-8", "surrogatepass")
    at = rng.randrange(len(line) + 1)
    op = rng.choice(["keep", "keep", "keep", "truncate", "insert", "delete", "bom", "crlf"])
    if op == "truncate":
        line = line[:at]
    elif op == "insert":
        line = line[:at] + rng.randbytes(rng.randint(1, 6)) + line[at:]
    elif op == "delete":
        line = line[:at] + line[at + rng.randint(1, 10):]
    elif op == "bom":
        line = b"\xef\xbb\xbf" + line
    elif op == "crlf":
        line += b"\r"
    return line


@settings(max_examples=3, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(seed=st.integers(0, 2**32 - 1))
def test_whole_stage_on_thousands_of_mutated_lines(tmp_path_factory, seed):
    rng = random.Random(seed)
    lines = [random_mutated_line(rng) for _ in range(1500)]
    tmp = tmp_path_factory.mktemp("fuzz")
    (tmp / "raw").mkdir()
    half = len(lines) // 2
    (tmp / "raw" / "a.jsonl").write_bytes(b"\n".join(lines[:half]))
    (tmp / "raw" / "b.jsonl").write_bytes(b"\r\n".join(lines[half:]))
    try:
        summary = run_validate(ValidateConfig(max_reject_share=1.0), tmp / "raw", tmp / "out")
    except DataValidationError as e:
        assert "no usable rows" in str(e)
        summary = json.loads((tmp / "out" / "report.json").read_text())["totals"]
    assert summary["read"] == summary["accepted"] + summary["rejected"]
    assert summary["read"] == sum(_non_blank_lines(b"\n".join(part)) for part in (lines[:half], lines[half:]))
    written = sum(1 for _ in read_records(tmp / "out"))
    quarantined = sum(1 for _ in open(tmp / "out" / "rejects.jsonl", encoding="utf-8"))
    assert (written, quarantined) == (summary["accepted"], summary["rejected"])
    assert 0 < summary["rejected"] < summary["read"]


@pytest.mark.parametrize("seed", range(len(SEEDS)))
def test_seeds_are_valid(seed):
    from tunepath.validate.readers import RawRow

    out = Normaliser(ValidateConfig()).normalise(RawRow("s", 1, "", SEEDS[seed]))
    assert out.reasons == []
