"""JSON arrays and CSV files stream in chunks: cut where one pass would be between rows, read as one pass.

Each file is read twice: whole (`read_rows`) and cut by the planner into chunks of a few bytes to a few KB, each
chunk read alone. The rows, their line numbers, raw text and reasons must be the same, including the rows that
are malformed in the middle of the file; then the whole stage runs on a pool over small chunks and its
rejects name the file, the line and the field of the bad rows.
"""

from __future__ import annotations

import csv
import io
import json
import random

import pytest

from tunepath.records import read_records
from tunepath.sections import DataConfig
from tunepath.validate import ValidateConfig, run_validate, stream
from tunepath.validate.cuts import plan_csv, plan_json_array
from tunepath.validate.readers import read_csv_range, read_json_range, read_rows


def _rows(rows):
    return [(r.line, r.raw, r.value, r.reasons) for r in rows]


def _json_cut(path, chunk_bytes):
    rows = []
    for start, end, line, column, elements, last in plan_json_array(path, chunk_bytes):
        rows += read_json_range(path, path.name, start, end, line, column, elements, last)
    return _rows(rows)


def _csv_cut(path, chunk_bytes):
    rows = []
    for start, end, line, header in plan_csv(path, chunk_bytes):
        rows += read_csv_range(path, path.name, start, end, line, header)
    return _rows(rows)


def _elements(rng: random.Random, n: int) -> list[str]:
    out = []
    for i in range(n):
        value = rng.choice([
            {"instruction": f"say {i}", "output": "a [tricky], {string} with \"quotes\" \\ and \u00e9t\u00e9 \u4e2d"},
            {"messages": [{"role": "user", "content": f"q{i}\nline two"}, {"role": "assistant", "content": "[1, 2]"}]},
            [1, 2.5, -3e4, True, None, "x"],
            12345678901234567890,
            f"just a string {i}",
        ])
        out.append(json.dumps(value, ensure_ascii=rng.random() < 0.5, indent=rng.choice([None, 2])))
    return out


def _array(rng: random.Random, elements: list[str]) -> str:
    seps = [rng.choice([",", ", ", ",\n", "\n,\n  ", ",\r\n"]) for _ in elements]
    return "[\n  " + "".join(e + s for e, s in zip(elements[:-1], seps)) + elements[-1]


@pytest.mark.parametrize("chunk_bytes", [1, 7, 60, 1000, 1 << 20])
@pytest.mark.parametrize("ending", ["\n]\n", ",\n]", "\n]\n trailing junk", "", "\n,  {\"a\": tru", "\n}"])
def test_json_array_cut_reads_as_one_pass(tmp_path, chunk_bytes, ending):
    rng = random.Random(chunk_bytes)
    elements = _elements(rng, 80)
    elements[40] = '{"instruction": "bad \xff byte", "output": "x"}'  # invalid UTF-8 inside one element
    elements[50] = '{"n": ' + "9" * 5000 + "}"  # past Python's digit limit: only this element is rejected
    path = tmp_path / "data.json"
    path.write_bytes(b"\xef\xbb\xbf" + _array(rng, elements).encode("utf-8", errors="surrogateescape") + ending.encode())
    whole = _rows(read_rows(path, path.name))
    assert len(whole) >= 80
    assert _json_cut(path, chunk_bytes) == whole


@pytest.mark.parametrize("chunk_bytes", [1, 7, 60, 1000])
def test_json_array_malformed_in_the_middle_quarantines_the_rest_as_one_pass(tmp_path, chunk_bytes):
    rng = random.Random(3)
    elements = _elements(rng, 60)
    elements[30] = '{"instruction": "cut off", "output": }'
    path = tmp_path / "data.json"
    path.write_text(_array(rng, elements) + "\n]\n", encoding="utf-8")
    whole = _rows(read_rows(path, path.name))
    assert len(whole) == 31 and "element 31 of the JSON array is malformed" in whole[-1][3][0]
    assert _json_cut(path, chunk_bytes) == whole


def test_json_that_is_not_an_array_is_not_planned(tmp_path):
    (tmp_path / "one.json").write_text('{"text": "a single value"}', encoding="utf-8")
    (tmp_path / "lines.json").write_text('{"text": "a"}\n{"text": "b"}\n', encoding="utf-8")
    assert list(plan_json_array(tmp_path / "one.json", 10)) == []
    assert list(plan_json_array(tmp_path / "lines.json", 10)) == []


def _csv_text(rng: random.Random, rows: int) -> str:
    out = io.StringIO(newline="")
    writer = csv.writer(out, lineterminator=rng.choice(["\n", "\r\n"]))
    writer.writerow(["instruction", "output"])
    for i in range(rows):
        cell = rng.choice([f"plain {i}", f"quoted, with comma {i}", f"two\nlines {i}", f'a "quote" {i}', "\u00e9t\u00e9"])
        writer.writerow([f"ask {i}", cell])
        if i % 17 == 0:
            out.write(f"ask {i},too,many\n")  # a row with a field too many
        if i % 23 == 0:
            out.write(",\n")  # a blank row: skipped, as in one pass
    return out.getvalue()


