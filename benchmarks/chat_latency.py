"""Where `tunepath chat`'s first token waits: process start to the first streamed byte, and its parts.

    python -m benchmarks.chat_latency --model models/demo                 # after `tunepath demo`
    python -m benchmarks.chat_latency --model artifacts/merge/model --runs 5 --typing 6

Figures, each from a fresh process (median, min, max over --runs):

- `tunepath --help` and `tunepath chat --help`, start to exit (no torch, no transformers);
- `--once`: `tunepath chat --model M --once Q`, start to the first byte on stdout, and to exit;
- interactive, question piped at start: the question is on stdin before the process starts;
- interactive, question after --typing s: a person typing. The model loads while the question is typed, so the
  figure is the wait from Enter to the first byte;
- the parts, timed inside one fresh process in the order chat runs them: the interpreter, `import torch`,
  transformers' model code (imported as chat imports it; on the fast path `tunepath.serve.lite` and its folder
  check instead), tokenizer, weights, the prompt encoder (the chat template compile), the prompt's ids, the
  first token (streamed), the second. Each with the process's CPU seconds: wall time on a shared machine is
  the CPU time stretched by the load.

The figures are for the path chat takes for the model with the code on PYTHONPATH (`fast`: without
transformers, `full`: transformers; the header says which). The load average (1 min) before and after and the
core count come with the table; the JSON goes to `benchmarks/results/chat_latency_<machine>_<path>_<date>.json`.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

QUESTION = "Where is my order NW-1001?"
RESULTS = Path(__file__).resolve().parent / "results"

# What both phase scripts start and end with: a lap per step (wall clock and the process's CPU seconds),
# printed as one JSON line of parts.
LAPS = r"""
import json, resource, sys, time
rows = []
def lap(name):
    r = resource.getrusage(resource.RUSAGE_SELF)
    rows.append((name, time.time(), r.ru_utime + r.ru_stime))
lap("interpreter start")
import torch
lap("import torch")
"""
REPORT = r"""
out, last = [], (float(sys.argv[1]), 0.0)
for name, t, cpu in rows:
    out.append({"part": name, "wall_s": t - last[0], "cpu_s": cpu - last[1]})
    last = (t, cpu)
print(json.dumps({"parts": out, "threads": torch.get_num_threads()}))
"""

# Runs in a fresh interpreter: the steps of `tunepath chat --once` on the transformers path, each timed; prints
# one JSON line.
PHASES_FULL = r"""
from tunepath.serve.terminal import _import_transformers_lean, _use_idle_cores
_import_transformers_lean()
from transformers import AutoModelForCausalLM, AutoTokenizer, TextIteratorStreamer
from transformers.utils import logging
logging.disable_progress_bar()
lap("import transformers (model, generation)")
folder = sys.argv[2]
tokenizer = AutoTokenizer.from_pretrained(folder)
lap("tokenizer")
_use_idle_cores()
model = AutoModelForCausalLM.from_pretrained(folder).eval()
lap("weights")
from tunepath.serve.prompt import PromptEncoder
prompts = PromptEncoder(tokenizer, tokenizer.chat_template)
lap("prompt encoder (template compile)")
ids = prompts.encode([{"role": "user", "content": sys.argv[3]}])
lap("prompt ids")
import threading
streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
def run():
    with torch.no_grad():
        model.generate(input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                       max_new_tokens=16, do_sample=False, streamer=streamer, pad_token_id=tokenizer.pad_token_id or 0)
worker = threading.Thread(target=run); worker.start()
pieces = iter(streamer)
next(pieces, None)
lap("first streamed piece")
next(pieces, None)
lap("second streamed piece")
for _ in pieces:
    pass
worker.join()
"""

# The same for the fast path (tunepath.serve.lite), which chat takes for a folder it supports.
PHASES_FAST = r"""
from pathlib import Path
from tunepath.serve import lite
from tunepath.serve.terminal import _use_idle_cores
folder = Path(sys.argv[2])
assert lite.unsupported(folder) is None
lap("import tunepath.serve.lite, check the folder")
tokenizer = lite.LiteTokenizer(folder)
lap("tokenizer")
_use_idle_cores()
config = lite._read(folder / "config.json")
weights = lite.load_weights(folder, config.get("dtype"))
lap("weights")
from tunepath.serve.prompt import PromptEncoder
prompts = PromptEncoder(tokenizer, tokenizer.chat_template)
lap("prompt encoder (template compile)")
ids = prompts.encode([{"role": "user", "content": sys.argv[3]}])
lap("prompt ids")
decoder = lite.Decoder(config, weights)
with torch.inference_mode():
    token = int(torch.argmax(decoder.forward(ids)))
    piece = tokenizer.decode([token])
    lap("first token")
    token = int(torch.argmax(decoder.forward([token])))
    lap("second token")
