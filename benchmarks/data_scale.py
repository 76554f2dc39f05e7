"""Benchmark of the data stages at scale: wall time, CPU time and peak memory of validate and tokenize.

Usage:

    python -m benchmarks.data_scale                              # 10k, 100k, 1M chats; 100 MB, 1 GB of text
    python -m benchmarks.data_scale --chats 10k,100k --text 100MB   # a quick run
    python -m benchmarks.data_scale --chats 3M --text 5GB --workdir /big/disk
    python -m benchmarks.data_scale --chats 600k --text '' --stages validate --layout json   # one JSON array

Generates chats (1-4 exchanges, a third with a system prompt, answers of a few words to a few hundred) and
text documents (a few hundred bytes to 60 KB) as JSONL under the work folder, then runs, each in a fresh
child process with the stages' defaults (`data.num_proc` all cores, `data.memory_gb` 4): validate, tokenize
(max length 2048, its own cache), tokenize again (the no-change rerun, served by the cache), and the raw
baseline: the fast tokenizer's `encode_batch` (batched, on the tokenizer's thread pool over every core) on
the same rendered chats or texts, 10,000 at a time. The tokenizer is a ChatML BPE trained here (as in
benchmarks/tokenize.py). Wall and CPU time are the stage call's
own (after the imports; CPU counts every thread and worker process); the process wall time includes the
interpreter and imports; peak RSS comes from `wait4` on the child and is the largest single process of its
tree (map workers share pages with their parent, so summing them would count those twice); the tree's peak
(`peak_tree_rss_gb`, sampled every 0.2 s) sums every process of it, an upper bound of a worker pool's memory. The raw row's
wall and CPU time count the `encode_batch` calls only (rendering and reading excluded): the tokenizer's
own speed.

Prints a markdown table and writes the figures as JSON to benchmarks/results/ (unless --out says otherwise).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path

CHUNK = 10_000  # texts per encode_batch call in the raw baseline


def _size(text: str) -> int:
    """10k, 1M, 3M (rows) or 100MB, 1GB (bytes) as a number."""
    text = text.strip().upper()
    for suffix, factor in (("GB", 1 << 30), ("MB", 1 << 20), ("KB", 1 << 10), ("K", 1_000), ("M", 1_000_000), ("B", 1)):
        if text.endswith(suffix):
            return int(float(text[: -len(suffix)]) * factor)
    return int(text)


def _pool(seed: int = 0, n: int = 20_000) -> list[str]:
    """Sentences to draw from: drawing whole sentences keeps generating 1M chats to seconds."""
    from benchmarks.tokenize import _sentence

    rng = random.Random(seed)
    return [_sentence(rng, rng.randint(3, 24)) for _ in range(n)]


def write_chats(path: Path, n: int, seed: int = 0) -> int:
    rng, pool = random.Random(seed), _pool(seed)
    with open(path, "w", encoding="utf-8") as f:
        for _ in range(n):
            messages = [{"role": "system", "content": rng.choice(pool)}] if rng.random() < 0.3 else []
            for _ in range(rng.choice([1, 1, 1, 2, 2, 3, 4])):
                messages.append({"role": "user", "content": " ".join(rng.choices(pool, k=rng.randint(1, 3)))})
                messages.append({"role": "assistant", "content": " ".join(rng.choices(pool, k=max(1, int(2 ** rng.uniform(0, 5)))))})
            f.write(json.dumps({"messages": messages}, ensure_ascii=False) + "\n")
    return n


def write_text(path: Path, size: int, seed: int = 0) -> int:
    rng, pool = random.Random(seed), _pool(seed)
    written = docs = 0
    with open(path, "w", encoding="utf-8") as f:
        while written < size:
            line = json.dumps({"text": " ".join(rng.choices(pool, k=max(2, int(2 ** rng.uniform(2, 10)))))}, ensure_ascii=False) + "\n"
            f.write(line)
            written += len(line.encode())
            docs += 1
    return docs


def relayout(jsonl: Path, layout: str) -> Path:
    """The generated JSONL as one JSON array (as alpaca_data.json ships) or as a CSV file of instruction,output
    pairs (the first exchange of each chat, the text of each document), written a line at a time."""
    import csv

    if layout == "jsonl":
        return jsonl
    out = jsonl.with_suffix(f".{layout}")
    with open(jsonl, encoding="utf-8") as src, open(out, "w", encoding="utf-8", newline="") as dst:
        if layout == "json":
            dst.write("[\n")
            for i, line in enumerate(src):
                dst.write(("" if i == 0 else ",\n") + line.rstrip("\n"))
            dst.write("\n]\n")
        else:
            writer = csv.writer(dst, lineterminator="\n")
            for i, line in enumerate(src):
                row = json.loads(line)
                if i == 0:
                    writer.writerow(["instruction", "output"] if "messages" in row else ["text"])
                if "messages" in row:
                    turns = [m for m in row["messages"] if m["role"] != "system"]
                    writer.writerow([turns[0]["content"], turns[1]["content"]])
                else:
                    writer.writerow([row["text"]])
    jsonl.unlink()
    return out


def _child(args) -> dict:
    """One stage in this fresh process; the timed part starts after the imports."""
    import logging

    logging.basicConfig(level=logging.WARNING)
    from datasets import disable_progress_bars

    disable_progress_bars()
    work = Path(args.workdir)
    if args.child == "validate":
        from tunepath.sections import DataConfig
        from tunepath.validate import ValidateConfig, run_validate

        started, used = time.perf_counter(), _cpu()
        summary = run_validate(ValidateConfig(), work / "raw", work / "validate", data=DataConfig(num_proc=args.num_proc, engine=args.engine))
        return {"seconds": time.perf_counter() - started, "cpu": _cpu() - used, "read": summary.get("read"), "accepted": summary.get("accepted"),
                "rejected": summary.get("rejected"), "cpu_s": summary.get("cpu_s"), "num_proc": args.num_proc}
    if args.child == "tokenize":
        from tunepath.sections import DataConfig, ModelConfig
        from tunepath.tokenize import TokenizeConfig, run_tokenize

        from transformers import AutoTokenizer  # noqa: F401  imported before the clock, as in the raw baseline
        import tunepath.tokenize.stage  # noqa: F401

        cfg = TokenizeConfig(max_length=args.max_length, cache_dir=str(work / "cache"))
        started, used = time.perf_counter(), _cpu()
        summary = run_tokenize(cfg, ModelConfig(base=args.model), work / "validate", work / "tokenize", data=DataConfig(num_proc=args.num_proc, engine=args.engine))
        return {"seconds": time.perf_counter() - started, "cpu": _cpu() - used, "cached": summary["cached"], "timings": summary["timings"]}
    return _raw(args, work)


def _raw(args, work: Path) -> dict:
    """The fast tokenizer's encode_batch on every record of the train and eval splits, CHUNK at a time."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    fast = tokenizer.backend_tokenizer
    seconds = cpu = 0.0
    tokens = texts_done = 0

    def encode(texts):
        nonlocal seconds, cpu, tokens, texts_done
        started, used = time.perf_counter(), _cpu()
        encodings = fast.encode_batch(texts, add_special_tokens=False)
        seconds += time.perf_counter() - started
        cpu += _cpu() - used
        tokens += sum(len(e.ids) for e in encodings)
        texts_done += len(texts)

    batch: list[str] = []
    from tunepath.records import record_files

    for path in record_files(work / "validate"):
        with open(path, encoding="utf-8") as f:
            for line in f:
                record = json.loads(line)
                if record["kind"] == "conversation":
                    batch.append(tokenizer.apply_chat_template(record["messages"], tokenize=False))
                elif record["kind"] == "text":
                    batch.append(record["text"])
                if len(batch) == CHUNK:
                    encode(batch)
                    batch = []
    if batch:
        encode(batch)
    return {"seconds": seconds, "cpu": cpu, "tokens": tokens, "texts": texts_done, "threads": os.environ.get("RAYON_NUM_THREADS", "all")}


