"""Validate in chunks, so memory follows the chunk and not the data: plan, check each chunk, merge the tallies.

The parent process cuts every file into chunks (JSONL and text at line ends or blank lines, JSON arrays after an
element, CSV after a record (see `cuts`), Parquet at row groups; a JSON file that is not an array, UTF-16/32
text and text read whole (`text_split: file`) are one chunk each) and a pool of
`data.num_proc` workers checks them: read, normalise, dedup, contracts (GX on the chunk's frames), split,
then the chunk's records and rejects are written to part files of its own (joined by `parts`).

Dedup keeps its meaning over the whole input: a row is a duplicate of the first row with the same id in file
and line order. Each worker registers its chunk's ids in a SQLite table on disk (id -> first file and line)
in chunk order, one chunk at a time (a turn counter shared by the pool), and only that step waits; reading
and the contracts run in parallel. The split is the same hash of the id as before, and the rule that gives
each kind of two or more records one record in each split is applied after the last chunk (`parts.Splits`).
"""

from __future__ import annotations

import json
import os
import re
import sqlite3
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from tunepath.validate.report import FileTally

CHUNK_BYTES = 32 << 20  # input per chunk: fixed, so the parts (and the shards) do not depend on the machine
# A worker's peak over its chunk's input bytes (rows, canonical fields, the GX frames), measured on chats with
# benchmarks/data_scale.py, plus the interpreter with pandas and GX imported.
WORKER_EXPANSION = 12
WORKER_BASE = 400 << 20
PARQUET_GROUP_BYTES = CHUNK_BYTES  # Parquet row groups are gathered into chunks of about this much data


@dataclass(frozen=True, slots=True)
class Chunk:
    """A part of one input file, checked by one worker."""

    index: int
    file: int  # position of the file in the run's file list
    path: str
    display: str
    fmt: str
    text_split: str
    how: str  # "jsonl", "text", "json" or "csv" (bytes start-end, first line), "parquet" (row groups, first row), "whole"
    start: int = 0
    end: int = 0
    first: int = 1
    nbytes: int = 0
    column: int = 0  # json: the column of `start` on its line (for the decoder's messages)
    elements: int = 0  # json: the array's elements before this chunk
    last: bool = True  # json: only the last chunk may close the array
    header: tuple = ()  # csv: the file's header, read by the first chunk
    field_map: tuple = ()
    role_map: tuple = ()


@dataclass
class ChunkResult:
    """What one chunk gives the parent: counts, partial summaries, the GX results, and where its parts are."""

    index: int
    file: str
    nbytes: int
    tally: FileTally
    unreadable: list[str] = field(default_factory=list)
    accepted: Counter = field(default_factory=Counter)  # per kind
    rejected: Counter = field(default_factory=Counter)
    splits: dict = field(default_factory=dict)  # kind -> {"train": items, "eval": items}
    lowest_train: dict = field(default_factory=dict)  # kind -> (fraction, first line in the part, lines)
    highest_eval: dict = field(default_factory=dict)
    profile: object = None
    control: dict = field(default_factory=dict)
    placeholders: dict = field(default_factory=dict)
    chunked: tuple = (0, 0)
    gx_summaries: dict = field(default_factory=dict)
    gx_results: dict = field(default_factory=dict)
    records: int = 0
    rejects: int = 0
    cpu_s: float = 0.0


def plan_jsonl(path: Path, chunk_bytes: int = CHUNK_BYTES):
    """(start, end, first line) of each chunk of a UTF-8 JSONL file, cut after a line end."""
    start, line = 0, 1
    with open(path, "rb") as f:
        while block := f.read(chunk_bytes):
            if not block.endswith(b"\n"):
                block += f.readline()
            yield start, start + len(block), line
            start += len(block)
            line += block.count(b"\n")


_BLANK_LINE = re.compile(rb"[ \t\f\v]*\r?\n")  # a line the text reader's blank-line separator spans


