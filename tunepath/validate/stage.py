"""The validate stage end to end: read, normalise, check contracts, quarantine, split, profile, report."""

from __future__ import annotations

import fnmatch
import hashlib
import json
import logging
import shutil
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from tunepath.records import KINDS
from tunepath.validate.config import DataValidationError, ValidateConfig
from tunepath.validate.readers import DATA_SUFFIXES, RawRow, list_data_files, read_rows
from tunepath.validate.report import FileTally, build_report, reason_code, render_markdown

log = logging.getLogger(__name__)

OUTPUTS = ("records.jsonl", "rejects.jsonl", "report.json", "report.md", "profile.json", "gx_results.json")


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


def run_validate(cfg: ValidateConfig, raw_dir: Path, out_dir: Path, model_dir: str | Path | None = None) -> dict:
    """Validate every data file under raw_dir and write records, rejects, report and profile into out_dir.

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
    raw_dir, out_dir = Path(raw_dir), Path(out_dir)
    clock = PhaseClock()
    _prepare_out_dir(out_dir, raw_dir)  # first: a failed run must not leave the last run's outputs behind
    paths = _data_files(raw_dir)
    items, tallies, warnings = _read_all(cfg, raw_dir, paths.files)
    warnings += [f"skipped {s}: it is never opened" for s in paths.special] + [f"skipped {s}" for s in paths.links]
    clock.lap("read_normalise")

    outcome = _check(cfg, items, clock)
    accepted = [item for item in items if not item.reasons]
    from tunepath.validate.split import assign_splits

    splits = assign_splits([(item.id, item.kind) for item in accepted], cfg.eval_share, cfg.seed)
    records, chunked = _records(accepted, splits, cfg)
    from tunepath.validate.profile import build_profile

    profile = build_profile(records)
    _tally(items, tallies)
    warnings += _file_warnings(tallies)
    control = _control_summary(items, cfg)
    if control["rows"]:
        warnings.append(f"{control['rows']} rows contain chat-template control text (policy {cfg.control_token_policy}); "
                        "tokenization treats it as plain text")
    placeholders = _placeholder_summary(items, cfg)
    if placeholders["rows"]:
        warnings.append(f"{placeholders['rows']} rows hold template placeholders "
                        f"({', '.join('{{' + k + '}}' for k in placeholders['by_name'])}; policy {cfg.placeholder_policy}); "
                        "fill them with validate.placeholders")
    if chunked["documents"]:
        warnings.append(f"{chunked['documents']} long documents were cut into {chunked['pieces']} pieces for CPT: {chunked['rule']}")
    clock.lap("split_profile")

    kinds = {kind: {"accepted": sum(1 for i in accepted if i.kind == kind),
                    "rejected": sum(1 for i in items if i.reasons and i.kind == kind),
                    "train": profile["splits"]["train"][kind], "eval": profile["splits"]["eval"][kind]}
             for kind in KINDS}
    report = build_report(
        files=tallies, kinds=kinds, splits={"train": splits.count("train"), "eval": splits.count("eval")},
        control_tokens=control, gx=outcome.summaries if outcome else {}, warnings=warnings,
        skipped=[p.as_posix() for p in paths.skipped], max_reject_share=cfg.max_reject_share, timings=clock.wall)
    report["placeholders"] = placeholders
    report["chunked"] = chunked
    report["cpu_s"] = clock.cpu
    report["config"] = cfg.model_dump()
    _write_jsonl(out_dir / "records.jsonl", records)
    _write_jsonl(out_dir / "rejects.jsonl", (_reject(item) for item in items if item.reasons))
    _write_json(out_dir / "profile.json", profile)
    _write_json(out_dir / "gx_results.json", outcome.results if outcome else {})
    clock.lap("write")
    _write_json(out_dir / "report.json", report)
    (out_dir / "report.md").write_text(render_markdown(report), encoding="utf-8")
    for warning in warnings:
        log.warning("validate: %s", warning)

    totals = report["totals"]
    _fail_on_rejects(totals, report["reasons"], out_dir, cfg)
    log.info("validate: %d of %d rows accepted (%d train, %d eval)", totals["accepted"], totals["read"],
             report["splits"].get("train", 0), report["splits"].get("eval", 0))
    return {**totals, "kinds": {k: v["accepted"] for k, v in kinds.items()}, "splits": report["splits"],
            "warnings": len(warnings), "timings_s": clock.wall, "cpu_s": clock.cpu}


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


def _read_all(cfg: ValidateConfig, raw_dir: Path, files: list[Path]):
    from tunepath.validate.dataset_info import read_dataset_info
    from tunepath.validate.formats import Normaliser
    from tunepath.validate.placeholders import fill_placeholders

    from tunepath.progress import DataPass

    normaliser = Normaliser(cfg)
    specs, warnings = read_dataset_info(raw_dir) if cfg.read_dataset_info else ({}, [])
    progress = DataPass(log, "validate: read", sum(_size(p) for p in files))
    items: list[Item] = []
    unreadable: list[str] = []
    tallies: dict[str, FileTally] = {}
    first_seen: dict[str, str] = {}
    for path in files:
        display = _display_name(raw_dir, path)
        rel = path.relative_to(raw_dir).as_posix()
        spec = specs.get(path)
        tally = tallies[display] = FileTally()
        file_normaliser = normaliser
        if any(fnmatch.fnmatch(rel, pattern) for pattern in cfg.file_formats):
            fmt, tally.detection = normaliser.format_for(rel), "validate.file_formats"
        elif spec is not None:
            file_normaliser = Normaliser(cfg, spec.field_map, spec.role_map)
            fmt, tally.detection = spec.fmt, f"dataset_info.json: {spec.entry}"
        else:
            fmt = cfg.format
            tally.detection = "per row" if fmt == "auto" else "validate.format"
        text_split = spec.text_split if spec is not None and spec.text_split else cfg.text_split
        faults_before = len(unreadable)
        for row in read_rows(path, display, text_split):
            if row.whole_file:
                unreadable.append(row.reasons[0].split(": ", 1)[1])
                continue
            tally.read += 1
            progress.step(len(row.raw) + 1 if isinstance(row.raw, str) else 0)  # characters: about the bytes read
            item = Item(row, reasons=row.reasons)
            items.append(item)
            if row.reasons:
                continue
            try:
                norm = file_normaliser.normalise(row, fmt)
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
            here = f"{display}:{row.line}"
            first = first_seen.setdefault(item.id, here)
            if first != here:
                item.duplicate_of = first
        if tally.read == 0 and len(unreadable) == faults_before:
            warnings.append(f"{display} holds no rows (empty file)")
    progress.done()
    if unreadable:
        listed = "; ".join(unreadable[:5]) + (f"; and {len(unreadable) - 5} more" if len(unreadable) > 5 else "")
        raise DataValidationError(
            f"{len(unreadable)} data file(s) cannot be read, so their rows cannot be counted: {listed.rstrip('.')}; "
            "fix or remove them (the stage does not run on part of the data)")
    if not items:
        raise DataValidationError(
            f"no rows could be read from {len(files)} data file(s) under '{raw_dir}': every file is empty")
    return items, tallies, warnings


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:  # unreadable files are reported by the reader, with their reason
        return 0


def _check(cfg: ValidateConfig, items: list[Item], clock: PhaseClock):
    valid = [item for item in items if not item.reasons]
    if not valid:
        clock.lap("gx_import")
        clock.lap("contracts")
        return None
    from tunepath.validate.contracts import ContractInput, check_contracts, import_gx

    import_gx()  # timed apart: the import alone takes several seconds

    clock.lap("gx_import")
    outcome = check_contracts([ContractInput(i.kind, i.fields, i.duplicate_of) for i in valid], cfg)
    for position, reasons in outcome.reasons.items():
        valid[position].reasons.extend(reasons)
    for position, notes in outcome.warnings.items():
        valid[position].warnings.extend(notes)
    clock.lap("contracts")
    return outcome


def _record(item: Item, split: str) -> dict:
    return {"id": item.id, "kind": item.kind, "split": split,
            "source": {"file": item.row.file, "line": item.row.line}, **item.fields}


def _records(accepted: list[Item], splits: list[str], cfg: ValidateConfig) -> tuple[list[dict], dict]:
    """The records to write: one per accepted row, except long documents, which give one per piece."""
    from tunepath.validate.chunks import RULE, chunk_id, chunk_text

    limit = cfg.text_chars.max
    records, documents, pieces = [], 0, 0
    for item, split in zip(accepted, splits):
        if item.kind != "text" or cfg.long_text != "chunk" or len(item.fields["text"]) <= limit:
            records.append(_record(item, split))
            continue
        documents += 1
        for number, piece in enumerate(chunk_text(item.fields["text"], limit)):
            pieces += 1
            records.append({"id": chunk_id(item.id, number), "kind": "text", "split": split,
                            "source": {"file": item.row.file, "line": item.row.line, "chunk": number}, "text": piece})
    return records, {"documents": documents, "pieces": pieces, "rule": RULE.format(max=limit)}


def _placeholder_summary(items: list[Item], cfg: ValidateConfig) -> dict:
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


def _reject(item: Item) -> dict:
    return {"source": {"file": item.row.file, "line": item.row.line}, "raw": item.row.raw, "reasons": item.reasons}


def _tally(items: list[Item], tallies: dict[str, FileTally]) -> None:
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
            top = ", ".join(f"{k} {v}" for k, v in t.reasons.most_common(3))
            warnings.append(f"every row of {name} was rejected ({t.rejected} rows: {top})")
        elif t.rejected:
            warnings.append(f"{t.rejected} of {t.read} rows of {name} rejected (see rejects.jsonl)")
    return warnings


def _control_summary(items: list[Item], cfg: ValidateConfig) -> dict:
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


def _write_jsonl(path: Path, rows) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False))
            f.write("\n")


def _write_json(path: Path, value: dict) -> None:
    path.write_text(json.dumps(value, ensure_ascii=False, indent=2, default=str) + "\n", encoding="utf-8")
