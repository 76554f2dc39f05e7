"""Faults lose nothing: a row past a parse limit is rejected with its field, never the stage; a file or folder
that cannot be read fails the stage naming it; special files are skipped, never opened."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest

from tunepath.records import read_records
from tunepath.validate import DataValidationError, ValidateConfig, run_validate
from tunepath.validate.readers import list_data_files, read_rows, refuse_special_files

HUGE = "9" * 5000  # past Python's 4,300-digit limit for int <-> str


def chat(i: int, tag: str = "q") -> dict:
    return {"messages": [{"role": "user", "content": f"{tag} {i}"}, {"role": "assistant", "content": f"answer {i}"}]}


def write_jsonl(path: Path, n: int, tag: str = "q") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(chat(i, tag)) + "\n" for i in range(n)), encoding="utf-8")


def rejects(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "rejects.jsonl").read_text(encoding="utf-8").splitlines()]


def test_a_huge_integer_rejects_its_row_with_file_line_and_field_in_every_format(tmp_path):
    raw = tmp_path / "raw"
    write_jsonl(raw / "good.jsonl", 40)
    lines = [json.dumps(chat(i, "jsonl")) for i in range(5)]
    lines.insert(2, '{"messages": [{"role": "user", "content": "x"}], "meta": {"n": %s}}' % HUGE)
    (raw / "a.jsonl").write_text("\n".join(lines) + "\n")
    elements = [json.dumps(chat(i, "json")) for i in range(4)]
    elements.insert(1, '{"messages": [{"role": "user", "content": "x", "score": -%s}]}' % HUGE)
    (raw / "b.json").write_text("[\n" + ",\n".join(elements) + "\n]\n")
    cell = json.dumps([{"role": "user", "content": "x", "n": 1}, {"role": "assistant", "content": "y"}])
    with open(raw / "c.csv", "w", newline="") as f:
        csv.writer(f).writerows([["messages"], [json.dumps(chat(0, "csv")["messages"])],
                                 [cell.replace('"n": 1', f'"n": {HUGE}')]])
    call = {"messages": [{"role": "user", "content": "Weather?"},
                         {"role": "assistant", "content": "", "tool_calls": [
                             {"type": "function", "function": {"name": "w", "arguments": '{"n": %s}' % HUGE}}]},
                         {"role": "tool", "content": "sunny"}, {"role": "assistant", "content": "Sunny."}]}
    (raw / "d.jsonl").write_text(json.dumps(call) + "\n")

    summary = run_validate(ValidateConfig(max_reject_share=0.5), raw, tmp_path / "out")

    assert summary["read"] == 40 + 6 + 5 + 2 + 1 and summary["rejected"] == 4
    found = {(r["source"]["file"].rsplit("/", 1)[-1], r["source"]["line"]): r["reasons"] for r in rejects(tmp_path / "out")}
    assert set(found) == {("a.jsonl", 3), ("b.json", 3), ("c.csv", 3), ("d.jsonl", 1)}
    assert all(len(reasons) == 1 and reasons[0].startswith("huge_integer:") for reasons in found.values())
    assert "field 'meta.n'" in found["a.jsonl", 3][0] and "5,000 digits" in found["a.jsonl", 3][0]
    assert "field 'messages[0].score'" in found["b.json", 3][0]
    assert "field 'messages[0].n'" in found["c.csv", 3][0]
    assert "field 'messages[1].tool_calls[0].function.arguments.n'" in found["d.jsonl", 1][0]
    # the array goes on after the bad element: its later elements are accepted
    assert summary["accepted"] == summary["read"] - 4


def test_nesting_too_deep_rejects_the_row_not_the_stage(tmp_path):
    raw = tmp_path / "raw"
    write_jsonl(raw / "good.jsonl", 20)
    deep = "[" * 100_000 + "]" * 100_000
    (raw / "a.jsonl").write_text('{"messages": %s}\n' % deep)
    (raw / "b.json").write_text("[%s, %s]" % (json.dumps(chat(1, "json")), deep))
    summary = run_validate(ValidateConfig(max_reject_share=0.5), raw, tmp_path / "out")
    assert summary["rejected"] == 2 and summary["accepted"] == 21
    assert all("nested too deeply" in r["reasons"][0] for r in rejects(tmp_path / "out"))


def test_utf16_and_utf32_files_with_a_byte_order_mark_are_read_row_by_row(tmp_path):
    raw = tmp_path / "raw"
    text = "".join(json.dumps(chat(i, "ünïcode"), ensure_ascii=False) + "\n" for i in range(30))
    (raw / "sub").mkdir(parents=True)
    (raw / "a.jsonl").write_bytes(text.encode("utf-16"))  # Python writes the mark, native byte order
    (raw / "b.jsonl").write_bytes(b"\xfe\xff" + text.replace("ünïcode", "big endian").encode("utf-16-be"))
    (raw / "sub" / "c.csv").write_bytes("instruction,output\nsay hi,hi\nsay bye,bye\n".encode("utf-32"))
    summary = run_validate(ValidateConfig(), raw, tmp_path / "out")
    assert summary["read"] == summary["accepted"] == 62
    records = list(read_records(tmp_path / "out"))
    users = {r["messages"][0]["content"] for r in records if "messages" in r}
    assert {"ünïcode 0", "ünïcode 29", "big endian 0"} <= users


@pytest.mark.parametrize("name, data, expected", [
    ("a.jsonl", "".join(json.dumps(chat(i)) + "\n" for i in range(300)).encode("utf-16-le"), "UTF-16 without a byte-order mark"),
    ("a.csv", b"\xff\xfe" + "text\nhello\n".encode("utf-16-le") + b"\x00\xd8", "invalid UTF-16"),
])
def test_a_file_in_an_unreadable_encoding_fails_the_stage_naming_it(tmp_path, name, data, expected):
    raw = tmp_path / "raw"
    write_jsonl(raw / "good.jsonl", 300)
    (raw / name).write_bytes(data)
    with pytest.raises(DataValidationError, match=rf"{name}.*{expected}"):
        run_validate(ValidateConfig(), raw, tmp_path / "out")


def _parquet(rows: int, groups: int) -> bytearray:
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq

    buf = io.BytesIO()
    table = pa.Table.from_pylist([{"text": f"document number {i} " * 20} for i in range(rows)])
    pq.write_table(table, buf, row_group_size=rows // groups, compression="zstd")
    return bytearray(buf.getvalue())


def test_truncated_parquet_fails_the_stage_and_a_broken_row_group_rejects_each_of_its_rows(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    raw = tmp_path / "raw"
    write_jsonl(raw / "good.jsonl", 30)
    data = _parquet(300, 3)
    (raw / "b.parquet").write_bytes(data[: len(data) // 2])
    with pytest.raises(DataValidationError, match=r"b\.parquet is not a readable Parquet file \(truncated"):
        run_validate(ValidateConfig(), raw, tmp_path / "out")

    # footer intact, the middle row group's page header overwritten: its 100 rows are each rejected, none vanishes
    column = pq.ParquetFile(pa.BufferReader(bytes(data))).metadata.row_group(1).column(0)
    start = column.data_page_offset + 20
    data[start:start + 40] = b"\xff" * 40
    (raw / "b.parquet").write_bytes(data)
    rows = list(read_rows(raw / "b.parquet", "b.parquet"))
    assert len(rows) == 300 and [r.line for r in rows] == list(range(1, 301))
    bad = [r for r in rows if r.reasons]
    assert [r.line for r in bad] == list(range(101, 201))
    assert bad[0].reasons[0].startswith("unreadable_row_group: rows 101-200 (row group 1) of b.parquet")
    with pytest.raises(DataValidationError, match="100 of 330 rows"):
        run_validate(ValidateConfig(max_reject_share=0.1), raw, tmp_path / "out")


def _run_unprivileged(code: str, cwd: Path) -> subprocess.CompletedProcess:
    """Run code where file permissions bind: as root, without the capabilities that bypass them (CAP_DAC_*)."""
    command = [sys.executable, "-c", textwrap.dedent(code)]
    if os.geteuid() == 0:
        if not shutil.which("setpriv"):
            pytest.skip("running as root without setpriv: permissions cannot be made to bind")
        command = ["setpriv", "--bounding-set=-dac_override,-dac_read_search", *command]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=120)


PROBE = """
    from pathlib import Path
    from tunepath.validate import DataValidationError, ValidateConfig, run_validate
    try:
        summary = run_validate(ValidateConfig(), Path("raw"), Path("out"))
        print("exit 0", summary["read"])
    except DataValidationError as e:
        print("refused:", e)