def plan_text(path: Path, chunk_bytes: int = CHUNK_BYTES):
    """(start, end, first line) of each chunk of a UTF-8 text file split at blank lines, each cut right after a
    blank line: the reader's separator (a blank line and the whitespace after it) then ends a chunk or starts the
    next one, and either way it gives the blocks and lines of one pass over the file."""
    start, line = 0, 1
    with open(path, "rb") as f:
        while block := f.read(chunk_bytes):
            if not block.endswith(b"\n"):
                block += f.readline()
            while True:
                last = block[block.rfind(b"\n", 0, len(block) - 1) + 1:]
                if _BLANK_LINE.fullmatch(last) and (len(last) < len(block) or start > 0):
                    break
                more = f.readline()
                if not more:
                    break
                block += more
            yield start, start + len(block), line
            start += len(block)
            line += block.count(b"\n")


def plan_parquet(path: Path):
    """(first group, end group, first row, bytes) of each chunk of a Parquet file; None when its footer does not read."""
    import pyarrow.parquet as pq

    try:
        with pq.ParquetFile(path) as parquet:
            meta = parquet.metadata
            groups = [(meta.row_group(g).num_rows, meta.row_group(g).total_byte_size) for g in range(meta.num_row_groups)]
    except Exception:  # the reader names the fault, as a whole-file reject
        return None
    chunks, first, row, size = [], 0, 0, 0
    for g, (rows, nbytes) in enumerate(groups):
        if g > first and size + nbytes > PARQUET_GROUP_BYTES:
            chunks.append((first, g, row, size))
            row += sum(r for r, _ in groups[first:g])
            first, size = g, 0
        size += nbytes
    if first < len(groups):
        chunks.append((first, len(groups), row, size))
    return chunks


# -- the worker side ----------------------------------------------------------------------------------------------

_STATE: dict = {}


class _Turns:
    """Chunk k registers its ids after chunk k-1 did: the dedup index sees rows in file and line order."""

    def __init__(self, condition=None, turn=None) -> None:
        self.condition, self.turn = condition, turn

    def wait(self, index: int) -> None:
        if self.condition is None:
            return
        parent = os.getppid()
        with self.condition:
            while self.turn.value != index:
                self.condition.wait(1.0)
                if os.getppid() != parent:  # the stage is gone: nobody will take the turn before this one
                    raise SystemExit(1)

    def done(self, index: int) -> None:
        if self.condition is None:
            return
        with self.condition:
            self.turn.value = index + 1
            self.condition.notify_all()


def init_worker(cfg, displays: list[str], work: str, condition=None, turn=None, turns=None) -> None:
    """A worker's state: `condition` and `turn` are a local pool's turn counter, `turns` another engine's (see
    `tunepath.engine.RayTurns`)."""
    import logging

    logging.getLogger("great_expectations").setLevel(logging.WARNING)
    if condition is not None or turns is not None:  # one of a pool: one thread each, so it never runs more threads than cores
        import pyarrow

        pyarrow.set_cpu_count(1)
    _STATE.clear()
    _STATE.update(cfg=cfg, displays=displays, work=Path(work), turns=turns or _Turns(condition, turn), normalisers={}, db=None)


def _db() -> sqlite3.Connection:
    if _STATE["db"] is None:
        db = sqlite3.connect(_STATE["work"] / "seen.sqlite", timeout=600, isolation_level=None)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=OFF")
        db.execute("CREATE TABLE IF NOT EXISTS seen (id INTEGER PRIMARY KEY, file INTEGER, line INTEGER)")
        _STATE["db"] = db
    return _STATE["db"]


def _key(record_id: str) -> int:
    return int(record_id, 16) - (1 << 63)  # 16 hex digits as SQLite's signed 64-bit integer


