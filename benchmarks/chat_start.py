"""How fast `tunepath` answers: `--help`, `chat --help`, and the first streamed token of `tunepath chat`.

    python -m benchmarks.chat_start --model artifacts/merge/model        # or models/demo (after `tunepath demo`)
    python -m benchmarks.chat_start --model models/demo --runs 5 --interactive

Each figure is the wall time from starting a fresh `python -m tunepath.cli` process: to its exit for the help
texts, to the first byte of the answer on stdout for chat (`--once`, or a question piped into the interactive
mode with --interactive). The load average is printed beside them: on a shared machine it moves every figure.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time

QUESTION = "Where is my order NW-1001?"


def timed_exit(argv: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "tunepath.cli", *argv], check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


def first_token(model: str, interactive: bool) -> tuple[float, float]:
    """Seconds from process start to the answer's first byte on stdout, and to the process's exit."""
    argv = [sys.executable, "-m", "tunepath.cli", "chat", "--model", model, "--max-tokens", "32"]
    start = time.perf_counter()
    proc = subprocess.Popen(argv + ([] if interactive else ["--once", QUESTION]), stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    if interactive:
        proc.stdin.write(f"{QUESTION}\n".encode())
        proc.stdin.flush()
    os.read(proc.stdout.fileno(), 1)
    first = time.perf_counter() - start
    if interactive:
        proc.stdin.close()
    proc.stdout.read()
    proc.wait()
    return first, time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="artifacts/merge/model", help="model folder or models:/ reference")
    parser.add_argument("--runs", type=int, default=3, help="repetitions of each figure (default 3)")
    parser.add_argument("--interactive", action="store_true", help="pipe the question into the interactive mode instead of --once")
    args = parser.parse_args(argv)
    rows = {"tunepath --help": [], "tunepath chat --help": [], "chat: first token": [], "chat: whole answer, exit": []}
    for _ in range(args.runs):
        rows["tunepath --help"].append(timed_exit(["--help"]))
        rows["tunepath chat --help"].append(timed_exit(["chat", "--help"]))
        first, done = first_token(args.model, args.interactive)
        rows["chat: first token"].append(first)
        rows["chat: whole answer, exit"].append(done)
    print(f"load average before/after: {os.getloadavg()[0]:.2f}; cores: {os.cpu_count()}; runs: {args.runs}; model: {args.model}")
    print("| what | median s | min s | max s |\n|---|---|---|---|")
    for name, values in rows.items():
        print(f"| {name} | {statistics.median(values):.2f} | {min(values):.2f} | {max(values):.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
