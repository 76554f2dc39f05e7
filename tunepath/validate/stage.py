"""The validate stage end to end: read, normalise, check contracts, quarantine, split, profile, report."""

from __future__ import annotations

import fnmatch
import hashlib
import itertools
import json
import logging
import shutil
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from tunepath.records import KINDS, RECORDS_DIR
from tunepath.sections import DataConfig
from tunepath.validate.config import DataValidationError, ValidateConfig
from tunepath.validate.dataset_info import read_dataset_info
from tunepath.validate.readers import DATA_SUFFIXES, RawRow, list_data_files
from tunepath.validate.report import FileTally, build_report, by_count, reason_code, render_markdown

log = logging.getLogger(__name__)

OUTPUTS = ("records", "rejects.jsonl", "report.json", "report.md", "profile.json", "gx_results.json")


@dataclass(slots=True)
class Item:
    """One read row on its way through the stage."""

    row: RawRow
    fmt: str | None = None
    kind: str | None = None
    fields: dict | None = None
    id: str | None = None
    duplicate_of: str | None = None
    reasons: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    placeholders: Counter | None = None


_ROLE_CODES = {"system": b"S", "user": b"U", "assistant": b"A", "tool": b"T"}


def record_id(kind: str, fields: dict) -> str:
    """sha256 of the normalised content (not the source): equal content, equal id.

    Strings are length-prefixed (canonical roles as one letter), so different records never hash the same input.
    """
    h = hashlib.sha256(kind.encode())
    for name, value in fields.items():
        h.update(b"|" + name.encode())
        if isinstance(value, str):
            b = value.encode("utf-8")
            h.update(b"%d:" % len(b))
            h.update(b)
            continue
        if not isinstance(value, list):  # a feedback label
            h.update(b"T" if value is True else b"F" if value is False else b"?" + repr(value).encode())
            continue
        for m in value:
            role, b = m["role"], m["content"].encode("utf-8")
            code = _ROLE_CODES.get(role)
            if code is None:
                r = role.encode("utf-8")
                code = b"?%d:%s" % (len(r), r)
            h.update(b"%s%d:" % (code, len(b)))
            h.update(b)
            if len(m) > 2:  # reasoning, tool calls, tool-result ids: plain messages hash as they always did
                extra = json.dumps({k: v for k, v in m.items() if k not in ("role", "content")},
                                   ensure_ascii=False).encode("utf-8", errors="surrogatepass")
                h.update(b"+%d:" % len(extra))
                h.update(extra)
    return h.hexdigest()[:16]