def _register(chunk: Chunk, items: list) -> None:
    """Mark each item whose content came earlier (this chunk or any before it) with the first place it came."""
    here: dict[int, int] = {}  # id -> first line in this chunk
    keyed = []
    for item in items:
        if item.id is not None:
            key = _key(item.id)
            here.setdefault(key, item.row.line)
            keyed.append((item, key))
    db, earlier = _db(), {}
    keys = list(here)
    for i in range(0, len(keys), 900):
        batch = keys[i:i + 900]
        earlier.update((k, (f, line)) for k, f, line in
                       db.execute(f"SELECT id, file, line FROM seen WHERE id IN ({','.join('?' * len(batch))})", batch))
    db.execute("BEGIN")
    db.executemany("INSERT INTO seen VALUES (?, ?, ?)", [(k, chunk.file, line) for k, line in here.items() if k not in earlier])
    db.execute("COMMIT")
    displays = _STATE["displays"]
    for item, key in keyed:
        file, line = earlier.get(key, (chunk.file, here[key]))
        if (file, line) != (chunk.file, item.row.line):
            item.duplicate_of = f"{displays[file]}:{line}"


def _rows(chunk: Chunk):
    from tunepath.validate.readers import (read_csv_range, read_json_range, read_jsonl_range, read_parquet_groups,
                                           read_rows, read_text_range)

    path = Path(chunk.path)
    if chunk.how == "jsonl":
        return read_jsonl_range(path, chunk.display, chunk.start, chunk.end, chunk.first)
    if chunk.how == "json":
        return read_json_range(path, chunk.display, chunk.start, chunk.end, chunk.first, chunk.column, chunk.elements,
                               chunk.last)
    if chunk.how == "csv":
        return read_csv_range(path, chunk.display, chunk.start, chunk.end, chunk.first, chunk.header)
    if chunk.how == "text":
        return read_text_range(path, chunk.display, chunk.start, chunk.end, chunk.first, chunk.text_split)
    if chunk.how == "parquet":
        return read_parquet_groups(path, chunk.display, range(chunk.start, chunk.end), chunk.first - 1)
    return read_rows(path, chunk.display, chunk.text_split)


def _normaliser(chunk: Chunk):
    from tunepath.validate.formats import Normaliser

    key = (chunk.field_map, chunk.role_map)
    if key not in _STATE["normalisers"]:
        maps = (dict(chunk.field_map), dict(chunk.role_map)) if key != ((), ()) else (None, None)
        _STATE["normalisers"][key] = Normaliser(_STATE["cfg"], *maps)
    return _STATE["normalisers"][key]


def check_chunk(chunk: Chunk) -> ChunkResult:
    """One chunk through the stage: its parts are written, its counts returned."""
    from tunepath.validate.stage import read_items

    cpu = time.process_time()
    cfg, turns = _STATE["cfg"], _STATE["turns"]
    registered = False
    try:
        result = ChunkResult(chunk.index, chunk.display, chunk.nbytes, FileTally())
        items = read_items(cfg, _rows(chunk), _normaliser(chunk), chunk.fmt, result.tally, result.unreadable)
        turns.wait(chunk.index)
        try:
            _register(chunk, items)
        finally:
            registered = True
            turns.done(chunk.index)
    finally:
        if not registered:  # a failed chunk still passes the turn on, so the others can finish
            turns.wait(chunk.index)
            turns.done(chunk.index)
    _contracts(items, cfg, result)
    _write_parts(chunk, items, cfg, result)
    result.cpu_s = time.process_time() - cpu
    return result


def _contracts(items: list, cfg, result: ChunkResult) -> None:
    valid = [item for item in items if not item.reasons]
    if not valid:
        return
    from tunepath.validate.contracts import ContractInput, check_contracts

    outcome = check_contracts([ContractInput(i.kind, i.fields, i.duplicate_of) for i in valid], cfg)
    for position, reasons in outcome.reasons.items():
        valid[position].reasons.extend(reasons)
    for position, notes in outcome.warnings.items():
        valid[position].warnings.extend(notes)
    result.gx_summaries, result.gx_results = outcome.summaries, outcome.results