@pytest.mark.parametrize("chunk_bytes", [1, 7, 60, 1000, 1 << 20])
@pytest.mark.parametrize("tail", ["", 'ask end,"never closed\nmore\n', "ask x,\xff bad\n"])
def test_csv_cut_reads_as_one_pass(tmp_path, chunk_bytes, tail):
    rng = random.Random(chunk_bytes)
    path = tmp_path / "data.csv"
    path.write_bytes(b"\xef\xbb\xbf" + (_csv_text(rng, 70) + tail).encode("utf-8", errors="surrogateescape"))
    whole = _rows(read_rows(path, path.name))
    assert len(whole) > 70
    assert _csv_cut(path, chunk_bytes) == whole


def test_csv_without_a_header_is_not_planned(tmp_path):
    (tmp_path / "empty.csv").write_text("", encoding="utf-8")
    assert list(plan_csv(tmp_path / "empty.csv", 10)) == []


@pytest.fixture(scope="module")
def big(tmp_path_factory):
    """A JSON array and a CSV file of 3,000 rows each, with bad rows in the middle, through the stage twice."""
    root = tmp_path_factory.mktemp("raw")
    items = [{"instruction": f"question {i} " + "word " * (i % 13), "output": f"answer {i} " + "more " * (i % 7)}
             for i in range(3000)]
    items[1500] = {"instruction": "no output here"}
    items[1501] = {"instruction": "empty output", "output": "   "}
    (root / "alpaca.json").write_text(json.dumps(items, indent=2), encoding="utf-8")
    out = io.StringIO(newline="")
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["instruction", "output"])
    for i in range(3000):
        writer.writerow([f"csv question {i}\nover two lines" if i % 5 == 0 else f"csv question {i}", f"csv answer {i}"])
        if i == 1700:
            out.write("one field only\n")
    (root / "pairs.csv").write_text(out.getvalue(), encoding="utf-8")
    cfg = ValidateConfig(max_reject_share=0.5)
    whole = tmp_path_factory.mktemp("whole")
    run_validate(cfg, root, whole, data=DataConfig(num_proc=1))
    chunked = tmp_path_factory.mktemp("chunked")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(stream, "CHUNK_BYTES", 20_000)
        mp.setattr(stream, "WORKER_BASE", 1)
        mp.setattr(stream, "WORKER_EXPANSION", 1)
        run_validate(cfg, root, chunked, data=DataConfig(num_proc=2))
    return root, whole, chunked


def _line_of(path, needle: str) -> int:
    return next(i for i, line in enumerate(path.read_text(encoding="utf-8").split("\n"), 1) if needle in line)


def test_stage_streams_json_arrays_and_csv_with_exact_rejects(big):
    root, whole, chunked = big
    report = json.loads((chunked / "report.json").read_text())
    assert report["streaming"]["chunks"] > 10 and report["streaming"]["workers"] == 2
    assert not [w for w in report.get("warnings", []) if "read whole" in w]
    assert report["totals"]["read"] == 6001 and report["totals"]["rejected"] == 3
    rejects = {(r["source"]["file"].rsplit("/", 1)[-1], r["source"]["line"]): r["reasons"]
               for r in map(json.loads, (chunked / "rejects.jsonl").read_text(encoding="utf-8").splitlines())}
    no_output = _line_of(root / "alpaca.json", '"no output here"') - 1  # the element's '{' line
    empty = _line_of(root / "alpaca.json", '"empty output"') - 1
    short = _line_of(root / "pairs.csv", "one field only")
    assert set(rejects) == {("alpaca.json", no_output), ("alpaca.json", empty), ("pairs.csv", short)}
    assert any("'output'" in r for r in rejects[("alpaca.json", no_output)])
    assert rejects[("alpaca.json", empty)] == ["empty_answer: messages[1] (assistant) is empty or whitespace only"]
    assert rejects[("pairs.csv", short)] == ["bad_csv: the row has 1 fields but the header has 2"]
    lines = {(r["source"]["file"].rsplit("/", 1)[-1], r["source"]["line"]) for r in read_records(chunked)}
    assert ("pairs.csv", short + 1) in lines and ("alpaca.json", empty + 4) in lines


def test_stage_chunked_equals_one_pass(big):
    _, whole, chunked = big

    def outputs(out):
        report = json.loads((out / "report.json").read_text())
        for key in ("timings_s", "cpu_s", "streaming"):
            report.pop(key)
        return [line for line in (out / "rejects.jsonl").read_text().splitlines()], report, \
            [json.dumps(r, sort_keys=True) for r in read_records(out)]

    assert outputs(chunked) == outputs(whole)
