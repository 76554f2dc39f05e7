"""Read raw data files into rows: one `RawRow` per JSONL line, JSON array element, CSV row, Parquet row or text block.

Readers never raise on bad content: a row that cannot be read becomes a `RawRow` with reasons, so it is
quarantined with its location and raw text instead of crashing the stage or vanishing.
"""

from __future__ import annotations

import csv
import io
import json
import re
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

JSONL_SUFFIXES = (".jsonl", ".ndjson")
DATA_SUFFIXES = (*JSONL_SUFFIXES, ".json", ".parquet", ".csv", ".txt")
BOM = "\ufeff"
_BLANK_LINE = re.compile(r"\n[ \t\f\v]*\n\s*")
_WHITESPACE = re.compile(r"\s*")


@dataclass(slots=True)
class RawRow:
    """One input row as read: where it came from, its raw text, the parsed value (or why it could not be read)."""

    file: str
    line: int
    raw: str
    value: object = None
    reasons: list[str] = field(default_factory=list)
    origin: str = "json"  # "json", "csv", "parquet" or "text": how lenient the normaliser may be with types


@dataclass(slots=True)
class FileListing:
    files: list[Path]
    skipped: list[Path]


DATASET_INFO = "dataset_info.json"


def list_data_files(raw_dir: Path) -> FileListing:
    """Data files under raw_dir, recursively and sorted; hidden files/folders, DVC pointer files and LLaMA-Factory's
    dataset_info.json (a description of the other files, read by `dataset_info`) are ignored."""
    files, skipped = [], []
    for path in sorted(p for p in raw_dir.rglob("*") if p.is_file()):
        rel = path.relative_to(raw_dir)
        if any(part.startswith(".") for part in rel.parts) or path.suffix == ".dvc" or path.name == DATASET_INFO:
            continue
        (files if path.suffix.lower() in DATA_SUFFIXES else skipped).append(path)
    return FileListing(files, skipped)


def read_rows(path: Path, display: str, text_split: str = "blank_line") -> Iterator[RawRow]:
    """Yield every row of one data file; `display` is the file name written into records and rejects."""
    suffix = path.suffix.lower()
    try:
        if suffix in JSONL_SUFFIXES:  # streamed: the file is never held twice in memory
            with open(path, "rb") as f:
                head = f.read(8192)
                if not looks_binary(head):
                    f.seek(0)
                    yield from _read_jsonl((b.decode("utf-8", errors="surrogateescape") for b in f), display)
                    return
            data = head
        else:
            data = path.read_bytes()
    except OSError as e:
        yield RawRow(display, 0, "", reasons=[f"unreadable_file: cannot read {display}: {e}"])
        return
    if suffix == ".parquet":
        yield from _read_parquet(data, display)
        return
    if looks_binary(data):
        # report the file once instead of one garbage row per line
        yield RawRow(display, 1, _replace(data[:1000]), reasons=[
            f"binary_file: {display} is mostly control bytes: it is not a UTF-8 text file (binary, compressed or "
            f"UTF-16?); save it as UTF-8 {suffix}"])
        return
    # surrogateescape keeps invalid bytes recoverable, so only the rows that hold them are rejected
    text = data.decode("utf-8", errors="surrogateescape").removeprefix(BOM)
    if suffix == ".json":
        yield from _read_json(text, display)
    elif suffix == ".csv":
        yield from _read_csv(text, display)
    else:
        yield from _read_text(text, display, text_split)


_CONTROL_BYTES = bytes([*range(0x00, 0x09), *range(0x0E, 0x20), 0x7F])


def looks_binary(data: bytes) -> bool:
    """More than 5% control bytes in the first 8 KiB: random bytes have about 11%, text with a stray byte ~0%."""
    sample = data[:8192]
    if not sample:
        return False
    controls = len(sample) - len(sample.translate(None, _CONTROL_BYTES))
    return controls > 0.05 * len(sample)