def _write_parts(chunk: Chunk, items: list, cfg, result: ChunkResult) -> None:
    from tunepath.validate.profile import ProfileTally
    from tunepath.validate.split import split_fraction
    from tunepath.validate.stage import control_summary, item_records, placeholder_summary, reject_row, tally_items

    work = _STATE["work"]
    profile = ProfileTally()
    documents = pieces = line = 0
    with open(work / f"records-{chunk.index:06d}.part", "w", encoding="utf-8") as records, \
            open(work / f"rejects-{chunk.index:06d}.part", "w", encoding="utf-8") as rejects:
        for item in items:
            if item.reasons:
                rejects.write(json.dumps(reject_row(item), ensure_ascii=False) + "\n")
                result.rejects += 1
                if item.kind:
                    result.rejected[item.kind] += 1
                continue
            kind = item.kind
            result.accepted[kind] += 1
            fraction = split_fraction(item.id, cfg.seed)
            split = "eval" if fraction < cfg.eval_share else "train"
            counts = result.splits.setdefault(kind, {"train": 0, "eval": 0})
            counts[split] += 1
            rows, cut = item_records(item, split, cfg)
            if cut:
                documents, pieces = documents + 1, pieces + len(rows)
            place = (fraction, line, len(rows))
            if split == "train" and (kind not in result.lowest_train or fraction < result.lowest_train[kind][0]):
                result.lowest_train[kind] = place
            if split == "eval" and (kind not in result.highest_eval or fraction > result.highest_eval[kind][0]):
                result.highest_eval[kind] = place
            for row in rows:
                records.write(json.dumps(row, ensure_ascii=False) + "\n")
                profile.add(row)
            line += len(rows)
    result.records = line
    result.profile = profile
    result.chunked = (documents, pieces)
    result.control = control_summary(items, cfg)
    result.placeholders = placeholder_summary(items, cfg)
    tally_items(items, {chunk.display: result.tally})


# -- the parent side ----------------------------------------------------------------------------------------------


def workers_for(data, budget_bytes: int, chunks_hint: int | None = None) -> int:
    """Worker processes: data.num_proc (default every core), fewer when the memory budget holds fewer chunks."""
    fit = max(1, (budget_bytes - WORKER_BASE) // (CHUNK_BYTES * WORKER_EXPANSION + WORKER_BASE))
    n = min(data.workers(), fit)
    return max(1, min(n, chunks_hint)) if chunks_hint else n


def run_chunks(chunks, cfg, displays: list[str], work: Path, workers: int, data=None, ran: dict | None = None,
               most: int | None = None):
    """Yield the result of every chunk, in order; at most 2 chunks a worker are in flight. `data.engine` ray runs
    the same workers as Ray actors (`tunepath.engine`): on a cluster as many as it has CPUs (at most `most`, the
    chunks there are), and `ran["workers"]` says how many ran."""
    if data is not None and data.engine == "ray":
        from tunepath.engine import RayTurns, actor_count, ray_session, run_ordered

        from dataclasses import replace

        absolute = (replace(chunk, path=os.path.abspath(chunk.path)) for chunk in chunks)  # an actor's working folder is its own
        with ray_session(data) as ray:
            workers = actor_count(ray, data, workers, most)
            if ran is not None:
                ran["workers"] = workers
            turns = RayTurns.start(ray)
            yield from run_ordered(ray, check_chunk, absolute, workers, init_worker,
                                   (cfg, displays, os.path.abspath(work), None, None, turns))
        return
    if workers <= 1:
        init_worker(cfg, displays, str(work))
        try:
            for chunk in chunks:
                yield check_chunk(chunk)
        finally:
            _close()
        return
    import multiprocessing
    from collections import deque
    from concurrent.futures import ProcessPoolExecutor

    fork = "fork" in multiprocessing.get_all_start_methods()
    if fork:  # imported once here, the workers share it: each would take seconds to import it again
        from tunepath.validate.contracts import import_gx

        import_gx()
    context = multiprocessing.get_context("fork" if fork else "spawn")
    condition, turn = context.Condition(), context.Value("q", 0, lock=False)
    pending: deque = deque()
    with ProcessPoolExecutor(workers, mp_context=context, initializer=init_worker,
                             initargs=(cfg, displays, str(work), condition, turn)) as pool:
        try:
            for chunk in chunks:
                pending.append(pool.submit(check_chunk, chunk))
                if len(pending) >= 2 * workers:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        except BaseException:
            for future in pending:
                future.cancel()
            raise


def _close() -> None:
    if _STATE.get("db") is not None:
        _STATE["db"].close()
    _STATE.clear()