def _cpu() -> float:
    """CPU seconds of this process (every thread) and of its finished children (map workers)."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def run_child(args, stage: str) -> dict:
    """Runs one stage in a child process; its own figures plus wall, CPU and peak RSS from wait4."""
    import subprocess

    root = str(Path(__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
    env.pop("TOKENIZERS_PARALLELISM", None)  # what a user's shell has: the tokenizer's thread pool on
    command = [sys.executable, "-m", "benchmarks.data_scale", "--child", stage, "--workdir", str(args.workdir),
               "--model", args.model, "--max-length", str(args.max_length), "--engine", args.engine] + (["--num-proc", str(args.num_proc)] if args.num_proc else [])
    out_path = Path(args.workdir) / f"child-{stage}.json"
    started = time.perf_counter()
    with open(out_path, "w") as out, open(Path(args.workdir) / f"child-{stage}.log", "w") as err:
        child = subprocess.Popen(command, stdout=out, stderr=err, env=env, cwd=root)
        tree = _TreeMemory(child.pid)
        _, status, usage = os.wait4(child.pid, 0)
        tree.stop()
    wall = time.perf_counter() - started
    child.returncode = os.waitstatus_to_exitcode(status)
    if child.returncode:
        tail = (Path(args.workdir) / f"child-{stage}.log").read_text(errors="replace")[-2000:]
        return {"stage": stage, "failed": child.returncode, "wall": round(wall, 2), "peak_rss_gb": round(usage.ru_maxrss / (1 << 20), 3), "error": tail}
    figures = json.loads(out_path.read_text().strip().splitlines()[-1])
    return {"stage": stage, "process_wall": round(wall, 2), "process_cpu": round(usage.ru_utime + usage.ru_stime, 2),
            "peak_rss_gb": round(usage.ru_maxrss / (1 << 20), 3), "peak_tree_rss_gb": round(tree.peak / (1 << 30), 3),
            "tree_cpu": round(tree.cpu, 2),
            "load_average": round(os.getloadavg()[0], 2), **figures}


class _TreeMemory:
    """The largest sum of RSS over a process and its descendants, sampled every 0.2 s: a worker pool's memory is
    the sum of its processes (an upper bound: pages forked workers share with their parent count twice). Also
    the CPU seconds of every process seen in the tree, as last sampled: Ray's daemons and actors are not reaped
    by the stage's process, so wait4 does not count them (a lower bound: up to 0.2 s a process is missed)."""

    def __init__(self, pid: int) -> None:
        import threading

        import psutil

        self.peak, self._stop, self._cpu = 0, threading.Event(), {}
        self._root = psutil.Process(pid)
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        import psutil

        while not self._stop.wait(0.2):
            try:
                procs = [self._root, *self._root.children(recursive=True)]
            except psutil.Error:
                return
            total = 0
            for proc in procs:
                try:
                    total += proc.memory_info().rss
                    times = proc.cpu_times()
                    self._cpu[proc.pid, proc.create_time()] = times.user + times.system
                except psutil.Error:
                    pass
            self.peak = max(self.peak, total)

    @property
    def cpu(self) -> float:
        return sum(self._cpu.values())

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def run_size(args, label: str, make) -> list[dict]:
    import shutil

    work = Path(args.workdir)
    for name in ("raw", "validate", "tokenize", "cache"):
        shutil.rmtree(work / name, ignore_errors=True)
    (work / "raw").mkdir(parents=True)
    clock = time.perf_counter()
    rows = make(work / "raw" / "data.jsonl")
    if args.layout != "jsonl":
        if "validate" not in args.stages:
            raise SystemExit("--layout json or csv needs the validate stage (it reads the layout)")
        relayout(work / "raw" / "data.jsonl", args.layout)
        label += f" ({args.layout})"
    generated = time.perf_counter() - clock
    size = sum(p.stat().st_size for p in (work / "raw").iterdir())
    print(f"{label}: {rows:,} rows, {size / 1e6:,.0f} MB generated in {generated:.0f} s", file=sys.stderr, flush=True)
    if "validate" not in args.stages:
        _records_from_raw(work / "raw" / "data.jsonl", work / "validate")
    results = []
    wanted = [s for s in ("validate", "tokenize", "rerun", "raw") if s in args.stages]
    for stage in (s.replace("rerun", "tokenize") for s in wanted):
        result = run_child(args, stage)
        result.update(data=label, rows=rows, bytes=size, engine=args.engine)
        if args.engine != "local" and stage != "raw":
            result["stage"] += f" ({args.engine})"
        if stage == "tokenize" and any(r["stage"].startswith("tokenize") for r in results):
            result["stage"] = result["stage"].replace("tokenize", "tokenize rerun")
        print(f"  {result['stage']}: {result.get('seconds', 0):.1f} s, {result.get('cpu', 0):.1f} CPU-s, {result.get('peak_rss_gb')} GB"
              + (f" FAILED {result['failed']}" if result.get("failed") else ""), file=sys.stderr, flush=True)
        results.append(result)
        if result.get("failed") and stage == "validate":
            break
    stats_path = work / "tokenize" / "stats.json"
    if stats_path.exists():
        stats = json.loads(stats_path.read_text())
        tokens = stats["sft"]["train"]["tokens"] + stats["sft"]["eval"]["tokens"] + stats["cpt"]["train"]["tokens"] + stats["cpt"]["eval"]["tokens"]
        for r in results:
            r["stage_tokens"] = tokens
        results[0]["tokenize_stats"] = {k: {s: {n: v[s].get(n) for n in ("samples_out", "tokens", "rows", "padding_share_packed", "pack_windows")} for s in ("train", "eval")}
                                        for k, v in stats.items() if k in ("sft", "cpt")}
    return results