def has_invalid_utf8(s: str) -> bool:
    """True when s holds bytes that were not valid UTF-8 (surrogate escapes) or lone surrogates from JSON escapes."""
    if s.isascii():
        return False
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def _replace(b: bytes) -> str:
    return b.decode("utf-8", errors="replace")


def _printable(s: str) -> str:
    """The raw text as it would read with invalid bytes decoded with replacement (safe to write as UTF-8)."""
    if not has_invalid_utf8(s):
        return s
    return s.encode("utf-8", errors="surrogateescape").decode("utf-8", errors="replace").encode(
        "utf-8", errors="replace").decode("utf-8")


def _invalid_utf8(display: str, line: int, raw: str, origin: str = "json") -> RawRow:
    return RawRow(display, line, _printable(raw), origin=origin, reasons=[
        "invalid_utf8: the row contains bytes that are not valid UTF-8 (or a lone surrogate escape); "
        "re-encode the file as UTF-8"])


def _parse_json(display: str, line: int, raw: str, origin: str = "json") -> RawRow:
    if has_invalid_utf8(raw):
        return _invalid_utf8(display, line, raw, origin)
    try:
        value = json.loads(raw)
    except json.JSONDecodeError as e:
        return RawRow(display, line, raw, reasons=[f"bad_json: {e.msg}, column {e.colno} (a truncated or malformed line?)"])
    except RecursionError:
        return RawRow(display, line, raw, reasons=["bad_json: nested too deeply to parse"])
    return RawRow(display, line, raw, value, origin=origin)


def _read_jsonl(lines: Iterable[str], display: str) -> Iterator[RawRow]:
    # lines split on \n only: str.splitlines would also split on separators that are legal inside JSON strings
    for number, line in enumerate(lines, 1):
        line = line.rstrip("\r\n")
        if not line or line.isspace():
            continue
        # a BOM starts the file, or a line where files that each had one were concatenated
        yield _parse_json(display, number, line[1:] if line[0] == BOM else line)


def _read_json(text: str, display: str) -> Iterator[RawRow]:
    start = _WHITESPACE.match(text).end()
    if start == len(text):
        return
    if text[start] != "[":
        value_row = _parse_json(display, text.count("\n", 0, start) + 1, text[start:].rstrip())
        if value_row.reasons and "Extra data" in value_row.reasons[0]:
            # a JSONL file saved as .json: one object per line
            yield from _read_jsonl(text.split("\n"), display)
        else:
            yield value_row
        return
    yield from _read_json_array(text, display, start + 1)


def _read_json_array(text: str, display: str, pos: int) -> Iterator[RawRow]:
    """Parse array elements one by one, so a file cut off mid-way still yields its complete elements."""
    decoder = json.JSONDecoder()
    line, counted = 1, 0
    n = len(text)
    elements = 0
    while True:
        pos = _WHITESPACE.match(text, pos).end()
        line += text.count("\n", counted, pos)
        counted = pos
        if pos >= n:
            yield RawRow(display, line, "", reasons=[
                f"bad_json: the JSON array is not closed after {elements} elements: the file looks cut off"])
            return
        if text[pos] == "]":  # empty array, or a trailing comma after the last element
            yield from _trailing(text, display, pos + 1, line)
            return
        try:
            value, end = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as e:
            yield RawRow(display, line, _printable(text[pos:]), reasons=[
                f"bad_json: element {elements + 1} of the JSON array is malformed or cut off ({e.msg} at line {e.lineno}"
                f" column {e.colno}); the rest of the file from this line is quarantined"])
            return
        except RecursionError:
            yield RawRow(display, line, _printable(text[pos:]), reasons=[
                f"bad_json: element {elements + 1} is nested too deeply; the rest of the file is quarantined"])
            return
        raw = text[pos:end]
        elements += 1
        yield _invalid_utf8(display, line, raw) if has_invalid_utf8(raw) else RawRow(display, line, raw, value)
        pos = _WHITESPACE.match(text, end).end()
        if pos < n and text[pos] == ",":
            pos += 1
        elif pos < n and text[pos] == "]":
            line += text.count("\n", counted, pos)
            yield from _trailing(text, display, pos + 1, line)
            return
        elif pos < n:
            line += text.count("\n", counted, pos)
            yield RawRow(display, line, _printable(text[pos:]), reasons=[
                f"bad_json: expected ',' or ']' after element {elements}; the rest of the file is quarantined"])
            return


