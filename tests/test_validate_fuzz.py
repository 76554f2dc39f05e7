"""Fuzzing: thousands of mutated lines never crash the stage, and read = accepted + rejected always holds."""

from __future__ import annotations

import copy
import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tunepath.validate import DataValidationError, ValidateConfig, run_validate
from tunepath.validate.formats import Normaliser
from tunepath.validate.readers import read_rows
from tunepath.validate.stage import record_id

SEEDS = [
    {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi?"},
                  {"role": "assistant", "content": "Hello."}]},
    {"conversations": [{"from": "human", "value": "2+2?"}, {"from": "gpt", "value": "4"}], "system": "Maths."},
    {"instruction": "Translate", "input": "chat", "output": "cat", "history": [["Hi", "Hello"]]},
    {"text": "A plain document of some length for pretraining."},
    {"prompt": [{"role": "user", "content": "Q?"}], "chosen": "Yes.", "rejected": [{"role": "assistant", "content": "No."}]},
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
    if b"\x00" in data[:8192]:
        return 1  # reported once as a binary file
    text = data.removeprefix(b"\xef\xbb\xbf").decode("utf-8", "surrogateescape")
    return sum(1 for line in text.split("\n") if line.removesuffix("\r").strip())


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(lines=st.lists(mutated_lines(), min_size=1, max_size=15))
def test_reader_and_normaliser_never_raise(tmp_path, lines):
    data = b"\n".join(lines)
    path = tmp_path / "fuzz.jsonl"
    path.write_bytes(data)
    normaliser = Normaliser(ValidateConfig())
    rows = list(read_rows(path, "fuzz.jsonl"))
    assert len(rows) == _non_blank_lines(data)  # one row per line: nothing dropped silently
    for row in rows:
        if row.reasons:
            continue
        out = normaliser.normalise(row)
        assert bool(out.reasons) != bool(out.fields)
        if out.fields:  # an accepted row must be hashable and writable as UTF-8 JSON
            record_id(out.kind, out.fields)
            json.dumps(out.fields, ensure_ascii=False).encode("utf-8")
        json.dumps({"raw": row.raw, "reasons": out.reasons}, ensure_ascii=False).encode("utf-8")


@settings(max_examples=3, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                  HealthCheck.data_too_large, HealthCheck.too_slow])
@given(lines=st.lists(mutated_lines(), min_size=300, max_size=800))
def test_whole_stage_on_mutated_files(tmp_path_factory, lines):
    tmp = tmp_path_factory.mktemp("fuzz")
    (tmp / "raw").mkdir()
    half = len(lines) // 2
    (tmp / "raw" / "a.jsonl").write_bytes(b"\n".join(lines[:half]))
    (tmp / "raw" / "b.jsonl").write_bytes(b"\r\n".join(lines[half:]))
    try:
        summary = run_validate(ValidateConfig(max_reject_share=1.0), tmp / "raw", tmp / "out")
    except DataValidationError as e:
        assert "no usable rows" in str(e)
        report = json.loads((tmp / "out" / "report.json").read_text())
        summary = report["totals"]
    assert summary["read"] == summary["accepted"] + summary["rejected"]
    assert summary["read"] == sum(_non_blank_lines(b"\n".join(part)) for part in (lines[:half], lines[half:]))
    written = sum(1 for _ in open(tmp / "out" / "records.jsonl", encoding="utf-8"))
    quarantined = sum(1 for _ in open(tmp / "out" / "rejects.jsonl", encoding="utf-8"))
    assert (written, quarantined) == (summary["accepted"], summary["rejected"])


@pytest.mark.parametrize("seed", range(len(SEEDS)))
def test_seeds_are_valid(seed):
    from tunepath.validate.readers import RawRow

    out = Normaliser(ValidateConfig()).normalise(RawRow("s", 1, "", SEEDS[seed]))
    assert out.reasons == []