def packing_waste(model: str, sample: int, sizes: list[int], max_length: int) -> list[dict]:
    """Padding share of SFT rows packed best-fit per window (the stage now) and in one global packing (the stage
    before windows), on chat lengths drawn from `sample` generated chats tokenized by `model` (resampled to
    each size: packing needs the lengths only)."""
    import numpy as np
    from transformers import AutoTokenizer

    from tunepath.tokenize import stage
    from tunepath.tokenize.packing import best_fit_decreasing, padding_share

    path = Path(tempfile.mkdtemp(prefix="tunepath-bench-pack-")) / "chats.jsonl"
    write_chats(path, sample, seed=1)
    tokenizer = AutoTokenizer.from_pretrained(model)
    with open(path, encoding="utf-8") as f:
        texts = [tokenizer.apply_chat_template(json.loads(line)["messages"], tokenize=False) for line in f]
    measured = np.array([len(e.ids) for e in tokenizer.backend_tokenizer.encode_batch(texts, add_special_tokens=False)]).clip(max=max_length)
    out = []
    for size in sizes:
        lengths = np.random.default_rng(size).choice(measured, size=size)
        tokens = int(lengths.sum())
        started = time.perf_counter()
        whole = len(best_fit_decreasing(lengths.tolist(), max_length))
        whole_s = time.perf_counter() - started
        started = time.perf_counter()
        windows = [len(best_fit_decreasing(lengths[lo:hi].tolist(), max_length))
                   for lo, hi in stage._windows(lengths, max(stage.PACK_WINDOW_TOKENS, 16 * max_length))]
        windows_s = time.perf_counter() - started
        out.append({"samples": size, "tokens": tokens, "windows": len(windows),
                    "global": {"rows": whole, "padding_share": padding_share(tokens, whole, max_length), "seconds": round(whole_s, 2)},
                    "windowed": {"rows": sum(windows), "padding_share": padding_share(tokens, sum(windows), max_length), "seconds": round(windows_s, 2)}})
        print(f"packing {size:,} samples: global {out[-1]['global']}, windowed {out[-1]['windowed']} ({len(windows)} windows)", file=sys.stderr, flush=True)
    return out