def run_validate(cfg: ValidateConfig, raw_dir: Path, out_dir: Path, model_dir: str | Path | None = None,
                 data: DataConfig | None = None) -> dict:
    """Validate every data file under raw_dir and write records, rejects, report and profile into out_dir.

    Records go to `records/records-00000.jsonl`, ... (shards of about 128 MB, in input order; read them with
    `tunepath.records.read_records`). The input is checked in chunks by `data.num_proc` worker processes, so
    memory follows the chunk, not the data (see `tunepath.validate.stream`); the outputs do not depend on either.
    JSON arrays and CSV files stream too (`cuts`); a large file that cannot be cut is read whole, with a warning.
    `model_dir` (the base model's folder) gives the control text to look for: its tokenizer's added tokens,
    unless `cfg.control_tokens` lists them. Raises DataValidationError when raw_dir has no data, no row is
    usable, or the rejected share exceeds `cfg.max_reject_share` (the outputs are written first, so
    rejects.jsonl can be inspected).
    """
    from tunepath.validate.config import DEFAULT_CONTROL_TOKENS
    from tunepath.validate.control import tokenizer_control_strings

    if cfg.control_tokens is None:
        tokens = tokenizer_control_strings(model_dir) or list(DEFAULT_CONTROL_TOKENS)
        cfg = cfg.model_copy(update={"control_tokens": tokens})
    data = data or DataConfig()
    raw_dir, out_dir = Path(raw_dir), Path(out_dir)
    clock = PhaseClock()
    _prepare_out_dir(out_dir, raw_dir)  # first: a failed run must not leave the last run's outputs behind
    paths = _data_files(raw_dir)
    work = out_dir / ".work"
    work.mkdir()
    try:
        run = _check_all(cfg, data, raw_dir, paths.files, work)
        clock.lap("read_check")
        warnings = run.warnings + [f"skipped {s}: it is never opened" for s in paths.special] + [f"skipped {s}" for s in paths.links]
        moved = _move_forced(run, work, cfg.eval_share)
        shards = _assemble(run, work, out_dir)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    clock.lap("write")
    profile = run.profile.result()
    tallies = run.tallies
    warnings += _file_warnings(tallies)
    control, placeholders = run.control, run.placeholders
    if control["rows"]:
        warnings.append(f"{control['rows']} rows contain chat-template control text (policy {cfg.control_token_policy}); "
                        "tokenization treats it as plain text")
    if placeholders["rows"]:
        warnings.append(f"{placeholders['rows']} rows hold template placeholders "
                        f"({', '.join('{{' + k + '}}' for k in placeholders['by_name'])}; policy {cfg.placeholder_policy}); "
                        "fill them with validate.placeholders")
    chunked = run.chunked
    if chunked["documents"]:
        warnings.append(f"{chunked['documents']} long documents were cut into {chunked['pieces']} pieces for CPT: {chunked['rule']}")

    kinds = {kind: {"accepted": run.accepted[kind], "rejected": run.rejected[kind],
                    "train": profile["splits"]["train"][kind], "eval": profile["splits"]["eval"][kind]}
             for kind in KINDS}
    splits = {split: sum(c[split] for c in run.splits.counts.values()) for split in ("train", "eval")}
    report = build_report(
        files=tallies, kinds=kinds, splits=splits, control_tokens=control, gx=run.gx.summaries, warnings=warnings,
        skipped=[p.as_posix() for p in paths.skipped], max_reject_share=cfg.max_reject_share, timings=clock.wall)
    report["placeholders"] = placeholders
    report["chunked"] = chunked
    # a pool's workers are other processes: their CPU seconds join the parent's, so the figure is the stage's
    report["cpu_s"] = {**clock.cpu, "read_check": round(clock.cpu["read_check"] + (run.worker_cpu if run.workers > 1 else 0), 3)}
    report["streaming"] = {"chunks": run.chunks, "workers": run.workers, "records_shards": [p.name for p in shards],
                           "moved_for_split": moved}
    report["config"] = cfg.model_dump()
    _write_json(out_dir / "profile.json", profile)
    _write_json(out_dir / "gx_results.json", run.gx.results)
    _write_json(out_dir / "report.json", report)
    (out_dir / "report.md").write_text(render_markdown(report), encoding="utf-8")
    for warning in warnings:
        log.warning("validate: %s", warning)

    totals = report["totals"]
    _fail_on_rejects(totals, report["reasons"], out_dir, cfg)
    log.info("validate: %d of %d rows accepted (%d train, %d eval)", totals["accepted"], totals["read"],
             report["splits"].get("train", 0), report["splits"].get("eval", 0))
    return {**totals, "kinds": {k: v["accepted"] for k, v in kinds.items()}, "splits": report["splits"],
            "warnings": len(warnings), "timings_s": clock.wall, "cpu_s": report["cpu_s"]}


@dataclass
class _Run:
    """The merged results of every chunk."""

    tallies: dict
    warnings: list
    profile: object
    gx: object
    splits: object
    accepted: Counter = field(default_factory=Counter)
    rejected: Counter = field(default_factory=Counter)
    control: dict = field(default_factory=dict)
    placeholders: dict = field(default_factory=dict)
    chunked: dict = field(default_factory=dict)
    records_parts: list = field(default_factory=list)
    rejects_parts: list = field(default_factory=list)
    chunks: int = 0
    workers: int = 1
    worker_cpu: float = 0.0


