"""run_tokenize: canonical records to tokenized data sets, with the chat template saved beside them.

Each (kind, split) is tokenized by `datasets.map(batched=True, num_proc=...)` and the result is cached under
a fingerprint of the records file, the tokenizer and template, the settings that change ids, and this
package's code. The packed rows, CPT blocks and pairs are cached too, under that fingerprint and every
tokenize setting, so a rerun that changes nothing links them into `out_dir` without repacking. After a run the
cache is cut back to `tokenize.cache_max_gb`, least recently used entries first (`cache.py`).

Memory stays bounded by `data.memory_gb`, not by the data: records are read in blocks of bytes and written
apart per kind and split (memory-mapped by the map), map outputs larger than a share of the budget are
memory-mapped and read a window at a time through maps of the window's own (`split.py`), SFT rows are packed
best-fit over windows of PACK_WINDOW_TOKENS (the same rows as one global packing below that size; above it, a
little more padding, reported in stats.json), CPT blocks are cut from chunks of documents, DPO pairs and KTO
examples are gathered SAVE_WINDOW_ROWS at a time, and every output is written shard by shard.
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

from tunepath.sections import DataConfig, ModelConfig
from tunepath.tokenize import TokenizeConfig
from tunepath.engine import LazyRay
from tunepath.errors import StageError
from tunepath.progress import DataPass, datasets_bars_off
from tunepath.tokenize.cache import bound as bound_cache, touch
from tunepath.tokenize.batches import STATUS_NAMES, TRUNCATED, EncodePlan, cpt_batch, encoder_for, sft_batch
from tunepath.tokenize.masks import check_encoder
from tunepath.tokenize.packing import best_fit_decreasing, build_rows, padding_share
from tunepath.tokenize.report import cut_samples, cut_warning, write_report
from tunepath.tokenize.render import pin_date
from tunepath.tokenize.shards import ShardWriter
from tunepath.tokenize.templates import select_template, template_hash

log = logging.getLogger(__name__)

FOLDERS = {"conversation": "sft", "text": "cpt", "preference": "dpo", "feedback": "kto"}
SPLITS = ("train", "eval")
DROP_NAMES = tuple(name for name in STATUS_NAMES.values() if name.startswith("dropped_") and name not in ("dropped_too_long", "dropped_no_labels"))
# Settings that change the tokenized records (the rest act after the cache: packing, blocks, parallelism).
CACHE_KEYS = ("max_length", "template", "custom_template", "overlong", "last_turn_only", "keep_history_reasoning",
              "template_kwargs", "render_date", "parity_checks")
READ_BLOCK_BYTES = 64 << 20  # the records shards are read this much at a time (less under a small data.memory_gb)
SAVE_WINDOW_ROWS = 20_000  # DPO pairs and KTO examples gathered and written at a time (a few tens of MB)
SHARD_BYTES = 128 << 20  # a kind and split's records are tokenized and cached in shards of about this size
# SFT samples are packed best-fit within windows of this many tokens. Fixed (not from data.memory_gb), so the
# rows do not depend on the machine; a window's arrays take about 40 bytes per token.
PACK_WINDOW_TOKENS = 1 << 24
BYTES_PER_CPT_TOKEN = 64  # the cut's arrays over a chunk's tokens, measured from cpt.BlockCutter's temporaries


def run_tokenize(cfg: TokenizeConfig, model: ModelConfig, validate_dir: Path, out_dir: Path, data: DataConfig | None = None) -> dict:
    """Tokenize the validate stage's records (`validate_dir/records/`, its shards in order) into `out_dir`
    (cleared first); returns a small summary.

    `data` gives the worker processes and the memory budget (`data.num_proc`, `data.memory_gb`); neither
    changes the outputs."""
    from tunepath.tokenize.loading import load_tokenizer

    data = data or DataConfig()
    budget = int(data.memory_gb * (1 << 30))
    started = time.perf_counter()
    from tunepath.records import record_files

    records_paths = record_files(Path(validate_dir))
    out_dir = Path(out_dir)
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
    cache_root = _cache_root(cfg)
    settings = _settings_digest(plan, cfg)
    known = cache_root / "file-digests.json"
    # the shards' digests in order: the same records cut into other shards tokenize to the same rows, but rarely
    # come so (the validate stage cuts its input at fixed sizes), so they are simply tokenized again
    fingerprint = hashlib.sha256((settings + "".join(_file_digest(p, known) for p in records_paths)).encode()).hexdigest()
    records = _Records(records_paths, cache_root / "records" / fingerprint[:32], block_bytes=min(READ_BLOCK_BYTES, max(budget // 16, 1 << 20)))
    run_key = hashlib.sha256((fingerprint + cfg.model_dump_json()).encode()).hexdigest()
    stats: dict = {}
    timings = {"setup": round(time.perf_counter() - started, 3)}  # seconds per part, in stats.json: where the time goes
    cached = []
    used = {cache_root / "records" / fingerprint[:32]}  # cache entries this run reads: never evicted by it
    # datasets' own bars say nothing the per-shard lines do not (and a bar per shard and split floods a terminal)
    with datasets_bars_off(), LazyRay(data) as engine:
        for kind, folder in FOLDERS.items():
            stats[folder] = {}
            for split in SPLITS:
                target = out_dir / folder / split
                finished = cache_root / "finished" / hashlib.sha256(f"{run_key}/{folder}/{split}".encode()).hexdigest()[:32]
                clock = time.perf_counter()
                if _link_finished(finished, target):
                    touch(finished)
                    used.add(finished)
                    stats[folder][split] = json.loads((finished / "stats.json").read_text(encoding="utf-8"))
                    cached.append(True)
                    timings[f"{folder}/{split}/cached"] = round(time.perf_counter() - clock, 3)
                    continue
                mapped, hit = _tokenized(kind, split, records, plan, cfg, cache_root, settings, fingerprint, data.workers(), budget,
                                         used, engine if data.engine == "ray" else None)
                cached.append(hit)
                timings[f"{folder}/{split}/tokenize"] = round(time.perf_counter() - clock, 3)
                clock = time.perf_counter()
                if folder == "sft":
                    stats[folder][split] = _finish_sft(mapped, split, cfg, target, run_key)
                    stats[folder][split]["drop_examples"] = _drop_examples(mapped, records, kind, split)
                elif folder == "cpt":
                    stats[folder][split] = _finish_cpt(mapped, cfg, pad_id, target, run_key, budget)
                elif folder == "kto":
                    stats[folder][split] = _finish_kto(mapped, cfg, target, run_key)
                else:
                    stats[folder][split] = _finish_dpo(mapped, cfg, target, run_key)
                del mapped
                _keep_finished(target, stats[folder][split], finished)
                used.add(finished)
                timings[f"{folder}/{split}/pack_and_write"] = round(time.perf_counter() - clock, 3)
    records.clear()  # the per-split record files: every split they feed is cached now
    bound_cache(cache_root, cfg.cache_max_gb, used)

    summary = {
        "labeled_examples": stats["sft"]["train"]["samples_out"],
        "labeled_tokens": stats["sft"]["train"]["tokens"],
        "unlabeled_tokens": stats["cpt"]["train"]["tokens"],
        "preference_pairs": stats["dpo"]["train"]["samples_out"],
        "feedback_examples": stats["kto"]["train"]["samples_out"],
        "max_length": cfg.max_length,
        "truncated_samples": cut_samples(stats)[0],  # training samples cut at max_length (CPT blocks aside)
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
    warning = cut_warning(stats, cfg.max_length)
    if warning:
        log.warning("tokenize: %s", warning)
    log.info(
        "tokenize: %d SFT conversations, %d CPT tokens, %d preference pairs (template %s %s, %.1f s%s)",
        summary["labeled_examples"], summary["unlabeled_tokens"], summary["preference_pairs"], cfg.template,
        summary["template_hash"][:12], summary["seconds"], ", cached" if summary["cached"] else "",
    )
    return {**summary, "out_dir": str(out_dir)}


class _Records:
    """The records shards split into Arrow shards per (kind, split), read only when some split is not cached.

    Each file is read in blocks of `block_bytes` cut at line ends (each block by pyarrow's multithreaded JSON
    reader), so memory follows the block, not the file. A kind and split's rows go to shards of about
    SHARD_BYTES, each cut at a block's edge: appending rows to the records leaves every earlier shard's bytes
    as they were, so only the new shards are tokenized (the map cache is keyed by a shard's digest). Shards
    keep only the message fields some record of their split sets (see `_set_fields`); the map memory-maps them.
    """

    COLUMNS = {"conversation": ("messages", "tools", "source"), "text": ("text",), "preference": ("prompt", "chosen", "rejected", "tools"),
               "feedback": ("messages", "label", "tools")}
    MESSAGE_COLUMNS = ("messages", "prompt", "chosen", "rejected")

    def __init__(self, paths: list[Path], folder: Path, block_bytes: int) -> None:
        self.paths, self.folder, self.block_bytes = paths, folder, block_bytes

    def get(self, kind: str, split: str) -> list[dict]:
        """The shards of one kind and split, in order: path, offset (rows before it), rows, sha256."""
        if not (self.folder / "shards.json").exists():
            self._split()
        shards = json.loads((self.folder / "shards.json").read_text(encoding="utf-8")).get(f"{kind}-{split}", [])
        return [{**s, "path": self.folder / s["name"]} for s in shards]

    def source(self, kind: str, split: str, index: int) -> dict:
        """The `source` (file, line) of the index-th record of one kind and split."""
        import pyarrow as pa

        for shard in self.get(kind, split):
            if shard["offset"] <= index < shard["offset"] + shard["rows"]:
                with pa.memory_map(str(shard["path"])) as f:
                    return pa.ipc.open_stream(f).read_all()["source"][index - shard["offset"]].as_py() or {}
        return {}

    def clear(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)

    def _blocks(self, pa, pj, options):
        """Tables of at most about `block_bytes` of records each, in order, over every records file."""
        for path in self.paths:
            offset = 0
            with open(path, "rb") as f:
                while block := f.read(self.block_bytes):
                    if not block.endswith(b"\n"):
                        block += f.readline()
                    if not block.strip():
                        offset += len(block)
                        continue
                    try:
                        table = pj.read_json(pa.BufferReader(block), parse_options=options)
                    except pa.ArrowInvalid as e:
                        raise ValueError(f"{path}: not canonical records in bytes {offset}-{offset + len(block)} ({e}); rerun the validate stage") from e
                    offset += len(block)
                    yield table

    def _split(self) -> None:
        import pyarrow as pa
        import pyarrow.compute as pc
        import pyarrow.json as pj

        options = pj.ParseOptions(explicit_schema=_records_schema(), unexpected_field_behavior="ignore")
        partial = self.folder.with_name(self.folder.name + f".partial-{os.getpid()}")
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
        shards: dict[str, list[dict]] = {}
        open_shards: dict = {}  # "kind-split" -> (writer, its entry in shards)
        used: dict = {}  # (kind, split, column) -> names of the message fields some record sets
        for table in self._blocks(pa, pj, options):
            for kind, columns in self.COLUMNS.items():
                for split in SPLITS:
                    rows = table.select(list(columns)).filter(pc.and_(pc.equal(table["kind"], kind), pc.equal(table["split"], split)))
                    if not rows.num_rows:
                        continue
                    key = f"{kind}-{split}"
                    writer, entry = open_shards.get(key, (None, None))
                    if writer is not None and entry["bytes"] >= SHARD_BYTES:
                        writer.close()
                        writer = None
                    if writer is None:
                        done = shards.setdefault(key, [])
                        entry = {"name": f"{key}-{len(done):05d}.arrow", "offset": sum(s["rows"] for s in done), "rows": 0, "bytes": 0}
                        done.append(entry)
                        writer = pa.ipc.new_stream(str(partial / entry["name"]), rows.schema)
                        open_shards[key] = (writer, entry)
                    writer.write_table(rows)
                    entry["rows"] += rows.num_rows
                    entry["bytes"] += rows.nbytes
                    for name in set(columns) & set(self.MESSAGE_COLUMNS):
                        used.setdefault((kind, split, name), set()).update(_set_fields(rows[name]))
            del table
        for writer, _ in open_shards.values():
            writer.close()
        for key, entries in shards.items():
            kind, split = key.rsplit("-", 1)
            fields = {name: used[kind, split, name] for name in self.COLUMNS[kind] if name in self.MESSAGE_COLUMNS}
            for entry in entries:
                _drop_unused_fields(partial / entry["name"], fields)
                entry["sha256"] = _sha256(partial / entry["name"])
        (partial / "shards.json").write_text(json.dumps(shards) + "\n", encoding="utf-8")
        shutil.rmtree(self.folder, ignore_errors=True)
        os.replace(partial, self.folder)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _records_schema():
    import pyarrow as pa

    call = pa.struct([("id", pa.string()), ("name", pa.string()), ("arguments", pa.string())])
    messages = pa.list_(pa.struct([
        ("role", pa.string()), ("content", pa.string()), ("reasoning", pa.string()),
        ("tool_calls", pa.list_(call)), ("tool_call_id", pa.string()), ("name", pa.string()),
    ]))
    source = pa.struct([("file", pa.string()), ("line", pa.int64()), ("chunk", pa.int64())])
    return pa.schema(
        [("id", pa.string()), ("kind", pa.string()), ("split", pa.string()), ("source", source),
         ("messages", messages), ("tools", pa.string()), ("text", pa.string()),
         ("prompt", messages), ("chosen", messages), ("rejected", messages), ("label", pa.bool_())]
    )


def _set_fields(column) -> set[str]:
    """The message fields that some message of `column` sets (role and content always count): each batch is
    turned into Python dicts, and a field that is null everywhere costs a key in each."""
    import pyarrow.compute as pc

    messages = pc.list_flatten(column)
    return {f.name for f in messages.type if f.name in ("role", "content") or pc.struct_field(messages, f.name).null_count < len(messages)}


def _drop_unused_fields(path: Path, fields: dict[str, set[str]]) -> None:
    """Rewrites the Arrow file at `path` batch by batch with each message column cast to its used fields."""
    import pyarrow as pa

    with pa.memory_map(str(path)) as f:
        reader = pa.ipc.open_stream(f)
        schema = reader.schema
        types = {name: pa.list_(pa.struct([t for t in schema.field(name).type.value_type if t.name in keep]))
                 for name, keep in fields.items() if len(keep) < schema.field(name).type.value_type.num_fields}
        if not types:
            return
        target = pa.schema([pa.field(f.name, types.get(f.name, f.type)) for f in schema])
        narrow = path.with_suffix(".narrow")
        with pa.ipc.new_stream(str(narrow), target) as writer:
            for batch in reader:
                writer.write_batch(batch.cast(target))  # a cast, not arrays rebuilt from buffers: slices pickle small
    os.replace(narrow, path)


def _tokenized(kind: str, split: str, records: _Records, plan: EncodePlan, cfg: TokenizeConfig, cache_root: Path, settings: str,
               fingerprint: str, num_proc: int, budget: int, used: set[Path], engine=None):
    """`_map_split`, and once more if a cached map output cannot be read: its entry is removed (with a warning
    that names the file) and its shard mapped again; a second unreadable file is an error."""
    from tunepath.tokenize.split import UnreadableFile

    args = (kind, split, records, plan, cfg, cache_root, settings, fingerprint, num_proc, budget, used, engine)
    try:
        return _map_split(*args)
    except UnreadableFile as e:
        entry = Path(e.path).parent
        log.warning("tokenize cache: %s cannot be read (%s: %s); removing the entry %s and mapping its shard again",
                    e.path, type(e.cause).__name__, e.cause, entry.name)
        shutil.rmtree(entry, ignore_errors=True)
        used.discard(entry)
    try:
        return _map_split(*args)
    except UnreadableFile as e:
        raise StageError(f"tokenize cache: {e.path} cannot be read right after it was written ({e.cause}); "
                         f"check the disk under {cache_root}") from e


def _map_split(kind: str, split: str, records: _Records, plan: EncodePlan, cfg: TokenizeConfig, cache_root: Path, settings: str,
               fingerprint: str, num_proc: int, budget: int, used: set[Path], engine=None):
    """The map output for one (kind, split) and whether it all came from the cache; None when there are no records.

    Each shard of the split is mapped on its own and cached under its digest and the settings, so appended
    rows map only the new shards. With a Ray `engine` (a `LazyRay`) the shards are mapped by Ray actors, one
    shard and one tokenizer thread each, instead of one after the other by a local pool. An index per records fingerprint lists the split's shard keys: a rerun on
    the same records finds its map outputs without reading the records again.
    """
    index = cache_root / "splits" / f"{fingerprint[:32]}-{kind}-{split}.json"
    keys = json.loads(index.read_text(encoding="utf-8")) if index.exists() else None
    if keys is not None and all((cache_root / key / MAP_FILES).exists() for key in keys):
        for key in keys:
            touch(cache_root / key)
            used.add(cache_root / key)
        return (_load_split(cache_root, keys, budget) if keys else None), True
    keys, todo = [], []
    for shard in records.get(kind, split):
        key = hashlib.sha256(f"{settings}/{kind}/{split}/{shard['offset']}/{shard['sha256']}".encode()).hexdigest()[:32]
        if not (cache_root / key / MAP_FILES).exists():
            todo.append((kind, split, {**shard, "path": shard["path"].absolute()}, plan, cfg, (cache_root / key).absolute()))
        keys.append(key)
    if engine is not None and todo:
        from tunepath.engine import run_ordered

        for _ in run_ordered(engine.start(), _map_job, todo, actors=engine.actors(num_proc, _actor_setup, most=len(todo))):
            pass
    else:
        for job in todo:
            _map_shard(*job, num_proc)
    hit = not todo
    for key in keys:
        touch(cache_root / key)
        used.add(cache_root / key)
    index.parent.mkdir(parents=True, exist_ok=True)
    partial = index.with_name(index.name + f".partial-{os.getpid()}")
    partial.write_text(json.dumps(keys) + "\n", encoding="utf-8")
    os.replace(partial, index)  # whole or absent for a run beside this one
    return (_load_split(cache_root, keys, budget) if keys else None), hit


def _map_shard(kind: str, split: str, shard: dict, plan: EncodePlan, cfg: TokenizeConfig, cache: Path, num_proc: int) -> None:
    """Tokenizes one shard into `cache`. The map writes its Arrow files straight into the cache folder (an
    in-memory map output grows a buffer by copying it, which cost more than the tokenizer on 50k chats), and
    the folder's `files.json` lists them."""
    from datasets import Dataset

    from tunepath.tokenize.dpo import dpo_batch
    from tunepath.tokenize.kto import kto_batch

    function, kwargs = {
        "conversation": (sft_batch, {"plan": plan, "with_prompt": split == "eval", "offset": shard["offset"]}),
        "text": (cpt_batch, {"plan": plan}),
        "preference": (dpo_batch, {"plan": plan}),
        "feedback": (kto_batch, {"plan": plan}),
    }[kind]
    partial = cache.with_name(cache.name + f".partial-{os.getpid()}")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    source = Dataset.from_file(str(shard["path"]))  # memory-mapped: workers get the file's path, not a pickled copy
    workers = min(num_proc, math.ceil(source.num_rows / cfg.batch_size))
    workers = workers if workers > 1 else None
    clock = time.perf_counter()
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
    seconds = time.perf_counter() - clock
    log.info("tokenize %s/%s: %d records from row %d in %.1f s (%.0f records/s, %d worker(s))", FOLDERS[kind], split, source.num_rows,
             shard["offset"], seconds, source.num_rows / max(seconds, 1e-9), workers or 1)
    del mapped, source  # the map output's memory maps point into `partial`, renamed next
    shutil.rmtree(cache, ignore_errors=True)
    os.replace(partial, cache)


def _map_job(job: tuple) -> None:
    """One shard on one Ray actor: the map runs in the actor's process, on the one thread `_actor_setup` left it."""
    _map_shard(*job, 1)


def _actor_setup() -> None:
    """A Ray actor holds one CPU: its tokenizer runs one thread; and its map shows no bars (the stage logs a line a shard)."""
    from datasets.utils.tqdm import disable_progress_bars

    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    disable_progress_bars()


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


def _load_split(cache_root: Path, keys: list[str], budget: int):
    """The cached map outputs of a split's shards, in order, as one MappedSplit. Packing reads every row; reading a
    file whole was 5x faster than faulting its pages in through a memory map (a 92 MB output: 0.07 s against
    0.37 s), so outputs up to a quarter of the memory budget are read whole and larger ones memory-mapped."""
    from tunepath.tokenize.split import MappedSplit

    paths = [cache_root / key / name for key in keys for name in json.loads((cache_root / key / MAP_FILES).read_text(encoding="utf-8"))]
    return MappedSplit(paths, in_memory=sum(p.stat().st_size for p in paths) <= budget // 4)


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
    lengths = table["length"].to_numpy()
    longest = int(lengths.max()) if len(status) else 0
    rendered = lengths[lengths > 0]  # before the cut: what max_length would have to hold
    quantiles = {f"length_p{q}": int(np.percentile(rendered, q)) if len(rendered) else 0 for q in (50, 95, 99)}
    stats = {"samples_in": len(status), "samples_out": len(kept), "longest": longest, **quantiles, **counts}
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
    table = mapped.table
    status = table["status"].to_numpy()
    examples = {}
    for code, name in STATUS_NAMES.items():
        if not name.startswith("dropped") or not (status == code).any():
            continue
        row = int(np.flatnonzero(status == code)[0])
        index = int(table["record"][row].as_py())
        source = records.source(kind, split, index)
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
    table = mapped.table
    stats, kept = _status_stats(table)
    extra = ("prompt_ids", "record") if split == "eval" else ()  # record: the canonical record (this kind and split)
    columns = ["input_ids", "labels", *extra]
    lengths = pc.list_value_length(table["input_ids"]).to_numpy(zero_copy_only=False)[kept].astype(np.int64)
    pack = cfg.pack and split == "train"
    writer = ShardWriter(target, _output_fingerprint(run_key, target))
    packed_rows = windows = 0
    progress = DataPass(log, f"tokenize sft/{split}: pack and write", 0)
    for lo, hi in _windows(lengths, max(PACK_WINDOW_TOKENS, 16 * cfg.max_length)):
        progress.step(rows=hi - lo)
        window = lengths[lo:hi].tolist()
        packed_bins = best_fit_decreasing(window, cfg.max_length)
        packed_rows += len(packed_bins)
        windows += 1
        bins = packed_bins if pack else [[i] for i in range(len(window))]
        first, last = int(kept[lo]), int(kept[hi - 1]) + 1  # the window's span of the split's rows
        writer.write(build_rows(mapped.rows(first, last, columns), bins, extra, rows=kept[lo:hi] - first))
    rows = _close(writer, target, stats)
    if windows > 1:
        progress.done()
    tokens = int(lengths.sum())
    stats.update(
        tokens=tokens,
        label_tokens=int(table["label_tokens"].to_numpy()[kept].sum()),
        padding_share_unpacked=padding_share(tokens, len(lengths), cfg.max_length),
        padding_share_packed=padding_share(tokens, packed_rows, cfg.max_length),
        pack_windows=windows,
        rows=rows,
        packed=pack,
    )
    return {**_zero_stats(), **stats}


def _windows(lengths, tokens: int):
    """(start, end) index ranges of `lengths`, each summing to about `tokens` (at least one sample each)."""
    import numpy as np

    ends = np.cumsum(lengths)
    lo = 0
    while lo < len(lengths):
        before = ends[lo - 1] if lo else 0
        hi = max(int(np.searchsorted(ends, before + tokens, side="right")), lo + 1)
        yield lo, hi
        lo = hi


def _finish_cpt(mapped, cfg: TokenizeConfig, pad_id: int, target: Path, run_key: str, budget: int) -> dict:
    import numpy as np
    import pyarrow.compute as pc

    from tunepath.tokenize.cpt import BlockCutter

    if mapped is None:
        return _zero_stats()
    lengths = pc.list_value_length(mapped.table["input_ids"]).to_numpy(zero_copy_only=False).astype(np.int64)
    cutter = BlockCutter(cfg.max_length, cfg.cpt_remainder, cfg.cpt_isolate_documents, pad_id)
    writer = ShardWriter(target, _output_fingerprint(run_key, target))
    progress = DataPass(log, "tokenize cpt: cut and write blocks", 0)
    chunks = 0
    for lo, hi in _windows(lengths, max(budget // 8 // BYTES_PER_CPT_TOKEN, cfg.max_length)):
        writer.write(cutter.add(mapped.rows(lo, hi, ["input_ids"])["input_ids"]))
        progress.step(rows=hi - lo)
        chunks += 1
    writer.write(cutter.finish())
    if chunks > 1:
        progress.done()
    rows = _close(writer, target, {})
    stats = {
        **_zero_stats(),
        "samples_in": len(lengths),
        "samples_out": len(lengths),
        "tokens": cutter.tokens,
        "label_tokens": cutter.tokens,
        "longest": int(lengths.max()) if len(lengths) else 0,
        "dropped_tokens": cutter.dropped_tokens,
        "padding_share_unpacked": padding_share(int(lengths.sum()), int(np.ceil(lengths / cfg.max_length).sum()), cfg.max_length),
        "padding_share_packed": padding_share(cutter.tokens, rows, cfg.max_length),
        "rows": rows,
        "packed": True,
    }
    return stats


def _finish_dpo(mapped, cfg: TokenizeConfig, target: Path, run_key: str) -> dict:
    import numpy as np
    import pyarrow.compute as pc

    if mapped is None:
        return _zero_stats()
    table = mapped.table
    stats, kept = _status_stats(table)
    columns = ["prompt_ids", "chosen_ids", "rejected_ids", "prompt", "chosen", "rejected"]
    pairs = table.select(columns)

    def total(name):  # from the list offsets of the memory-mapped column: no row is read
        lengths = pc.list_value_length(pairs[name]).to_numpy(zero_copy_only=False).astype(np.int64)
        return int(lengths[kept].sum())

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
    _save(mapped, columns, kept, target, stats, run_key)
    return {**_zero_stats(), **stats}


def _finish_kto(mapped, cfg: TokenizeConfig, target: Path, run_key: str) -> dict:
    """Unpaired feedback (KTO): kept examples with their label; desirable ones are counted apart."""
    import numpy as np
    import pyarrow.compute as pc

    if mapped is None:
        return {**_zero_stats(), "desirable": 0}
    table = mapped.table
    stats, kept = _status_stats(table)
    columns = ["prompt_ids", "completion_ids", "label", "prompt", "completion"]
    rows = table.select(columns)

    def total(name):
        lengths = pc.list_value_length(rows[name]).to_numpy(zero_copy_only=False).astype(np.int64)
        return int(lengths[kept].sum())

    prompt, completion = total("prompt_ids"), total("completion_ids")
    share = padding_share(prompt + completion, len(kept), cfg.max_length)
    stats.update(tokens=prompt + completion, label_tokens=completion, padding_share_unpacked=share,
                 padding_share_packed=share, rows=len(kept))
    _save(mapped, columns, kept, target, stats, run_key)
    desirable = int(np.asarray(rows["label"].to_numpy(zero_copy_only=False), dtype=bool)[kept].sum())
    return {**_zero_stats(), **stats, "desirable": desirable}


def _save(mapped, columns: list[str], kept, target: Path, stats: dict, run_key: str) -> None:
    """The kept rows of a split into Arrow shards, `SAVE_WINDOW_ROWS` at a time: preference pairs and feedback
    stream to disk as SFT rows and CPT blocks do, instead of being gathered into one table first."""
    writer = ShardWriter(target, _output_fingerprint(run_key, target))
    progress = DataPass(log, f"tokenize {target.parent.name}/{target.name}: write", 0)
    for lo in range(0, len(kept), SAVE_WINDOW_ROWS):
        window = kept[lo:lo + SAVE_WINDOW_ROWS]
        progress.step(rows=len(window))
        writer.write(mapped.take(window, columns))
    _close(writer, target, stats)
    if len(kept) > SAVE_WINDOW_ROWS:
        progress.done()


def _close(writer: ShardWriter, target: Path, stats: dict) -> int:
    rows = writer.close()
    if not rows:
        log.warning("%s: every record was dropped (%s); nothing written", target, {k: v for k, v in stats.items() if k.startswith("dropped")})
    return rows


def _output_fingerprint(run_key: str, target: Path) -> str:
    # Given, so that datasets does not hash every row: the run's inputs, settings and this output's place.
    return hashlib.sha256(f"{run_key}/{target.parent.name}/{target.name}".encode()).hexdigest()[:32]


def _keep_finished(target: Path, stats: dict, finished: Path) -> None:
    """Hard-links one finished output (rows, blocks or pairs) and its stats into the cache, for `_link_finished`."""
    partial = finished.with_name(finished.name + f".partial-{os.getpid()}")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    if target.exists():
        _link_tree(target, partial / "data")
    (partial / "stats.json").write_text(json.dumps(stats) + "\n", encoding="utf-8")
    shutil.rmtree(finished, ignore_errors=True)
    os.replace(partial, finished)


def _link_finished(finished: Path, target: Path) -> bool:
    """Links a cached finished output into `target`; False when there is none."""
    if not (finished / "stats.json").exists():
        return False
    if (finished / "data").exists():
        _link_tree(finished / "data", target)
    return True


def _link_tree(source: Path, dest: Path) -> None:
    """Hard links where the file system allows (no second copy on disk; readers never write these), else copies."""
    dest.mkdir(parents=True, exist_ok=True)
    for path in source.iterdir():
        try:
            os.link(path, dest / path.name)
        except OSError:
            shutil.copy2(path, dest / path.name)


def _hash_files(folder: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(folder.iterdir()):
        if path.is_file():
            digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


def _settings_digest(plan: EncodePlan, cfg: TokenizeConfig) -> str:
    """What changes the token ids besides the records: tokenizer and template, the id-changing settings, this code."""
    digest = hashlib.sha256()
    digest.update(plan.tokenizer_hash.encode())
    digest.update(json.dumps({k: getattr(cfg, k) for k in CACHE_KEYS}, sort_keys=True, default=str).encode())
    for path in sorted(Path(__file__).parent.glob("*.py")):
        digest.update(path.read_bytes())
    return digest.hexdigest()


def _file_digest(path: Path, known: Path) -> str:
    """sha256 of a file, remembered by path, size, modification time and inode (as DVC's file-state cache does):
    a rerun over unchanged multi-GB records does not read them again to decide."""
    stat = path.stat()
    state = [stat.st_size, stat.st_mtime_ns, stat.st_ino]
    try:
        digests = json.loads(known.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        digests = {}
    entry = digests.get(str(path.resolve()))
    if entry and entry["state"] == state:
        return entry["sha256"]
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    digests[str(path.resolve())] = {"state": state, "sha256": digest.hexdigest()}
    known.parent.mkdir(parents=True, exist_ok=True)
    partial = known.with_name(known.name + f".partial-{os.getpid()}")
    partial.write_text(json.dumps(digests) + "\n", encoding="utf-8")
    os.replace(partial, known)
    return digest.hexdigest()


def _cache_root(cfg: TokenizeConfig) -> Path:
    if cfg.cache_dir:
        return Path(cfg.cache_dir)
    import datasets

    return Path(datasets.config.HF_DATASETS_CACHE) / "tunepath-tokenize"
