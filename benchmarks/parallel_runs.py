"""Two demo runs in one project at once (the second isolated in its own working copy) vs one after the other.

    python -m benchmarks.parallel_runs                 # prints a table, writes benchmarks/results/parallel_runs_*.json
    python -m benchmarks.parallel_runs --max-steps 20  # the training length of each run (default 20)

Each variant gets a fresh project (the demo model and data, git and DVC initialised) and real `tunepath run`
processes with different `train.learning_rate` (train, evaluate, merge and register run in both):
- **serial**: the two runs one after the other, both in the project folder; the second finds validate,
  tokenize and route up to date (DVC) and skips them;
- **parallel**: both started at once; one works in the folder, the other in a working copy of its own
  (`tunepath run` sees the project busy) and lands as a DVC experiment. Neither has anything to reuse yet,
  so the isolated one makes validate, tokenize and route as well.
Wall-clock per run and in all; the ratio is serial total / parallel total. The CPU count and load averages
before and after go into the JSON: on a shared machine the figures move with what else runs.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

RATES = ("0.002", "0.004")


def make_project(dest: Path, assets: Path) -> Path:
    """A fresh git + DVC project with the demo assets: the test suite's own (tests/conftest.py)."""
    from tests.conftest import make_project as fresh_project

    return fresh_project(dest, assets)


def build_assets(where: Path) -> Path:
    from tunepath.demo import DemoConfig, build_demo_model, generate_demo_data

    cfg = DemoConfig()
    generate_demo_data(where / "data" / "raw", cfg)
    build_demo_model(where / "models" / "demo", cfg, sorted((where / "data" / "raw").iterdir()))
    return where


def start(root: Path, rate: str, overrides: list[str], log: Path) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "tunepath.cli", "--project", str(root), "run", "--set", f"train.learning_rate={rate}"]
    for override in overrides:
        cmd += ["--set", override]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("MLFLOW_TRACKING_URI", None)
    env.pop("PREFECT_API_URL", None)  # each run starts its temporary Prefect server, as a plain `tunepath run` does
    return subprocess.Popen(cmd, cwd=root, stdout=open(log.with_suffix(".out"), "w"), stderr=open(log, "w"), env=env)


def timed(procs: dict[str, subprocess.Popen], logs: dict[str, Path], started: float) -> dict:
    ended = {}
    while len(ended) < len(procs):
        for rate, proc in procs.items():
            if rate not in ended and proc.poll() is not None:
                if proc.returncode != 0:
                    raise SystemExit(f"run lr={rate} failed (exit {proc.returncode}); see {logs[rate]}:\n"
                                     + logs[rate].read_text()[-2000:])
                ended[rate] = time.perf_counter() - started
        time.sleep(0.5)
    isolated = [r for r in procs if "working copy of its own" in logs[r].read_text()]
    return {"runs_s": ended, "isolated": isolated}


def run_serial(root: Path, overrides: list[str], out: Path) -> dict:
    runs, t0 = {}, time.perf_counter()
    for rate in RATES:
        log = out / f"serial-{rate}.log"
        started = time.perf_counter()
        runs[rate] = timed({rate: start(root, rate, overrides, log)}, {rate: log}, started)["runs_s"][rate]
    return {"total_s": time.perf_counter() - t0, "runs_s": runs, "isolated": []}


def run_parallel(root: Path, overrides: list[str], out: Path) -> dict:
    logs = {rate: out / f"parallel-{rate}.log" for rate in RATES}
    t0 = time.perf_counter()
    procs = {rate: start(root, rate, overrides, logs[rate]) for rate in RATES}
    result = timed(procs, logs, t0)
    return {"total_s": time.perf_counter() - t0, **result}


def versions(root: Path) -> int:
    from mlflow import MlflowClient

    return len(MlflowClient(f"sqlite:///{root / 'mlflow.db'}").search_model_versions("name='tunepath-demo'"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-steps", type=int, default=20, help="train.max_steps of each run (default 20)")
    parser.add_argument("--benchmark-limit", type=int, default=20, help="evaluate.benchmark_limit (default 20, as the tests)")
    parser.add_argument("--keep", action="store_true", help="keep the projects and logs (printed at the end)")
    parser.add_argument("--assets", type=Path, default=None, help="a folder with data/raw and models/demo built before (skips building them)")
    args = parser.parse_args(argv)
    overrides = [f"train.max_steps={args.max_steps}", f"evaluate.benchmark_limit={args.benchmark_limit}"]
    work = Path(tempfile.mkdtemp(prefix="tunepath-parallel-"))
    load_before = os.getloadavg()
    print(f"{os.cpu_count()} CPUs, load average {load_before[0]:.2f} {load_before[1]:.2f} {load_before[2]:.2f}; "
          f"working in {work}", flush=True)
    assets = args.assets or build_assets(work / "assets")
    results = {}
    for variant, runner in (("serial", run_serial), ("parallel", run_parallel)):
        root = make_project(work / variant, assets)
        print(f"{variant}: two runs, lr {' and '.join(RATES)} ...", flush=True)
        results[variant] = runner(root, overrides, work)
        results[variant]["load_after"] = os.getloadavg()
        results[variant]["versions"] = versions(root)
        print(f"{variant}: {results[variant]['total_s']:.0f} s", flush=True)
    ratio = results["serial"]["total_s"] / results["parallel"]["total_s"]
    print()
    print("| variant | run lr=0.002 | run lr=0.004 | both | isolated | registered versions |")
    print("|---|---|---|---|---|---|")
    for variant, r in results.items():
        print(f"| {variant} | {r['runs_s']['0.002']:.0f} s | {r['runs_s']['0.004']:.0f} s | {r['total_s']:.0f} s | "
              f"{', '.join('lr=' + x for x in r['isolated']) or '-'} | {r['versions']} |")
    print(f"\nserial / parallel: {ratio:.2f}x on {os.cpu_count()} CPUs (load average before {load_before[0]:.2f}; "
          f"after parallel {results['parallel']['load_after'][0]:.2f})")
    finish("parallel_runs", {"overrides": overrides, "load_before": load_before, "results": results,
                              "serial_over_parallel": ratio}, work, args.keep)
    return 0


def finish(name: str, figures: dict, work: Path, keep: bool) -> None:
    """Write the figures with the machine's to benchmarks/results/NAME_cpuN_DATE.json; remove the work folder
    unless `keep`."""
    record = {"date": time.strftime("%Y-%m-%d"), "cpus": os.cpu_count(), "machine": platform.machine(),
              "python": platform.python_version(), **figures}
    dest = REPO / "benchmarks" / "results" / f"{name}_cpu{os.cpu_count()}_{record['date']}.json"
    dest.write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    print(f"written: {dest.relative_to(REPO)}")
    if keep:
        print(f"projects and logs: {work}")
    else:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