def _check_all(cfg: ValidateConfig, data: DataConfig, raw_dir: Path, files: list[Path], work: Path) -> _Run:
    from tunepath.progress import DataPass
    from tunepath.validate.chunks import RULE
    from tunepath.validate.profile import ProfileTally
    from tunepath.validate.gx_totals import GXTotals
    from tunepath.validate.parts import Splits, merge_examples
    from tunepath.validate.stream import CHUNK_BYTES, run_chunks, workers_for

    specs, warnings = read_dataset_info(raw_dir) if cfg.read_dataset_info else ({}, [])
    tallies: dict[str, FileTally] = {}
    displays = [_display_name(raw_dir, path) for path in files]
    sizes = [_size(p) for p in files]
    total_bytes = sum(sizes)
    chunk_count = sum(max(1, -(-size // CHUNK_BYTES)) for size in sizes) or 1  # a file is cut into its own chunks
    workers = workers_for(data, int(data.memory_gb * (1 << 30)), chunk_count)
    run = _Run(tallies, warnings, ProfileTally(), GXTotals(), Splits(), workers=workers,
               control={"policy": cfg.control_token_policy, "rows": 0, "by_token": {}, "examples": []},
               placeholders={"policy": cfg.placeholder_policy, "filled": sorted(cfg.placeholders), "rows": 0,
                             "by_name": {}, "examples": []},
               chunked={"documents": 0, "pieces": 0, "rule": RULE.format(max=cfg.text_chars.max)})
    progress = DataPass(log, "validate: read", total_bytes)
    unreadable: dict[str, list[str]] = {}
    ran: dict = {}
    for result in run_chunks(_plan(cfg, raw_dir, files, displays, specs, tallies, warnings), cfg, displays, work, workers, data,
                             ran, most=chunk_count):
        run.chunks += 1
        run.worker_cpu += result.cpu_s
        tally = tallies[result.file]
        for name in ("read", "accepted", "rejected"):
            setattr(tally, name, getattr(tally, name) + getattr(result.tally, name))
        tally.reasons.update(result.tally.reasons)
        tally.formats.update(result.tally.formats)
        if result.unreadable:
            unreadable.setdefault(result.file, []).extend(result.unreadable)
        run.accepted.update(result.accepted)
        run.rejected.update(result.rejected)
        run.splits.add(result)
        run.profile.merge(result.profile)
        run.gx.add(result.gx_summaries, result.gx_results)
        merge_examples(run.control, result.control, "by_token")
        merge_examples(run.placeholders, result.placeholders, "by_name")
        run.chunked["documents"] += result.chunked[0]
        run.chunked["pieces"] += result.chunked[1]
        run.records_parts.append(work / f"records-{result.index:06d}.part")
        run.rejects_parts.append(work / f"rejects-{result.index:06d}.part")
        progress.step(result.nbytes, rows=result.tally.read)
    progress.done()
    run.workers = ran.get("workers", run.workers)
    run.gx.ordered()
    for display, tally in tallies.items():
        if tally.read == 0 and display not in unreadable:
            warnings.append(f"{display} holds no rows (empty file)")
    faults = [fault for found in unreadable.values() for fault in found]
    if faults:
        listed = "; ".join(faults[:5]) + (f"; and {len(faults) - 5} more" if len(faults) > 5 else "")
        raise DataValidationError(
            f"{len(faults)} data file(s) cannot be read, so their rows cannot be counted: {listed.rstrip('.')}; "
            "fix or remove them (the stage does not run on part of the data)")
    if not sum(t.read for t in tallies.values()):
        raise DataValidationError(
            f"no rows could be read from {len(files)} data file(s) under '{raw_dir}': every file is empty")
    return run


def _plan(cfg: ValidateConfig, raw_dir: Path, files: list[Path], displays: list[str], specs: dict, tallies: dict,
          warnings: list[str]):
    """The chunks of every file, in order; fills `tallies` with each file's (empty) tally as it goes."""
    from tunepath.validate.readers import JSONL_SUFFIXES, bom_codec, looks_binary
    from tunepath.validate.cuts import plan_csv, plan_json_array
    from tunepath.validate.stream import CHUNK_BYTES, Chunk, plan_jsonl, plan_parquet, plan_text

    index = 0
    for number, (path, display) in enumerate(zip(files, displays)):
        rel = path.relative_to(raw_dir).as_posix()
        spec = specs.get(path)
        tally = tallies[display] = FileTally()
        maps: dict = {}
        if any(fnmatch.fnmatch(rel, pattern) for pattern in cfg.file_formats):
            from tunepath.validate.formats import Normaliser

            fmt, tally.detection = Normaliser(cfg).format_for(rel), "validate.file_formats"
        elif spec is not None:
            maps = {"field_map": tuple(spec.field_map.items()), "role_map": tuple(spec.role_map.items())}
            fmt, tally.detection = spec.fmt, f"dataset_info.json: {spec.entry}"
        else:
            fmt = cfg.format
            tally.detection = "per row" if fmt == "auto" else "validate.format"
        text_split = spec.text_split if spec is not None and spec.text_split else cfg.text_split
        base = dict(file=number, path=str(path), display=display, fmt=fmt, text_split=text_split, **maps)
        suffix = path.suffix.lower()
        pieces = None
        try:
            with open(path, "rb") as f:
                head = f.read(8192)
            plain = bom_codec(head) is None and not looks_binary(head)
            if suffix in JSONL_SUFFIXES and plain:
                pieces = [dict(how="jsonl", start=s, end=e, first=line, nbytes=e - s) for s, e, line in plan_jsonl(path, CHUNK_BYTES)]
            elif suffix == ".txt" and plain and text_split != "file":
                cuts = plan_jsonl(path, CHUNK_BYTES) if text_split == "line" else plan_text(path, CHUNK_BYTES)
                pieces = [dict(how="text", start=s, end=e, first=line, nbytes=e - s) for s, e, line in cuts]
            elif suffix == ".json" and plain:
                cuts = _peeked(plan_json_array(path, CHUNK_BYTES))  # nothing: not an array, read whole
                if cuts is not None:
                    pieces = (dict(how="json", start=s, end=e, first=line, column=c, elements=n, last=last, nbytes=e - s)
                              for s, e, line, c, n, last in cuts)
            elif suffix == ".csv" and plain:
                cuts = _peeked(plan_csv(path, CHUNK_BYTES))  # nothing: no header, read whole (which names why)
                if cuts is not None:
                    pieces = (dict(how="csv", start=s, end=e, first=line, header=header, nbytes=e - s)
                              for s, e, line, header in cuts)
            elif suffix == ".parquet":
                planned = plan_parquet(path)
                if planned is not None:
                    pieces = [dict(how="parquet", start=g0, end=g1, first=row + 1, nbytes=n) for g0, g1, row, n in planned]
                    if pieces:
                        total = sum(p["nbytes"] for p in pieces) or 1
                        for p in pieces:  # progress in the file's bytes on disk
                            p["nbytes"] = int(_size(path) * p["nbytes"] / total)
        except OSError:
            pieces = None  # the reader names the fault
        if pieces is None and _size(path) > 4 * CHUNK_BYTES:
            warnings.append(f"{display} ({_size(path) / 1e6:,.0f} MB) is read whole, not in chunks: its rows are held "
                            "in memory at once; UTF-8 JSONL, JSON arrays, CSV, Parquet and text files are read in chunks")
        for piece in pieces if pieces is not None else [dict(how="whole", nbytes=_size(path))]:
            yield Chunk(index=index, **base, **piece)
            index += 1


def _peeked(items):
    """The iterator with its first item back in front, or None when it has none (planned lazily: a big file's
    first chunks are checked while the planner reads on)."""
    first = next(items, None)
    return None if first is None else itertools.chain([first], items)


def _move_forced(run: _Run, work: Path, eval_share: float) -> list[dict]:
    """Give each kind of two or more records one in each split (split.py's rule), in the parts already written."""
    from tunepath.validate.parts import move_records

    moved = []
    for kind, split, chunk, line, lines in run.splits.moves(eval_share):
        move_records(work / f"records-{chunk:06d}.part", split, line, lines)
        other = "train" if split == "eval" else "eval"
        run.splits.counts[kind][split] += 1
        run.splits.counts[kind][other] -= 1
        run.profile.splits[split][kind] += lines
        run.profile.splits[other][kind] -= lines
        moved.append({"kind": kind, "to": split})
    return moved


def _assemble(run: _Run, work: Path, out_dir: Path) -> list[Path]:
    from tunepath.validate.parts import assemble, concatenate

    shards = assemble(run.records_parts, out_dir / RECORDS_DIR, "records")
    concatenate(run.rejects_parts, out_dir / "rejects.jsonl")
    return shards


class PhaseClock:
    """Wall and CPU seconds per phase; on a shared machine the CPU figure is the steadier one."""

    def __init__(self) -> None:
        self.wall: dict[str, float] = {}
        self.cpu: dict[str, float] = {}
        self._wall, self._cpu = time.perf_counter(), time.process_time()

    def lap(self, phase: str) -> None:
        wall, cpu = time.perf_counter(), time.process_time()
        self.wall[phase], self.cpu[phase] = round(wall - self._wall, 3), round(cpu - self._cpu, 3)
        self._wall, self._cpu = wall, cpu


def _data_files(raw_dir: Path):
    readable = ", ".join(f"*{s}" for s in DATA_SUFFIXES)
    if not raw_dir.is_dir():
        raise DataValidationError(
            f"the raw data folder '{raw_dir}' does not exist: put your data files ({readable}) there "
            "or point data.raw_dir at your folder")
    paths = list_data_files(raw_dir)
    if not paths.files:
        found = f" (found only {', '.join(p.name for p in paths.skipped[:5])})" if paths.skipped else ""
        raise DataValidationError(
            f"no data files in '{raw_dir}'{found}: the validate stage reads {readable}, recursively; "
            "hidden files and *.dvc pointers are ignored (run `dvc pull` if the data is tracked by DVC)")
    for p in paths.skipped:
        log.warning("validate: skipping %s: not a data file type (%s)", p, readable)
    return paths


def _display_name(raw_dir: Path, path: Path) -> str:
    """The file name written into records: relative to the working directory when possible (portable)."""
    if path.is_absolute():
        try:
            return path.relative_to(Path.cwd()).as_posix()
        except ValueError:
            return path.as_posix()
    return path.as_posix()


def read_items(cfg: ValidateConfig, rows, normaliser, fmt: str, tally: FileTally, unreadable: list[str]) -> list[Item]:
    """The rows of one chunk as items: read, normalised, placeholders filled, ids given (dedup comes after)."""
    from tunepath.validate.placeholders import fill_placeholders

    items: list[Item] = []
    for row in rows:
        if row.whole_file:
            unreadable.append(row.reasons[0].split(": ", 1)[1])
            continue
        tally.read += 1
        item = Item(row, reasons=row.reasons)
        items.append(item)
        if row.reasons:
            continue
        try:
            norm = normaliser.normalise(row, fmt)
        except RecursionError:  # a parse limit of one row, never the stage's
            item.reasons = ["too_deep: the row is nested too deeply to normalise"]
            continue
        item.fmt, item.kind = norm.fmt, norm.kind
        if norm.reasons:
            item.reasons = norm.reasons
            continue
        left = fill_placeholders(norm.kind, norm.fields, cfg.placeholders)
        if left:
            note = (f"placeholder: {', '.join(f'{{{{{k}}}}} x{v}' for k, v in left.items())} left in the content; "
                    "fill them with validate.placeholders")
            (item.reasons if cfg.placeholder_policy == "reject" else item.warnings).append(note)
            item.placeholders = left
            if item.reasons:
                continue
        item.fields = norm.fields
        row.value = None  # the canonical fields replace the parsed row: halves the memory
        item.id = record_id(norm.kind, norm.fields)
    return items


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:  # unreadable files are reported by the reader, with their reason
        return 0


def _record(item: Item, split: str) -> dict:
    return {"id": item.id, "kind": item.kind, "split": split,
            "source": {"file": item.row.file, "line": item.row.line}, **item.fields}


def item_records(item: Item, split: str, cfg: ValidateConfig) -> tuple[list[dict], bool]:
    """The records of one accepted item, and whether it was cut: a long document gives one record per piece."""
    from tunepath.validate.chunks import chunk_id, chunk_text

    limit = cfg.text_chars.max
    if item.kind != "text" or cfg.long_text != "chunk" or len(item.fields["text"]) <= limit:
        return [_record(item, split)], False
    return [{"id": chunk_id(item.id, number), "kind": "text", "split": split,
             "source": {"file": item.row.file, "line": item.row.line, "chunk": number}, "text": piece}
            for number, piece in enumerate(chunk_text(item.fields["text"], limit))], True


def placeholder_summary(items: list[Item], cfg: ValidateConfig) -> dict:
    by_name: Counter = Counter()
    rows, examples = 0, []
    for item in items:
        if item.placeholders:
            rows += 1
            by_name.update(item.placeholders)
            if len(examples) < 20:
                examples.append({"file": item.row.file, "line": item.row.line, "names": dict(item.placeholders)})
    return {"policy": cfg.placeholder_policy, "filled": sorted(cfg.placeholders), "rows": rows,
            "by_name": dict(by_name.most_common()), "examples": examples}


def reject_row(item: Item) -> dict:
    return {"source": {"file": item.row.file, "line": item.row.line}, "raw": item.row.raw, "reasons": item.reasons}


def tally_items(items: list[Item], tallies: dict[str, FileTally]) -> None:
    for item in items:
        tally = tallies[item.row.file]
        if item.fmt:
            tally.formats[item.fmt] += 1
        if item.reasons:
            tally.rejected += 1
            tally.reasons.update({reason_code(r) for r in item.reasons})  # rows per reason, not reasons
        else:
            tally.accepted += 1


def _file_warnings(tallies: dict[str, FileTally]) -> list[str]:
    warnings = []
    for name, t in tallies.items():
        if t.read and t.accepted == 0:
            top = ", ".join(f"{k} {v}" for k, v in list(by_count(t.reasons).items())[:3])
            warnings.append(f"every row of {name} was rejected ({t.rejected} rows: {top})")
        elif t.rejected:
            warnings.append(f"{t.rejected} of {t.read} rows of {name} rejected (see rejects.jsonl)")
    return warnings


def control_summary(items: list[Item], cfg: ValidateConfig) -> dict:
    by_token: Counter = Counter()
    examples, rows = [], 0
    for item in items:
        notes = [n for n in (item.warnings + item.reasons) if n.startswith("control_token:")]
        if not notes:
            continue
        rows += 1
        found = {t for t in cfg.control_tokens if any(t in n for n in notes)}
        by_token.update(found)
        if len(examples) < 20:
            examples.append({"file": item.row.file, "line": item.row.line, "notes": notes})
    return {"policy": cfg.control_token_policy, "rows": rows, "by_token": dict(by_token.most_common()),
            "examples": examples}


def _fail_on_rejects(totals: dict, reasons: dict, out_dir: Path, cfg: ValidateConfig) -> None:
    top = ", ".join(f"{k} ({v})" for k, v in list(reasons.items())[:5])
    where = f"see {out_dir / 'rejects.jsonl'} and {out_dir / 'report.md'}"
    if totals["accepted"] == 0:
        raise DataValidationError(f"no usable rows: all {totals['read']} rows were rejected ({top}); {where}")
    if totals["reject_share"] > cfg.max_reject_share:
        raise DataValidationError(
            f"{totals['rejected']} of {totals['read']} rows ({totals['reject_share']:.1%}) were rejected, above "
            f"validate.max_reject_share={cfg.max_reject_share}; most common reasons: {top}; {where}. "
            "Fix the data, map its fields (validate.field_map/role_map), or raise validate.max_reject_share.")


def _prepare_out_dir(out_dir: Path, raw_dir: Path) -> None:
    """Empty the stage's own folder so no stale output survives; refuse folders that hold the input."""
    resolved, raw = out_dir.resolve(), raw_dir.resolve()
    if resolved == raw or resolved in raw.parents or resolved == Path.cwd().resolve():
        raise DataValidationError(f"the output folder '{out_dir}' contains the input data or the project: "
                                  "give the validate stage a folder of its own (e.g. artifacts/validate)")
    out_dir.mkdir(parents=True, exist_ok=True)
    for child in out_dir.iterdir():
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child)
        else:
            child.unlink()


def _write_json(path: Path, value: dict) -> None:
    path.write_text(json.dumps(value, ensure_ascii=False, indent=2, default=str) + "\n", encoding="utf-8")