"""


def chat_argv(model: str, once: bool) -> list[str]:
    return [sys.executable, "-m", "tunepath.cli", "chat", "--model", model, "--max-tokens", "32",
            *(["--once", QUESTION] if once else [])]


def timed_exit(argv: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "tunepath.cli", *argv], check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


def first_byte(model: str, once: bool, typing: float | None = None) -> tuple[float, float]:
    """Seconds to the answer's first byte on stdout (from start, or from the question's Enter when `typing`),
    and from start to exit."""
    start = time.perf_counter()
    proc = subprocess.Popen(chat_argv(model, once), stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    asked = start
    if not once:
        if typing:
            time.sleep(typing)
        asked = time.perf_counter()
        proc.stdin.write(f"{QUESTION}\n".encode())
        proc.stdin.flush()
    os.read(proc.stdout.fileno(), 1)
    first = time.perf_counter() - asked
    if not once:
        proc.stdin.close()
    proc.stdout.read()
    proc.wait()
    if proc.returncode:
        raise SystemExit(f"tunepath chat exited {proc.returncode}; run it by hand: {' '.join(chat_argv(model, once))}")
    return first, time.perf_counter() - start


def chat_path(model: str) -> str:
    """Which path `tunepath chat` takes for `model` in the code on sys.path ("fast" or "full")."""
    code = ("import sys\ntry:\n from tunepath.serve.lite import unsupported\nexcept ImportError:\n print('full'); raise SystemExit\n"
            "print('full' if unsupported(sys.argv[1]) else 'fast')")
    return subprocess.run([sys.executable, "-c", code, model], capture_output=True, text=True, check=True).stdout.strip()


def parts(model: str, path: str) -> dict:
    phases = LAPS + (PHASES_FAST if path == "fast" else PHASES_FULL) + REPORT
    done = subprocess.run([sys.executable, "-c", phases, repr(time.time()), model, QUESTION], capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def summary(values: list[float]) -> dict:
    return {"median_s": statistics.median(values), "min_s": min(values), "max_s": max(values), "runs": values}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="models/demo", help="a model folder (default models/demo, made by `tunepath demo`)")
    parser.add_argument("--runs", type=int, default=3, help="fresh processes per figure (default 3)")
    parser.add_argument("--typing", type=float, default=8.0, help="seconds a person takes to type the question (default 8)")
    parser.add_argument("--out", type=Path, default=None, help="JSON file (default benchmarks/results/chat_latency_<machine>_<date>.json)")
    args = parser.parse_args(argv)
    if not (Path(args.model) / "config.json").exists():
        parser.error(f"--model {args.model}: not a model folder (no config.json); run `tunepath demo` or pass artifacts/merge/model")

    path = chat_path(args.model)
    load_before = os.getloadavg()[0]
    figures = {"tunepath --help": [], "tunepath chat --help": [], "--once: first token": [], "--once: exit": [], "interactive, question piped: first token": [],
               f"interactive, typed in {args.typing:g} s: Enter to first token": []}
    breakdowns = []
    for _ in range(args.runs):
        figures["tunepath --help"].append(timed_exit(["--help"]))
        figures["tunepath chat --help"].append(timed_exit(["chat", "--help"]))
        first, done = first_byte(args.model, once=True)
        figures["--once: first token"].append(first)
        figures["--once: exit"].append(done)
        figures["interactive, question piped: first token"].append(first_byte(args.model, once=False)[0])
        figures[f"interactive, typed in {args.typing:g} s: Enter to first token"].append(first_byte(args.model, once=False, typing=args.typing)[0])
        breakdowns.append(parts(args.model, path))
    load_after = os.getloadavg()[0]

    names = [p["part"] for p in breakdowns[0]["parts"]]
    part_rows = {n: {"wall": summary([b["parts"][k]["wall_s"] for b in breakdowns]),
                     "cpu": summary([b["parts"][k]["cpu_s"] for b in breakdowns])} for k, n in enumerate(names)}
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    print(f"model: {args.model}; chat path: {path}; cores: {cores}; load average (1 min) before/after: {load_before:.2f}/{load_after:.2f}; "
          f"runs: {args.runs}; generate threads: {breakdowns[0]['threads']}")
    print("| figure | median s | min s | max s |\n|---|---|---|---|")
    for name, values in figures.items():
        print(f"| {name} | {statistics.median(values):.2f} | {min(values):.2f} | {max(values):.2f} |")
    print("\n| part (one fresh process) | wall median s | CPU median s |\n|---|---|---|")
    for name, row in part_rows.items():
        print(f"| {name} | {row['wall']['median_s']:.2f} | {row['cpu']['median_s']:.2f} |")
    total_wall = sum(r["wall"]["median_s"] for r in part_rows.values())
    total_cpu = sum(r["cpu"]["median_s"] for r in part_rows.values())
    print(f"| sum | {total_wall:.2f} | {total_cpu:.2f} |")

    machine = f"cpu{cores}"
    out = args.out or RESULTS / f"chat_latency_{machine}_{path}_{dt.date.today().isoformat()}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "date": dt.date.today().isoformat(), "machine": f"{platform.machine()}, {cores} cores", "model": args.model, "chat_path": path,
        "question": QUESTION, "load_average_before": load_before, "load_average_after": load_after,
        "generate_threads": breakdowns[0]["threads"], "figures": {k: summary(v) for k, v in figures.items()}, "parts": part_rows,
    }, indent=1) + "\n")
    print(f"\nwritten {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
