"""Isolated runs with identical inputs: what the second one reuses through DVC's run cache, stage by stage.

    python -m benchmarks.identical_runs                      # both variants; a table, and a JSON in benchmarks/results/
    python -m benchmarks.identical_runs --variant after      # one isolated run, then the same command again
    python -m benchmarks.identical_runs --variant together   # the same command twice at once

Each variant gets a fresh project (the demo model and data, git and DVC initialised) and real `tunepath run
--isolated` processes with the same params, so neither finds anything in the project's dvc.lock:
- **after**: the second run starts when the first has landed; every stage but register (which records this
  run in the registry) can be restored from DVC's run cache, train without its checkpoints;
- **together**: both at once; for each stage, whichever gets there first computes it and the other waits for
  it, then restores it, so each stage is computed once.
Per stage, its task's seconds (the `stage seconds:` line of `tunepath run`) and whether it ran, was restored, or
was up to date; wall-clock per run. CPU count and load averages go into the JSON.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.parallel_runs import build_assets, finish, make_project  # noqa: E402

STAGES = ("validate", "tokenize", "route", "train", "evaluate", "merge", "register")


def start(root: Path, overrides: list[str], log: Path) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "tunepath.cli", "--project", str(root), "run", "--isolated"]
    for override in overrides:
        cmd += ["--set", override]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("MLFLOW_TRACKING_URI", None)
    env.pop("PREFECT_API_URL", None)
    return subprocess.Popen(cmd, cwd=root, stdout=open(log.with_suffix(".out"), "w"), stderr=subprocess.STDOUT, env=env)


def wait(procs: dict[str, subprocess.Popen], logs: dict[str, Path], t0: float) -> dict[str, float]:
    ended = {}
    while len(ended) < len(procs):
        for key, proc in procs.items():
            if key not in ended and proc.poll() is not None:
                if proc.returncode:
                    raise SystemExit(f"run {key} failed (exit {proc.returncode}); see {logs[key].with_suffix('.out')}:\n"
                                     + logs[key].with_suffix(".out").read_text()[-2000:])
                ended[key] = time.perf_counter() - t0
        time.sleep(0.5)
    return ended


def stage_times(log: Path) -> dict[str, dict]:
    """Per stage: its task's seconds (the `stage seconds:` line `tunepath run` prints) and how it ended."""
    text = log.with_suffix(".out").read_text(errors="replace")
    seconds = dict(item.rsplit(" ", 1) for item in re.search(r"^stage seconds: (.*)$", text, re.M).group(1).split(", "))
    summary = re.search(r"^stages run: (.*?); up to date: (.*?)(?: \(restored from DVC's run cache: (.*)\))?$", text, re.M)
    restored = set((summary.group(3) or "").split(", ")) - {""}
    up_to_date = set(summary.group(2).split(", ")) - {"none"} - restored
    waited = set(re.findall(r"tunepath\.ledger: (\w+): .* computes it from the same inputs; waiting", text))
    return {stage: {"seconds": float(s), "how": "restored" if stage in restored else "up to date" if stage in up_to_date else "ran",
                    **({"waited": True} if stage in waited else {})} for stage, s in seconds.items()}


def versions(root: Path) -> int:
    from mlflow import MlflowClient

    return len(MlflowClient(f"sqlite:///{root / 'mlflow.db'}").search_model_versions("name='tunepath-demo'"))


def run_after(root: Path, overrides: list[str], out: Path) -> dict:
    result = {}
    for key in ("first", "second"):
        log = out / f"after-{key}.log"
        t0 = time.perf_counter()
        result[key] = {"run_s": wait({key: start(root, overrides, log)}, {key: log}, t0)[key], "stages": stage_times(log)}
    return result


def run_together(root: Path, overrides: list[str], out: Path) -> dict:
    logs = {key: out / f"together-{key}.log" for key in ("a", "b")}
    t0 = time.perf_counter()
    procs = {}
    for key in logs:
        procs[key] = start(root, overrides, logs[key])
    ended = wait(procs, logs, t0)
    return {key: {"run_s": ended[key], "stages": stage_times(logs[key])} for key in logs} | {"total_s": time.perf_counter() - t0}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variant", choices=["after", "together", "both"], default="both")
    parser.add_argument("--max-steps", type=int, default=20, help="train.max_steps of each run (default 20)")
    parser.add_argument("--benchmark-limit", type=int, default=20, help="evaluate.benchmark_limit (default 20, as the tests)")
    parser.add_argument("--assets", type=Path, default=None, help="a folder with data/raw and models/demo built before")
    parser.add_argument("--keep", action="store_true", help="keep the projects and logs (printed at the end)")
    args = parser.parse_args(argv)
    overrides = [f"train.max_steps={args.max_steps}", f"evaluate.benchmark_limit={args.benchmark_limit}", "train.learning_rate=0.003"]
    work = Path(tempfile.mkdtemp(prefix="tunepath-identical-"))
    load_before = os.getloadavg()
    print(f"{os.cpu_count()} CPUs, load average {load_before[0]:.2f}; working in {work}", flush=True)
    assets = args.assets or build_assets(work / "assets")
    variants = ["after", "together"] if args.variant == "both" else [args.variant]
    results = {}
    for variant in variants:
        root = make_project(work / variant, assets)
        print(f"{variant}: two isolated runs with the same params ...", flush=True)
        results[variant] = (run_after if variant == "after" else run_together)(root, overrides, work)
        results[variant]["versions"] = versions(root)
        results[variant]["load_after"] = os.getloadavg()
    print()
    for variant, r in results.items():
        keys = [k for k in r if isinstance(r[k], dict) and "stages" in r[k]]
        print(f"{variant}: registered versions {r['versions']}")
        print("| stage | " + " | ".join(keys) + " |")
        print("|---|" + "---|" * len(keys))
        for stage in STAGES:
            cells = []
            for k in keys:
                s = r[k]["stages"].get(stage, {})
                cells.append(f"{s.get('seconds', '-')} s {s.get('how', '')}{' (waited)' if s.get('waited') else ''}")
            print(f"| {stage} | " + " | ".join(cells) + " |")
        print("| whole run | " + " | ".join(f"{r[k]['run_s']:.0f} s" for k in keys) + " |\n")
    finish("identical_runs", {"overrides": overrides, "load_before": load_before, "results": results}, work, args.keep)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
