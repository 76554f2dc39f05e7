"""Where JSON array and CSV files are cut into chunks, so that they stream like JSONL instead of being read whole.

Both planners read the file once in the parent, in blocks, and cut only where one pass over the whole file
would be between two rows: a JSON array after the comma that follows an element (found with the standard
decoder's `raw_decode` over a sliding buffer), a CSV file after a record (found with the csv module itself, so
quoted fields that span lines stay whole). Each cut carries what the reader of the next chunk needs to give
the rows of one pass: its first line, and the elements before it (JSON) or the header (CSV). Where a file
stops parsing (a malformed element, a broken quote) planning stops too: the rest of the file is the last
chunk, and its reader names the fault exactly as the whole-file reader does.
"""

from __future__ import annotations

import codecs
import csv
import io
import json
import os
import sys
from pathlib import Path

BOM = "\ufeff"
_BLOCK = 1 << 20  # bytes read at a time: the buffer holds about a chunk plus one block (and one element)
_WHITESPACE = json.decoder.WHITESPACE
# a decode error this close to the end of the buffer may only mean that the element goes on in the next block
_NEAR_END = 16


def plan_json_array(path: Path, chunk_bytes: int):
    """(start, end, first line, first column, elements before, last) of each chunk of a UTF-8 JSON array file
    (the column in characters, as the decoder's messages count it); nothing when the file does not hold an
    array (a single value, or JSONL saved as .json: read whole)."""
    decoder = json.JSONDecoder()
    utf8 = codecs.getincrementaldecoder("utf-8")("surrogateescape")
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        buf, eof = "", False

        def more() -> None:
            nonlocal buf, eof
            data = f.read(_BLOCK)
            eof = not data
            buf += utf8.decode(data, final=eof)

        def skip(pos: int) -> int:
            while (end := _WHITESPACE.match(buf, pos).end()) >= len(buf) and not eof:
                more()
            return end

        more()
        pos = skip(1 if buf.startswith(BOM) else 0)
        if pos >= len(buf) or buf[pos] != "[":
            return
        pos += 1
        start_byte, start_line, start_column, start_elements, elements = 0, 1, 0, 0, 0
        buf_byte, buf_line, buf_column = 0, 1, 0  # where buf[0] is in the file
        while True:
            pos = skip(pos)
            if pos >= len(buf) or buf[pos] == "]":
                break
            try:
                _, end = decoder.raw_decode(buf, pos)
            except json.JSONDecodeError as e:
                if not eof and (e.pos >= len(buf) - _NEAR_END or e.msg.startswith("Unterminated")):
                    more()
                    continue
                break  # malformed: the last chunk's reader quarantines the rest of the file, as one pass would
            except (ValueError, RecursionError):  # a huge integer or deep nesting: the reader names it
                break
            if end >= len(buf) and not eof:  # a number may go on in the next block
                more()
                continue
            elements += 1
            pos = skip(end)
            if pos >= len(buf) or buf[pos] != ",":
                break
            pos += 1
            if pos >= chunk_bytes:  # characters, not bytes: cheap, and never more than the bytes
                cut = buf_byte + len(buf[:pos].encode("utf-8", errors="surrogateescape"))
                line = buf_line + buf.count("\n", 0, pos)
                newline = buf.rfind("\n", 0, pos)
                column = pos - newline - 1 if newline >= 0 else buf_column + pos
                yield start_byte, cut, start_line, start_column, start_elements, False
                start_byte, start_line, start_column, start_elements = cut, line, column, elements
                buf, buf_byte, buf_line, buf_column, pos = buf[pos:], cut, line, column, 0
        yield start_byte, size, start_line, start_column, start_elements, True


def plan_csv(path: Path, chunk_bytes: int):
    """(start, end, first line, header) of each chunk of a UTF-8 CSV file, cut after a record; nothing when its
    header does not read (the reader names the fault)."""
    old_limit = csv.field_size_limit()
    csv.field_size_limit(sys.maxsize)  # as the reader: one long document is a field, not an error
    try:
        with open(path, "rb") as raw:
            size = os.fstat(raw.fileno()).st_size
            # newline="" splits lines as the reader's StringIO does; utf-8-sig drops the BOM the reader drops
            f = io.TextIOWrapper(raw, encoding="utf-8-sig", errors="surrogateescape", newline="")
            read = 0

            def lines():
                nonlocal read
                while line := f.readline():  # readline, not iteration: tell() stays usable
                    read += len(line)
                    yield line

            reader = csv.reader(lines())
            try:
                header = next(reader, None)
            except csv.Error:
                return
            if header is None:
                return
            header = tuple(header)
            start_byte, start_line, start_read = 0, 1, 0
            while True:
                try:
                    next(reader)
                except (StopIteration, csv.Error):
                    break
                if read - start_read >= chunk_bytes:
                    cut = f.tell()
                    yield start_byte, cut, start_line, header
                    start_byte, start_line, start_read = cut, reader.line_num + 1, read
            yield start_byte, size, start_line, header
    finally:
        csv.field_size_limit(old_limit)
