"""Read raw data files into rows: one `RawRow` per JSONL line, JSON array element, CSV row, Parquet row or text block.

Readers never raise on bad content: a row that cannot be read becomes a `RawRow` with reasons, so it is
quarantined with its location and raw text instead of crashing the stage or vanishing.
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
import stat
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from tunepath.validate.jsontext import huge_integer, huge_integer_message, huge_integer_reason

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
    whole_file: bool = False  # the file itself cannot be read: its rows cannot be counted, so the stage fails


@dataclass(slots=True)
class FileListing:
    files: list[Path]
    skipped: list[Path]
    special: list[str] = field(default_factory=list)  # FIFOs, sockets, devices: named, never opened
    links: list[str] = field(default_factory=list)  # links to folders: not followed (a loop would never end)


DATASET_INFO = "dataset_info.json"

_SPECIAL = ((stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a character device"),
            (stat.S_ISBLK, "a block device"))


def special_kind(mode: int) -> str | None:
    return next((name for test, name in _SPECIAL if test(mode)), None)


def list_data_files(raw_dir: Path) -> FileListing:
    """Data files under raw_dir, recursively and sorted; hidden files/folders, DVC pointer files and LLaMA-Factory's
    dataset_info.json (a description of the other files, read by `dataset_info`) are ignored.

    A folder that cannot be listed raises DataValidationError naming it: its rows could not even be counted.
    FIFOs, sockets and devices are listed in `special` and never opened (a FIFO would block the read forever).
    """
    from tunepath.validate.config import DataValidationError

    files, skipped, special, links = [], [], [], []
    folders = [raw_dir]
    while folders:
        folder = folders.pop()
        try:
            with os.scandir(folder) as it:
                entries = list(it)
        except OSError as e:
            raise DataValidationError(
                f"cannot read the folder '{folder}' ({e.strerror or e}): the rows of its files cannot be counted, so "
                "validate stops; fix its permissions or move it out of the data folder") from e
        for entry in entries:
            if entry.name.startswith("."):
                continue
            path = Path(entry.path)
            try:
                mode = entry.stat().st_mode  # follows links; never opens the file
            except OSError:
                mode = None  # a broken link: reading it names the file and the cause
            if mode is not None and stat.S_ISDIR(mode):
                if entry.is_symlink():
                    links.append(f"{path} is a link to a folder, which is not followed")
                else:
                    folders.append(path)
                continue
            kind = special_kind(mode) if mode is not None else None
            if kind:
                special.append(f"{path} is {kind}, not a regular file")
            elif path.suffix == ".dvc" or path.name == DATASET_INFO:
                continue
            else:
                (files if path.suffix.lower() in DATA_SUFFIXES else skipped).append(path)
    return FileListing(sorted(files), sorted(skipped), sorted(special), sorted(links))


def refuse_special_files(raw_dir: Path) -> None:
    """Before DVC hashes the data folder: it opens every file there, and blocks forever on a FIFO."""
    from tunepath.validate.config import DataValidationError

    if not Path(raw_dir).is_dir():
        return  # the validate stage says what to do about a missing folder
    special = list_data_files(Path(raw_dir)).special
    if special:
        raise DataValidationError(
            f"{'; '.join(special[:5])}{f' (and {len(special) - 5} more)' if len(special) > 5 else ''}: DVC hashes "
            "every file of data.raw_dir and would block reading a special file; move it out of the data folder")


def read_rows(path: Path, display: str, text_split: str = "blank_line") -> Iterator[RawRow]:
    """Yield every row of one data file; `display` is the file name written into records and rejects.

    A file that cannot be read at all (permissions, I/O error, binary, a broken Parquet footer) gives one row with
    `whole_file` set: the stage fails naming it, since its rows cannot be counted.
    """
    suffix = path.suffix.lower()
    try:
        with open(path, "rb") as f:
            head = f.read(8192)
            codec = bom_codec(head)
            if suffix in JSONL_SUFFIXES and codec is None and not looks_binary(head):
                # streamed: the file is never held twice in memory
                f.seek(0)
                yield from _read_jsonl((b.decode("utf-8", errors="surrogateescape") for b in f), display)
                return
            data = head + f.read()
    except OSError as e:
        yield _unreadable(display, f"cannot read {display}: {e.strerror or e}")
        return
    if suffix == ".parquet":
        yield from _read_parquet(data, display)
        return
    if codec is not None:
        try:
            text = data.decode(codec)
        except UnicodeDecodeError as e:
            yield _unreadable(display, f"{display} starts with a {codec.upper()} byte-order mark but holds invalid "
                                       f"{codec.upper()} at byte {e.start}; save it as UTF-8 {suffix}")
            return
        text = text.removeprefix(BOM)
    elif looks_binary(data):
        yield _unreadable(display, f"{display} is mostly control bytes: it is not a UTF-8 text file ({_guess(data)}); "
                                   f"save it as UTF-8 {suffix}", code="binary_file", raw=_replace(data[:1000]))
        return
    else:
        # surrogateescape keeps invalid bytes recoverable, so only the rows that hold them are rejected
        text = data.decode("utf-8", errors="surrogateescape").removeprefix(BOM)
    if suffix in JSONL_SUFFIXES:
        yield from _read_jsonl(text.split("\n"), display)
    elif suffix == ".json":
        yield from _read_json(text, display)
    elif suffix == ".csv":
        yield from _read_csv(text, display)
    else:
        yield from _read_text(text, display, text_split)


def read_jsonl_range(path: Path, display: str, start: int, end: int, first_line: int) -> Iterator[RawRow]:
    """The rows of bytes [start, end) of a UTF-8 JSONL file, cut at line ends; `first_line`: the line at `start`.

    Decoded at once with surrogateescape: no character spans a line end, so each line reads as in `read_rows`."""
    text = _range_text(path, display, start, end)
    if isinstance(text, RawRow):
        yield text
        return
    yield from _read_jsonl(text.split("\n"), display, first_line)


def _range_text(path: Path, display: str, start: int, end: int) -> str | RawRow:
    """Bytes [start, end) of the file decoded with surrogateescape, or the row saying why they cannot be read."""
    try:
        with open(path, "rb") as f:
            f.seek(start)
            data = f.read(end - start)
    except OSError as e:
        return _unreadable(display, f"cannot read {display}: {e.strerror or e}")
    return data.decode("utf-8", errors="surrogateescape")


def _unreadable(display: str, message: str, code: str = "unreadable_file", raw: str = "") -> RawRow:
    return RawRow(display, 0, raw, reasons=[f"{code}: {message}"], whole_file=True)


# longest first: the UTF-32 LE mark starts with the UTF-16 LE one
_BOMS = ((b"\xff\xfe\x00\x00", "utf-32"), (b"\x00\x00\xfe\xff", "utf-32"), (b"\xff\xfe", "utf-16"),
         (b"\xfe\xff", "utf-16"))


def bom_codec(head: bytes) -> str | None:
    """The codec named by a UTF-16 or UTF-32 byte-order mark (which Python's codecs then consume); UTF-8's is read
    as UTF-8."""
    return next((codec for mark, codec in _BOMS if head.startswith(mark)), None)


def _guess(data: bytes) -> str:
    sample = data[:8192]
    even, odd = sample[0::2], sample[1::2]
    if sample and (even.count(0) > 0.3 * len(even) or odd.count(0) > 0.3 * len(odd)):
        return "it looks like UTF-16 without a byte-order mark"
    if sample.startswith((b"\x1f\x8b", b"PK\x03\x04", b"BZh", b"\xfd7zXZ", b"\x28\xb5\x2f\xfd")):
        return "it looks compressed or archived"
    return "binary, compressed, or UTF-16 without a byte-order mark"


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
    except ValueError as e:
        return RawRow(display, line, raw, reasons=[huge_integer_reason(e, raw) or f"bad_json: {e}"])
    return RawRow(display, line, raw, value, origin=origin)


def _read_jsonl(lines: Iterable[str], display: str, first: int = 1) -> Iterator[RawRow]:
    # lines split on \n only: str.splitlines would also split on separators that are legal inside JSON strings
    for number, line in enumerate(lines, first):
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


def read_json_range(path: Path, display: str, start: int, end: int, first_line: int, first_column: int,
                    elements: int, last: bool) -> Iterator[RawRow]:
    """The elements of bytes [start, end) of a UTF-8 JSON array file (see `cuts.plan_json_array`): the first chunk
    holds the '[', the others start after the comma that ends the chunk before; only the last may close the array."""
    text = _range_text(path, display, start, end)
    if isinstance(text, RawRow):
        yield text
        return
    if start == 0:
        text = text.removeprefix(BOM)
        yield from _read_json_array(text, display, _WHITESPACE.match(text).end() + 1, last=last)
    else:
        yield from _read_json_array(text, display, 0, first_line, first_column, elements, last)


def _read_json_array(text: str, display: str, pos: int, first_line: int = 1, first_column: int = 0,
                     elements: int = 0, last: bool = True) -> Iterator[RawRow]:
    """Parse array elements one by one, so a file cut off mid-way still yields its complete elements; `first_line`,
    `first_column` and `elements`: where text[0] is in the file and the elements before it (a chunk of one)."""
    decoder = json.JSONDecoder()
    line, counted = first_line, 0
    n = len(text)
    while True:
        pos = _WHITESPACE.match(text, pos).end()
        line += text.count("\n", counted, pos)
        counted = pos
        if pos >= n and not last:  # the chunk ends after a comma: the next chunk goes on
            return
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
                f"bad_json: element {elements + 1} of the JSON array is malformed or cut off ({e.msg} at line "
                f"{e.lineno + first_line - 1} column {e.colno + (first_column if e.lineno == 1 else 0)}); the rest of the file from this line is quarantined"])
            return
        except RecursionError:
            yield RawRow(display, line, _printable(text[pos:]), reasons=[
                f"bad_json: element {elements + 1} is nested too deeply; the rest of the file is quarantined"])
            return
        except ValueError as e:  # an integer past Python's digit limit: that element alone is rejected
            found = huge_integer(text, pos)
            if found is None:
                yield RawRow(display, line, _printable(text[pos:]), reasons=[
                    f"bad_json: element {elements + 1}: {e}; the rest of the file is quarantined"])
                return
            path, digits, end = found
            row = RawRow(display, line, _printable(text[pos:end]), reasons=[huge_integer_message(path, digits)])
        else:
            raw = text[pos:end]
            row = _invalid_utf8(display, line, raw) if has_invalid_utf8(raw) else RawRow(display, line, raw, value)
        elements += 1
        yield row
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


def read_csv_range(path: Path, display: str, start: int, end: int, first_line: int, header: tuple) -> Iterator[RawRow]:
    """The rows of bytes [start, end) of a UTF-8 CSV file cut after a record (see `cuts.plan_csv`); the first
    chunk reads the header, the others are given it."""
    text = _range_text(path, display, start, end)
    if isinstance(text, RawRow):
        yield text
        return
    if start == 0:
        yield from _read_csv(text.removeprefix(BOM), display)
    else:
        yield from _read_csv(text, display, header, first_line)


def _read_csv(text: str, display: str, header: tuple | None = None, first_line: int = 1) -> Iterator[RawRow]:
    lines = text.split("\n")
    offset = first_line - 1
    old_limit = csv.field_size_limit()
    csv.field_size_limit(sys.maxsize)  # the default 128 KiB limit would crash on one long document
    try:
        reader = csv.reader(io.StringIO(text, newline=""))
        if header is None:
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
                yield RawRow(display, offset + previous + 1, _printable(raw), reasons=[
                    f"bad_csv: {e}; the rest of the file is quarantined"])
                return
            start, previous = previous + 1, reader.line_num
            raw = "\n".join(line.removesuffix("\r") for line in lines[start - 1:previous])
            if not cells or all(not c.strip() for c in cells):
                continue
            if has_invalid_utf8(raw):
                yield _invalid_utf8(display, offset + start, raw, "csv")
            elif len(cells) != len(header):
                yield RawRow(display, offset + start, raw, origin="csv", reasons=[
                    f"bad_csv: the row has {len(cells)} fields but the header has {len(header)}"])
            else:
                yield RawRow(display, offset + start, raw, dict(zip(header, cells)), origin="csv")
    finally:
        csv.field_size_limit(old_limit)


def _read_parquet(data: bytes, display: str) -> Iterator[RawRow]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(pa.BufferReader(data))
    except Exception as e:  # pyarrow raises several types for corrupt files; all mean the same to the user
        yield _unreadable(display, f"{display} is not a readable Parquet file (truncated or corrupt?): {e}",
                          raw=_replace(data[:1000]))
        return
    yield from _parquet_groups(parquet, display, range(parquet.num_row_groups), 0)


def read_parquet_groups(path: Path, display: str, groups: range, first_row: int) -> Iterator[RawRow]:
    """The rows of some row groups of a Parquet file whose footer reads; `first_row`: rows before the first group."""
    import pyarrow.parquet as pq

    with pq.ParquetFile(path) as parquet:
        yield from _parquet_groups(parquet, display, groups, first_row)


def _parquet_groups(parquet, display: str, groups: range, first_row: int) -> Iterator[RawRow]:
    number = first_row  # line = row number for Parquet
    for group in groups:
        size = parquet.metadata.row_group(group).num_rows
        try:
            rows = parquet.read_row_group(group).to_pylist()
        except Exception as e:  # the footer still counts this group's rows: each is rejected, none vanishes
            reason = (f"unreadable_row_group: rows {number + 1}-{number + size} (row group {group}) of {display} "
                      f"cannot be read: {e}")
            for _ in range(size):
                number += 1
                yield RawRow(display, number, "", reasons=[reason], origin="parquet")
            continue
        for value in rows:
            number += 1
            yield RawRow(display, number, json.dumps(value, ensure_ascii=False, default=str), value, origin="parquet")


def read_text_range(path: Path, display: str, start: int, end: int, first_line: int, text_split: str) -> Iterator[RawRow]:
    """The blocks of bytes [start, end) of a UTF-8 text file cut where a block ends (see `stream.plan_text`)."""
    text = _range_text(path, display, start, end)
    if isinstance(text, RawRow):
        yield text
        return
    yield from _read_text(text.removeprefix(BOM) if start == 0 else text, display, text_split, first_line)


def _read_text(text: str, display: str, text_split: str, first: int = 1) -> Iterator[RawRow]:
    text = text.replace("\r\n", "\n")
    if text_split == "file":
        blocks = [(1, text)] if text.strip() else []
    elif text_split == "line":
        blocks = list(enumerate(text.split("\n"), first))
    else:
        blocks, line, pos = [], first, 0
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
