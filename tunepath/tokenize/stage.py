"""run_tokenize: canonical records to tokenized data sets, with the chat template saved beside them.

Each (kind, split) is tokenized by `datasets.map(batched=True, num_proc=...)` and the result is cached under
a fingerprint of the records file, the tokenizer and template, the settings that change ids, and this
package's code; packing, blocks and the writing of `out_dir` run every time (they are fast).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import shutil
import time
from pathlib import Path

from tunepath.sections import ModelConfig
from tunepath.tokenize import TokenizeConfig
from tunepath.errors import StageError
from tunepath.tokenize.batches import STATUS_NAMES, TRUNCATED, EncodePlan, cpt_batch, encoder_for, sft_batch
from tunepath.tokenize.masks import check_encoder
from tunepath.tokenize.packing import best_fit_decreasing, build_rows, padding_share
from tunepath.tokenize.report import write_report
from tunepath.tokenize.render import pin_date
from tunepath.tokenize.templates import select_template, template_hash

log = logging.getLogger(__name__)

FOLDERS = {"conversation": "sft", "text": "cpt", "preference": "dpo", "feedback": "kto"}
SPLITS = ("train", "eval")
DROP_NAMES = tuple(name for name in STATUS_NAMES.values() if name.startswith("dropped_") and name not in ("dropped_too_long", "dropped_no_labels"))
# Settings that change the tokenized records (the rest act after the cache: packing, blocks, parallelism).
CACHE_KEYS = ("max_length", "template", "custom_template", "overlong", "last_turn_only", "keep_history_reasoning",
              "template_kwargs", "render_date", "parity_checks")


def run_tokenize(cfg: TokenizeConfig, model: ModelConfig, validate_dir: Path, out_dir: Path) -> dict:
    """Tokenize `validate_dir/records.jsonl` into `out_dir` (cleared first); returns a small summary."""
    from tunepath.progress import Progress
    from tunepath.tokenize.loading import load_tokenizer

    started = time.perf_counter()
    records_path = Path(validate_dir) / "records.jsonl"
    out_dir = Path(out_dir)
    if not records_path.exists():
        raise FileNotFoundError(f"{records_path}: no canonical records; run the validate stage first")
    tokenizer = load_tokenizer(model.base, model.trust_remote_code)
    if not tokenizer.is_fast:
        raise ValueError(f"model.base {model.base!r}: tokenize needs a fast tokenizer (a tokenizer.json); this one is {type(tokenizer).__name__}")
    template = pin_date(select_template(cfg.template, cfg.custom_template, tokenizer, model.base), cfg.render_date)

    if out_dir.exists():
        shutil.rmtree(out_dir)
    tokenizer_dir = out_dir / "tokenizer"
    tokenizer.chat_template = template
    tokenizer.save_pretrained(str(tokenizer_dir))
    (tokenizer_dir / "chat_template.jinja").write_text(template, encoding="utf-8")
    plan = EncodePlan(
        str(tokenizer_dir.resolve()), _hash_files(tokenizer_dir), template, cfg.max_length, cfg.overlong,
        cfg.last_turn_only, model.trust_remote_code, cfg.keep_history_reasoning,
        json.dumps(cfg.template_kwargs, sort_keys=True), cfg.render_date.isoformat(), cfg.parity_checks,
    )
    check_encoder(encoder_for(plan, tokenizer), cfg.template, model.base)

    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    fingerprint = _fingerprint(records_path, plan, cfg)
    cache_root = _cache_root(cfg)
    records = _Records(records_path)
    run_key = hashlib.sha256((fingerprint + cfg.model_dump_json()).encode()).hexdigest()
    stats: dict = {}
    timings = {"setup": round(time.perf_counter() - started, 3)}  # seconds per part, in stats.json: where the time goes
    cached = []
    # records in, tokens out, across every (kind, split): a bar on a terminal, a few lines elsewhere
    with Progress(_count_lines(records_path), "tokenize", unit="record", lines=5, logger=log) as progress:
        for kind, folder in FOLDERS.items():
            stats[folder] = {}
            for split in SPLITS:
                key = hashlib.sha256(f"{fingerprint}/{kind}/{split}".encode()).hexdigest()[:32]
                clock = time.perf_counter()
                mapped, hit = _tokenized(kind, split, records, plan, cfg, cache_root / key)
                progress.update(len(mapped) if mapped is not None else 0)
                cached.append(hit)
                timings[f"{folder}/{split}/tokenize"] = round(time.perf_counter() - clock, 3)
                clock = time.perf_counter()
                target = out_dir / folder / split
                if folder == "sft":
                    stats[folder][split] = _finish_sft(mapped, split, cfg, target, run_key)
                    stats[folder][split]["drop_examples"] = _drop_examples(mapped, records, kind, split)
                elif folder == "cpt":
                    stats[folder][split] = _finish_cpt(mapped, cfg, pad_id, target, run_key)
                elif folder == "kto":
                    stats[folder][split] = _finish_kto(mapped, cfg, target, run_key)
                else:
                    stats[folder][split] = _finish_dpo(mapped, cfg, target, run_key)
                timings[f"{folder}/{split}/pack_and_write"] = round(time.perf_counter() - clock, 3)
                progress.update(0, tokens=int(stats[folder][split].get("tokens", 0)))
        progress.update(max(progress.total - progress.done, 0))  # records a kind fans out or folds in: end at 100%

    summary = {
        "labeled_examples": stats["sft"]["train"]["samples_out"],
        "labeled_tokens": stats["sft"]["train"]["tokens"],
        "unlabeled_tokens": stats["cpt"]["train"]["tokens"],
        "preference_pairs": stats["dpo"]["train"]["samples_out"],
        "feedback_examples": stats["kto"]["train"]["samples_out"],
        "max_length": cfg.max_length,
        "template_hash": template_hash(template),
        "template_source": cfg.template,
        "fingerprint": fingerprint,
        "cached": all(cached),
        "seconds": round(time.perf_counter() - started, 3),
        "timings": {k: v for k, v in timings.items() if v >= 0.01},
    }
    (out_dir / "stats.json").write_text(json.dumps({**summary, **stats}, indent=2) + "\n", encoding="utf-8")
    write_report(out_dir / "report.md", summary, stats)
    _check_drops(stats, cfg, model.base)
    log.info(
        "tokenize: %d SFT conversations, %d CPT tokens, %d preference pairs (template %s %s, %.1f s%s)",
        summary["labeled_examples"], summary["unlabeled_tokens"], summary["preference_pairs"], cfg.template,
        summary["template_hash"][:12], summary["seconds"], ", cached" if summary["cached"] else "",
    )
    return {**summary, "out_dir": str(out_dir)}


def _count_lines(path: Path) -> int:
    with open(path, "rb") as f:
        return sum(chunk.count(b"\n") for chunk in iter(lambda: f.read(1 << 20), b""))


class _Records:
    """records.jsonl as Arrow, read (by pyarrow's multithreaded JSON reader) only when some split is not cached."""

    COLUMNS = {"conversation": ("messages", "tools", "source"), "text": ("text",), "preference": ("prompt", "chosen", "rejected", "tools"),
               "feedback": ("messages", "label", "tools")}

    def __init__(self, path: Path) -> None:
        self.path = path
        self._table = None

    def get(self, kind: str, split: str, columns: list[str] | None = None):
        import pyarrow.compute as pc

        table = self._read()
        mask = pc.and_(pc.equal(table["kind"], kind), pc.equal(table["split"], split))
        rows = table.select(columns or list(self.COLUMNS[kind])).filter(mask)
        for name in ("messages", "prompt", "chosen", "rejected"):
            if name in rows.column_names:
                rows = rows.set_column(rows.column_names.index(name), name, _used_fields(rows[name]))
        return rows

    def _read(self):
        import pyarrow as pa
        import pyarrow.json as pj

        if self._table is None:
            call = pa.struct([("id", pa.string()), ("name", pa.string()), ("arguments", pa.string())])
            messages = pa.list_(pa.struct([
                ("role", pa.string()), ("content", pa.string()), ("reasoning", pa.string()),
                ("tool_calls", pa.list_(call)), ("tool_call_id", pa.string()), ("name", pa.string()),
            ]))
            source = pa.struct([("file", pa.string()), ("line", pa.int64()), ("chunk", pa.int64())])
            schema = pa.schema(
                [("id", pa.string()), ("kind", pa.string()), ("split", pa.string()), ("source", source),
                 ("messages", messages), ("tools", pa.string()), ("text", pa.string()),
                 ("prompt", messages), ("chosen", messages), ("rejected", messages), ("label", pa.bool_())]
            )
            options = pj.ParseOptions(explicit_schema=schema, unexpected_field_behavior="ignore")
            try:
                self._table = pj.read_json(self.path, parse_options=options)
            except pa.ArrowInvalid as e:
                raise ValueError(f"{self.path}: not canonical records ({e}); rerun the validate stage") from e
        return self._table


def _used_fields(column):
    """A list<struct> column of messages without the fields no message of it sets (tool calls, names, reasoning in
    most data): each batch is turned into Python dicts, and a field that is null everywhere costs a key in each."""
    import pyarrow as pa
    import pyarrow.compute as pc

    messages = pc.list_flatten(column)
    fields = [f for f in messages.type if f.name in ("role", "content") or pc.struct_field(messages, f.name).null_count < len(messages)]
    if len(fields) == messages.type.num_fields:
        return column
    return column.cast(pa.list_(pa.struct(fields)))  # a cast, not arrays rebuilt from buffers: slices pickle small


def _tokenized(kind: str, split: str, records: _Records, plan: EncodePlan, cfg: TokenizeConfig, cache: Path):
    """The map output for one (kind, split) and whether it came from the cache; None when there are no records.

    The map writes its Arrow files straight into the cache folder (an in-memory map output grows a buffer by
    copying it, which cost more than the tokenizer on 50k chats), and the folder's `files.json` lists them.
    """
    from datasets import Dataset
    from datasets.table import InMemoryTable

    if (cache / "empty").exists():
        return None, True
    if (cache / MAP_FILES).exists():
        return _load_mapped(cache), True
    rows = records.get(kind, split)
    cache.parent.mkdir(parents=True, exist_ok=True)
    if not rows.num_rows:
        cache.mkdir(exist_ok=True)
        (cache / "empty").touch()
        return None, False
    from tunepath.tokenize.dpo import dpo_batch
    from tunepath.tokenize.kto import kto_batch

    function, kwargs = {
        "conversation": (sft_batch, {"plan": plan, "with_prompt": split == "eval"}),
        "text": (cpt_batch, {"plan": plan}),
        "preference": (dpo_batch, {"plan": plan}),
        "feedback": (kto_batch, {"plan": plan}),
    }[kind]
    partial = cache.with_name(cache.name + f".partial-{os.getpid()}")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir()
    source = Dataset(InMemoryTable(rows), fingerprint=cache.name + "-records")  # no hashing of the whole table
    workers = min(cfg.num_proc, math.ceil(rows.num_rows / cfg.batch_size)) if cfg.num_proc > 1 else None
    with _tokenizer_threads(1 if (workers or 0) > 1 else None):
        mapped = source.map(
            function,
            batched=True,
            batch_size=cfg.batch_size,
            num_proc=workers,
            fn_kwargs=kwargs,
            with_indices=kind == "conversation",
            remove_columns=source.column_names,
            new_fingerprint=cache.name,
            cache_file_name=str(partial / "map.arrow"),
            load_from_cache_file=False,
            desc=f"tokenize {FOLDERS[kind]}/{split}",
        )
    files = [Path(f["filename"]).name for f in mapped.cache_files]
    (partial / MAP_FILES).write_text(json.dumps(files) + "\n", encoding="utf-8")
    del mapped  # its memory maps point into `partial`, renamed next
    shutil.rmtree(cache, ignore_errors=True)
    os.replace(partial, cache)
    return _load_mapped(cache), False


@contextlib.contextmanager
def _tokenizer_threads(count: int | None):
    """With `count` 1, map workers tokenize on one thread each: the tokenizer's own thread pool in every worker
    put cores x workers threads on the cores (16 workers on 16 cores spent 2.8x the raw tokenizer's CPU time)."""
    if count != 1:
        yield
        return
    before = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # read by forked workers (and the Rust side) at each batch call
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("TOKENIZERS_PARALLELISM", None)
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = before


MAP_FILES = "files.json"
READ_WHOLE_BYTES = 2 << 30  # map outputs up to this size are read into memory; larger ones are memory-mapped


def _load_mapped(cache: Path):
    """The cached map output: its Arrow files, in order. Packing reads every row; reading a file whole was 5x
    faster than faulting its pages in through a memory map (a 92 MB output: 0.07 s against 0.37 s)."""
    from datasets import Dataset, concatenate_datasets

    paths = [cache / name for name in json.loads((cache / MAP_FILES).read_text(encoding="utf-8"))]
    whole = sum(p.stat().st_size for p in paths) <= READ_WHOLE_BYTES
    parts = [Dataset.from_file(str(p), in_memory=whole) for p in paths]
    return parts[0] if len(parts) == 1 else concatenate_datasets(parts)


def _zero_stats() -> dict:
    return {
        "samples_in": 0, "samples_out": 0, "tokens": 0, "label_tokens": 0, "truncated": 0,
        "dropped_too_long": 0, "dropped_no_labels": 0, **{name: 0 for name in DROP_NAMES}, "dropped_tokens": 0,
        "longest": 0, "padding_share_unpacked": 0.0, "padding_share_packed": 0.0, "rows": 0, "packed": False,
    }


def _status_stats(table) -> tuple[dict, object]:
    """Counts per status (a row is a sample, or a record that yielded none) and the indices of the kept rows."""
    import numpy as np

    status = table["status"].to_numpy()
    kept = np.flatnonzero(status <= TRUNCATED)
    counts = {name: int((status == code).sum()) for code, name in STATUS_NAMES.items()}
    longest = int(table["length"].to_numpy().max()) if len(status) else 0
    stats = {"samples_in": len(status), "samples_out": len(kept), "longest": longest, **counts}
    if "record" in table.column_names:
        records = table["record"].to_numpy()
        stats["records_in"] = int(len(np.unique(records)))
        # Samples beyond one per conversation: turns of templates that rewrite history, each its own sample.
        stats["turn_samples"] = int(len(kept) - len(np.unique(records[kept])))
        stats["reasoning_rebuilt"] = int(table["restored"].to_numpy()[kept].sum())
        stats["control_text_as_text"] = int(table["control_text"].to_numpy()[kept].sum())
    return stats, kept


def _drop_examples(mapped, records, kind: str, split: str) -> dict:
    """Per drop reason: how many, and the first record's file, line and message."""
    import numpy as np

    if mapped is None:
        return {}
    table = mapped.data.table
    status = table["status"].to_numpy()
    examples = {}
    for code, name in STATUS_NAMES.items():
        if not name.startswith("dropped") or not (status == code).any():
            continue
        row = int(np.flatnonzero(status == code)[0])
        index = int(table["record"][row].as_py())
        source = records.get(kind, split, ["source"])["source"][index].as_py() or {}
        examples[name] = {"file": source.get("file"), "line": source.get("line"), "detail": table["detail"][row].as_py()}
    return examples


def _check_drops(stats: dict, cfg: TokenizeConfig, model: str) -> None:
    """Fail when a kind and split lost more than `max_drop_share` of its rows (stats and report are written first)."""
    for folder, splits in stats.items():
        for split, row in splits.items():
            total = row.get("samples_in", 0)
            dropped = {name: row.get(name, 0) for name in ("dropped_too_long", "dropped_no_labels", *DROP_NAMES) if row.get(name)}
            if not total or sum(dropped.values()) / total <= cfg.max_drop_share:
                continue
            worst = max(dropped, key=dropped.get)
            example = row.get("drop_examples", {}).get(worst, {})
            where = f" (e.g. {example['file']}, line {example['line']}: {example['detail']})" if example else ""
            raise StageError(
                f"tokenize: {sum(dropped.values())} of {total} {folder}/{split} rows yield no sample, more than "
                f"tokenize.max_drop_share={cfg.max_drop_share} (template: {cfg.template}, model {model}); most: "
                f"{worst} ({dropped[worst]}){where}. "
                "See artifacts/tokenize/report.md; change tokenize.template or max_length, fix the data, or raise the share."
            )


def _finish_sft(mapped, split: str, cfg: TokenizeConfig, target: Path, run_key: str) -> dict:
    import numpy as np
    import pyarrow.compute as pc

    if mapped is None:
        return _zero_stats()
    table = mapped.data.table
    stats, kept = _status_stats(table)
    extra = ("prompt_ids", "record") if split == "eval" else ()  # record: the row of records.jsonl (this kind and split)
    samples = table.select(["input_ids", "labels", *extra])
    lengths = pc.list_value_length(samples["input_ids"]).to_numpy(zero_copy_only=False)[kept].astype(np.int64).tolist()
    tokens = sum(lengths)
    packed_bins = best_fit_decreasing(lengths, cfg.max_length)
    pack = cfg.pack and split == "train"
    bins = packed_bins if pack else [[i] for i in range(len(lengths))]
    stats.update(
        tokens=tokens,
        label_tokens=int(table["label_tokens"].to_numpy()[kept].sum()),
        padding_share_unpacked=padding_share(tokens, len(lengths), cfg.max_length),
        padding_share_packed=padding_share(tokens, len(packed_bins), cfg.max_length),
        rows=len(bins),
        packed=pack,
    )
    _save(build_rows(samples, bins, extra, rows=kept), target, stats, run_key)
    return {**_zero_stats(), **stats}


def _finish_cpt(mapped, cfg: TokenizeConfig, pad_id: int, target: Path, run_key: str) -> dict:
    import numpy as np
    import pyarrow.compute as pc

    from tunepath.tokenize.cpt import cut_blocks

    if mapped is None:
        return _zero_stats()
    docs = mapped.data.table["input_ids"]
    lengths = pc.list_value_length(docs).to_numpy(zero_copy_only=False).astype(np.int64)
    blocks = cut_blocks(docs, cfg.max_length, cfg.cpt_remainder, cfg.cpt_isolate_documents, pad_id)
    rows = blocks.table.num_rows
    stats = {
        **_zero_stats(),
        "samples_in": len(lengths),
        "samples_out": len(lengths),
        "tokens": blocks.tokens,
        "label_tokens": blocks.tokens,
        "longest": int(lengths.max()) if len(lengths) else 0,
        "dropped_tokens": blocks.dropped_tokens,
        "padding_share_unpacked": padding_share(int(lengths.sum()), int(np.ceil(lengths / cfg.max_length).sum()), cfg.max_length),
        "padding_share_packed": padding_share(blocks.tokens, rows, cfg.max_length),
        "rows": rows,
        "packed": True,
    }
    _save(blocks.table, target, stats, run_key)
    return stats


def _finish_dpo(mapped, cfg: TokenizeConfig, target: Path, run_key: str) -> dict:
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc

    if mapped is None:
        return _zero_stats()
    table = mapped.data.table
    stats, kept = _status_stats(table)
    pairs = table.select(["prompt_ids", "chosen_ids", "rejected_ids", "prompt", "chosen", "rejected"]).take(pa.array(kept))

    def total(name):
        return int(pc.list_value_length(pairs[name]).to_numpy(zero_copy_only=False).astype(np.int64).sum()) if len(kept) else 0

    prompt, chosen, rejected = total("prompt_ids"), total("chosen_ids"), total("rejected_ids")
    # Each pair runs as two sequences (prompt+chosen, prompt+rejected); DPO rows are not packed.
    share = padding_share(2 * prompt + chosen + rejected, 2 * len(kept), cfg.max_length)
    stats.update(
        tokens=prompt + chosen + rejected,
        label_tokens=chosen + rejected,
        padding_share_unpacked=share,
        padding_share_packed=share,
        rows=len(kept),
    )
    _save(pairs, target, stats, run_key)
    return {**_zero_stats(), **stats}


def _finish_kto(mapped, cfg: TokenizeConfig, target: Path, run_key: str) -> dict:
    """Unpaired feedback (KTO): kept examples with their label; desirable ones are counted apart."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc

    if mapped is None:
        return {**_zero_stats(), "desirable": 0}
    table = mapped.data.table
    stats, kept = _status_stats(table)
    rows = table.select(["prompt_ids", "completion_ids", "label", "prompt", "completion"]).take(pa.array(kept))

    def total(name):
        return int(pc.list_value_length(rows[name]).to_numpy(zero_copy_only=False).astype(np.int64).sum()) if len(kept) else 0

    prompt, completion = total("prompt_ids"), total("completion_ids")
    share = padding_share(prompt + completion, len(kept), cfg.max_length)
    stats.update(tokens=prompt + completion, label_tokens=completion, padding_share_unpacked=share,
                 padding_share_packed=share, rows=len(kept))
    _save(rows, target, stats, run_key)
    return {**_zero_stats(), **stats, "desirable": int(pc.sum(rows["label"]).as_py() or 0) if len(kept) else 0}


def _save(table, target: Path, stats: dict, run_key: str) -> None:
    from datasets import Dataset
    from datasets.table import InMemoryTable

    from tunepath.progress import datasets_bars_off

    if table.num_rows == 0:
        log.warning("%s: every record was dropped (%s); nothing written", target, {k: v for k, v in stats.items() if k.startswith("dropped")})
        return
    # Given, so that datasets does not hash every row: the run's inputs, settings and this output's place.
    fingerprint = hashlib.sha256(f"{run_key}/{target.parent.name}/{target.name}".encode()).hexdigest()[:32]
    with datasets_bars_off():
        Dataset(InMemoryTable(table), fingerprint=fingerprint).save_to_disk(str(target))


def _hash_files(folder: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(folder.iterdir()):
        if path.is_file():
            digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


def _fingerprint(records_path: Path, plan: EncodePlan, cfg: TokenizeConfig) -> str:
    digest = hashlib.sha256()
    with open(records_path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    digest.update(plan.tokenizer_hash.encode())
    digest.update(json.dumps({k: getattr(cfg, k) for k in CACHE_KEYS}, sort_keys=True, default=str).encode())
    for path in sorted(Path(__file__).parent.glob("*.py")):
        digest.update(path.read_bytes())
    return digest.hexdigest()


def _cache_root(cfg: TokenizeConfig) -> Path:
    if cfg.cache_dir:
        return Path(cfg.cache_dir)
    import datasets

    return Path(datasets.config.HF_DATASETS_CACHE) / "tunepath-tokenize"