"""


@pytest.mark.parametrize("target", ["sub", "sub/b.jsonl"])
def test_an_unreadable_folder_or_file_fails_the_stage_naming_it(tmp_path, target):
    raw = tmp_path / "raw"
    write_jsonl(raw / "good.jsonl", 300)
    write_jsonl(raw / "sub" / "b.jsonl", 300, "sub")
    (raw / target).chmod(0)
    try:
        result = _run_unprivileged(PROBE, tmp_path)
    finally:
        (raw / target).chmod(0o755)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("refused:"), result.stdout
    assert f"raw/{target}" in result.stdout and "Permission denied" in result.stdout
    assert ("cannot read the folder" if target == "sub" else "cannot read") in result.stdout


def test_special_files_are_skipped_with_a_warning_and_never_opened(tmp_path):
    raw = tmp_path / "raw"
    write_jsonl(raw / "good.jsonl", 30)
    os.mkfifo(raw / "pipe.jsonl")
    os.mkfifo(raw / "dataset_info.json")  # dataset_info.json is read on its own path: it must not block either
    (raw / "loop").symlink_to(raw, target_is_directory=True)
    listing = list_data_files(raw)
    assert [p.name for p in listing.files] == ["good.jsonl"]
    assert [s.split("/")[-1] for s in listing.special] == ["dataset_info.json is a FIFO (named pipe), not a regular file",
                                                            "pipe.jsonl is a FIFO (named pipe), not a regular file"]
    done: dict = {}
    worker = threading.Thread(target=lambda: done.update(run_validate(ValidateConfig(), raw, tmp_path / "out")),
                              daemon=True)
    worker.start()
    worker.join(60)
    assert done, "validate blocked on a FIFO"
    assert done["read"] == 30
    warnings = json.loads((tmp_path / "out" / "report.json").read_text())["warnings"]
    assert any("pipe.jsonl is a FIFO" in w and "never opened" in w for w in warnings)
    assert any("loop is a link to a folder" in w for w in warnings)
    # DVC hashes every file of the data folder and would block on the FIFO: the run refuses first
    with pytest.raises(DataValidationError, match="pipe.jsonl is a FIFO.*DVC"):
        refuse_special_files(raw)
