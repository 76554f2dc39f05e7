"""Benchmark of the validate stage: generated conversations through `run_validate` in a fresh process.

Usage:

    python -m benchmarks.validate                 # 100,000 conversations (a fifth with tool calls), 2 cores
    python -m benchmarks.validate --rows 20000 --cores 1

A fifth of the conversations carry tool calls, half in the OpenAI layout (`tools`, `tool_calls`, `tool`
messages) and half in the ShareGPT one (`function_call` and `observation` turns); each layout is a file of
its own. After the stage, the child times reading and normalising each file alone: rows/s per layout.

The stage runs in a child process pinned to `--cores` CPUs so that the wall time includes the interpreter
start and every import (Great Expectations alone takes several seconds), as it does in a pipeline run.
The CPU time is printed too: on a shared machine it is the steadier figure.
About 1% of the generated rows are bad on purpose, so the quarantine path is exercised too.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

WORDS = ("the model data train token answer question system user assistant value result file line error report "
         "check split learn rate batch layer weight query context retrieve document policy reward pair").split()


def _sentence(rng: random.Random, low: int, high: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(low, high))).capitalize() + "."


def _conversation(rng: random.Random, i: int) -> dict:
    messages = [{"role": "system", "content": "You are a helpful assistant."}] if rng.random() < 0.3 else []
    for turn in range(rng.randint(1, 3)):
        messages.append({"role": "user", "content": f"Question {i}.{turn}: {_sentence(rng, 5, 30)}"})
        messages.append({"role": "assistant", "content": _sentence(rng, 10, 80)})
    return {"messages": messages}


def _bad_line(rng: random.Random, i: int) -> str:
    good = json.dumps(_conversation(rng, i))
    return rng.choice([
        good[: len(good) // 2],                                              # truncated line
        json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": " "}]}),
        json.dumps({"messages": [{"role": None, "content": ["a"]}]}),        # wrong types
        json.dumps({"messages": [{"role": "tool", "content": "x"}]}),        # unknown role, bad order
        '"just a string"',
    ])


TOOL_NAMES = ("get_weather", "search_docs", "convert_units", "lookup_order")


def _schemas() -> list[dict]:
    return [{"name": name, "description": f"{name.replace('_', ' ')} for the user",
             "parameters": {"type": "object", "properties": {"query": {"type": "string"}}, "required": ["query"]}}
            for name in TOOL_NAMES]


def _openai_tools(rng: random.Random, i: int) -> dict:
    name = rng.choice(TOOL_NAMES)
    call_id = f"call_{i}"
    return {"tools": [{"type": "function", "function": f} for f in _schemas()], "messages": [
        {"role": "user", "content": f"Question {i}: {_sentence(rng, 5, 30)}"},
        {"role": "assistant", "content": None, "tool_calls": [{"id": call_id, "type": "function", "function": {
            "name": name, "arguments": json.dumps({"query": _sentence(rng, 2, 6)})}}]},
        {"role": "tool", "tool_call_id": call_id, "name": name, "content": json.dumps({"result": _sentence(rng, 5, 20)})},
        {"role": "assistant", "content": _sentence(rng, 10, 60)},
    ]}


def _sharegpt_tools(rng: random.Random, i: int) -> dict:
    name = rng.choice(TOOL_NAMES)
    return {"tools": json.dumps(_schemas()), "conversations": [
        {"from": "human", "value": f"Question {i}: {_sentence(rng, 5, 30)}"},
        {"from": "function_call", "value": json.dumps({"name": name, "arguments": {"query": _sentence(rng, 2, 6)}})},
        {"from": "observation", "value": json.dumps({"result": _sentence(rng, 5, 20)})},
        {"from": "gpt", "value": _sentence(rng, 10, 60)},
    ]}


LAYOUTS = {"chat.jsonl": ("openai, plain", _conversation, 0.8), "tools_openai.jsonl": ("openai, tool calls", _openai_tools, 0.1),
           "tools_sharegpt.jsonl": ("sharegpt, tool calls", _sharegpt_tools, 0.1)}


def generate(raw_dir: Path, rows: int, seed: int = 0) -> int:
    """Write `rows` conversations (about 1% bad) over the LAYOUTS files and return their size in bytes."""
    rng = random.Random(seed)
    raw_dir.mkdir(parents=True, exist_ok=True)
    size, start = 0, 0
    for name, (_, make, share) in LAYOUTS.items():
        count = round(rows * share) if name != "tools_sharegpt.jsonl" else rows - start
        with open(raw_dir / name, "w", encoding="utf-8") as f:
            for i in range(start, start + count):
                line = _bad_line(rng, i) if rng.random() < 0.01 else json.dumps(make(rng, i))
                f.write(line + "\n")
        start += count
        size += (raw_dir / name).stat().st_size
    return size


# The measured part runs as `python -c` in a neutral folder: run as a script, benchmarks/ would be first on
# sys.path, where scripts named like standard modules (tokenize.py) shadow them.
_CHILD = """
import json, resource, sys
from pathlib import Path
from tunepath.validate import ValidateConfig, run_validate
summary = run_validate(ValidateConfig(), Path(sys.argv[1]), Path(sys.argv[2]))
summary["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
import time
from tunepath.validate.formats import Normaliser
from tunepath.validate.readers import read_rows
normaliser, layouts, begun = Normaliser(ValidateConfig()), {}, time.perf_counter()
for path in sorted(Path(sys.argv[1]).iterdir()):
    start, n = time.process_time(), 0
    for row in read_rows(path, path.name):
        n += 1
        if not row.reasons:
            normaliser.normalise(row)
    layouts[path.name] = [n, time.process_time() - start]
summary["layouts"] = layouts
summary["layouts_wall_s"] = time.perf_counter() - begun
print(json.dumps(summary))
"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=100_000, help="generated conversations")
    parser.add_argument("--cores", type=int, default=2, help="CPUs the stage process may use")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        raw, out = Path(tmp) / "raw", Path(tmp) / "out"
        size = generate(raw, args.rows)
        cores = sorted(os.sched_getaffinity(0))[: args.cores]
        start = time.perf_counter()
        proc = subprocess.run([sys.executable, "-c", _CHILD, str(raw), str(out)], capture_output=True, text=True,
                              cwd=tmp, preexec_fn=lambda: os.sched_setaffinity(0, cores))
        wall = time.perf_counter() - start
        usage = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu = usage.ru_utime + usage.ru_stime
        if proc.returncode != 0:
            print(proc.stderr, file=sys.stderr)
            return proc.returncode
        s = json.loads(proc.stdout.strip().splitlines()[-1])
        # the per-layout pass after the stage is not part of it
        wall -= s["layouts_wall_s"]
        cpu -= sum(c for _, c in s["layouts"].values())
        w, c = s["timings_s"], s["cpu_s"]
        # the chunks are read, normalised, checked and written by the worker pool at once: one phase
        phases = [("read_check", "read + normalise + GX contracts + split (chunks, worker pool)"),
                  ("write", "shards, rejects, report")]
        rows = [
            ("rows read", f"{s['read']:,} ({size / 2**20:.0f} MiB JSONL)", ""),
            ("accepted / rejected", f"{s['accepted']:,} / {s['rejected']:,}", ""),
            ("cores", str(len(cores)), ""),
            ("whole process incl. interpreter and imports", f"{wall:.1f} s", f"{cpu:.1f} s"),
            *[(f"  {label}", f"{w[k]:.1f} s", f"{c[k]:.1f} s") for k, label in phases],
            ("  interpreter, other imports, config", f"{wall - sum(w.values()):.1f} s", f"{cpu - sum(c.values()):.1f} s"),
            ("rows/s, whole process", f"{s['read'] / wall:,.0f}", f"{s['read'] / cpu:,.0f}"),
            ("peak RSS", f"{s['peak_rss_mb']:,.0f} MiB", ""),
        ]
        rows += [(f"rows/s read + normalise, {LAYOUTS[name][0]} ({n:,} rows)", "", f"{n / cpu_s:,.0f}")
                 for name, (n, cpu_s) in s["layouts"].items()]
        width = max(len(r[0]) for r in rows)
        print(f"| {'validate benchmark':<{width}} | wall | CPU (user+sys) |\n|{'-' * (width + 2)}|---:|---:|")
        for name, wall_value, cpu_value in rows:
            print(f"| {name:<{width}} | {wall_value} | {cpu_value} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