def _trailing(text: str, display: str, pos: int, line: int) -> Iterator[RawRow]:
    rest = text[pos:]
    if rest.strip():
        yield RawRow(display, line, _printable(rest.strip()), reasons=["bad_json: extra content after the closing ']'"])


def _read_csv(text: str, display: str) -> Iterator[RawRow]:
    lines = text.split("\n")
    old_limit = csv.field_size_limit()
    csv.field_size_limit(sys.maxsize)  # the default 128 KiB limit would crash on one long document
    try:
        reader = csv.reader(io.StringIO(text, newline=""))
        try:
            header = next(reader, None)
        except csv.Error as e:
            yield RawRow(display, 1, _printable(lines[0]), reasons=[f"bad_csv: cannot read the header: {e}"])
            return
        if header is None:
            return
        header = [h.strip() for h in header]
        previous = reader.line_num
        while True:
            try:
                cells = next(reader)
            except StopIteration:
                return
            except csv.Error as e:
                raw = "\n".join(lines[previous:])
                yield RawRow(display, previous + 1, _printable(raw), reasons=[
                    f"bad_csv: {e}; the rest of the file is quarantined"])
                return
            start, previous = previous + 1, reader.line_num
            raw = "\n".join(line.removesuffix("\r") for line in lines[start - 1:previous])
            if not cells or all(not c.strip() for c in cells):
                continue
            if has_invalid_utf8(raw):
                yield _invalid_utf8(display, start, raw, "csv")
            elif len(cells) != len(header):
                yield RawRow(display, start, raw, origin="csv", reasons=[
                    f"bad_csv: the row has {len(cells)} fields but the header has {len(header)}"])
            else:
                yield RawRow(display, start, raw, dict(zip(header, cells)), origin="csv")
    finally:
        csv.field_size_limit(old_limit)


def _read_parquet(data: bytes, display: str) -> Iterator[RawRow]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        rows = pq.read_table(pa.BufferReader(data)).to_pylist()
    except Exception as e:  # pyarrow raises several types for corrupt files; all mean the same to the user
        yield RawRow(display, 0, _replace(data[:1000]), reasons=[f"unreadable_file: {display} is not a readable Parquet file: {e}"])
        return
    for number, value in enumerate(rows, 1):  # line = row number for Parquet
        yield RawRow(display, number, json.dumps(value, ensure_ascii=False, default=str), value, origin="parquet")


def _read_text(text: str, display: str, text_split: str) -> Iterator[RawRow]:
    text = text.replace("\r\n", "\n")
    if text_split == "file":
        blocks = [(1, text)] if text.strip() else []
    elif text_split == "line":
        blocks = list(enumerate(text.split("\n"), 1))
    else:
        blocks, line, pos = [], 1, 0
        for m in _BLANK_LINE.finditer(text):
            blocks.append((line, text[pos:m.start()]))
            line += text.count("\n", pos, m.end())
            pos = m.end()
        blocks.append((line, text[pos:]))
    for line, block in blocks:
        stripped_start = len(block) - len(block.lstrip())
        line += block.count("\n", 0, stripped_start)
        block = block.strip()
        if not block:
            continue
        if has_invalid_utf8(block):
            yield _invalid_utf8(display, line, block, "text")
        else:
            yield RawRow(display, line, block, {"text": block}, origin="text")