def _records_from_raw(raw: Path, out: Path) -> None:
    """Canonical records straight from the generated rows, for runs that leave validate out (every 50th to eval)."""
    (out / "records").mkdir(parents=True, exist_ok=True)
    with open(raw, encoding="utf-8") as src, open(out / "records" / "records-00000.jsonl", "w", encoding="utf-8") as dst:
        for i, line in enumerate(src):
            row = json.loads(line)
            kind = "conversation" if "messages" in row else "text"
            record = {"id": f"{i:016x}", "kind": kind, "split": "eval" if i % 50 == 0 else "train",
                      "source": {"file": "data.jsonl", "line": i + 1}, **row}
            dst.write(json.dumps(record, ensure_ascii=False) + "\n")


def table(results: list[dict], cores: int) -> str:
    lines = ["| data | stage | wall s | CPU s | process wall s | peak RSS GB | tree RSS GB | tokens/s | per core | vs raw, wall | vs raw, CPU |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for data in dict.fromkeys(r["data"] for r in results):
        group = [r for r in results if r["data"] == data]
        raw = next((r for r in group if r["stage"] == "raw" and not r.get("failed")), None)
        for r in group:
            if r.get("failed"):
                lines.append(f"| {data} | {r['stage']} | | | {r['wall']} | {r['peak_rss_gb']:.2f} | | failed (exit {r['failed']}) | | | |")
                continue
            tokens = r.get("tokens") if r["stage"] == "raw" else r.get("stage_tokens")
            timed = tokens and r["stage"].split(" (")[0] in ("raw", "tokenize")
            speed = f"{tokens / r['seconds']:,.0f} | {tokens / r['seconds'] / cores:,.0f}" if timed else " | "
            ratio = f"{raw['seconds'] / r['seconds']:.2f} | {raw['cpu'] / r['cpu']:.2f}" if raw and r["stage"].split(" (")[0] == "tokenize" else " | "
            lines.append(f"| {data} | {r['stage']} | {r['seconds']:.1f} | {r['cpu']:.1f} | {r['process_wall']:.1f} | {r['peak_rss_gb']:.2f} | {r.get('peak_tree_rss_gb', 0):.2f} | {speed} | {ratio} |")
    return "\n".join(lines)


def _command(argv: list[str]) -> str:
    """The command line without its folders (they name this machine's paths)."""
    kept, skip = [], False
    for arg in argv:
        if skip or arg.startswith(("--workdir=", "--out=", "--model=")):
            skip = False
            continue
        if arg in ("--workdir", "--out", "--model"):
            skip = True
            continue
        kept.append(arg)
    return " ".join(["python -m benchmarks.data_scale", *kept])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--chats", default="10k,100k,1M", help="conversation counts, comma-separated ('' for none)")
    parser.add_argument("--text", default="100MB,1GB", help="text sizes, comma-separated ('' for none)")
    parser.add_argument("--max-length", type=int, default=2048)
    parser.add_argument("--stages", default="validate,tokenize,rerun,raw",
                        help="which to run; without validate, records are written straight from the generated rows")
    parser.add_argument("--model", help="a model folder whose tokenizer to use (default: one trained here)")
    parser.add_argument("--workdir", help="folder for data, outputs and caches (default: a temporary one; needs ~25x the largest input)")
    parser.add_argument("--out", help="JSON path (default: benchmarks/results/data_scale_cpu<cores>_<date>.json)")
    parser.add_argument("--packing", default="", help="also compare windowed and global packing at these sample counts (e.g. 100k,1M)")
    parser.add_argument("--num-proc", type=int, help="data.num_proc for the stages (default: every core), e.g. 1 to measure the speed-up")
    parser.add_argument("--engine", choices=["local", "ray"], default="local",
                        help="data.engine for the stages: ray starts a local Ray instance in each stage (needs the ray extra)")
    parser.add_argument("--layout", choices=["jsonl", "json", "csv"], default="jsonl",
                        help="the raw file's layout: JSONL, one JSON array, or CSV (instruction,output)")
    parser.add_argument("--child", choices=["validate", "tokenize", "raw"], help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(_child(args)))
        return 0

    args.workdir = Path(args.workdir or tempfile.mkdtemp(prefix="tunepath-bench-scale-"))
    args.workdir.mkdir(parents=True, exist_ok=True)
    if not args.model:
        from benchmarks.tokenize import build_tokenizer

        args.model = str(build_tokenizer(args.workdir / "tokenizer", _pool(1, 5000)))
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    out = Path(args.out) if args.out else Path(__file__).resolve().parent / "results" / f"data_scale_cpu{cores}_{time.strftime('%Y-%m-%d')}.json"
    results: list[dict] = []
    packing: list[dict] = []

    def save() -> dict:  # after each size, so that a long run killed part-way keeps what it measured
        figures = {"packing": packing, "date": time.strftime("%Y-%m-%d"), "cpu_cores": cores, "load_average": round(os.getloadavg()[0], 2),
                   "memory_gb": round(os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / (1 << 30), 1), "max_length": args.max_length,
                   "command": _command(argv if argv is not None else sys.argv[1:]), "results": results}
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(figures, indent=2) + "\n", encoding="utf-8")
        return figures

    for n in filter(None, args.chats.split(",")):
        results += run_size(args, f"{_size(n):,} chats", lambda p, n=n: write_chats(p, _size(n)))
        save()
    for size in filter(None, args.text.split(",")):
        results += run_size(args, f"{size} text", lambda p, size=size: write_text(p, _size(size)))
        figures = save()
    if args.packing:
        packing += packing_waste(args.model, 20_000, [_size(n) for n in args.packing.split(",")], args.max_length)
    figures = save()
    print(table(results, cores))
    print(f"\n{cores} cores, {figures['memory_gb']} GB, load average {figures['load_average']}; figures in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
