"""train.compile's time to first step: eager, compiled from an empty compile cache, compiled from the filled one.

    python -m benchmarks.compile_cache                 # the demo project, a table, and a JSON in benchmarks/results/
    python -m benchmarks.compile_cache --max-steps 4 --warm-runs 2

A fresh demo project (the demo model and data, git and DVC initialised) runs validate, tokenize and route
once, then `tunepath stage train` (the DVC stage's command, each run in its own process), in this order:
- **eager**: train.compile false;
- **cold**: train.compile true, the project's `.tunepath/compile-cache` deleted first (nothing compiled yet;
  torch's other caches, such as /tmp/torchinductor_<user>, are not used: the train stage points them here);
- **warm**: train.compile true again, the cache as the cold run left it (`--warm-runs` of them).
Per run: seconds from the train stage's start to its first step (metrics.json `seconds_to_first_step`: loading
the model, compiling), the process's wall-clock, and the stage's tokens/s. On CPU this measures the same
code path as on a GPU with inductor's C++ kernels in place of Triton's; the GPU figure comes from
`benchmarks/train_gpu.py --compile-cache`. CPU count and load averages go into the JSON: on a shared machine the
figures move with what else runs.
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
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.parallel_runs import build_assets, make_project  # noqa: E402


def tunepath(root: Path, *args: str, log: Path) -> float:
    """One `tunepath` command in the project; returns its wall-clock seconds."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    for name in ("MLFLOW_TRACKING_URI", "PREFECT_API_URL", "TORCHINDUCTOR_CACHE_DIR"):
        env.pop(name, None)
    started = time.perf_counter()
    with open(log, "w") as out:
        proc = subprocess.run([sys.executable, "-m", "tunepath.cli", "--project", str(root), *args], cwd=root, stdout=out,
                              stderr=subprocess.STDOUT, env=env)
    if proc.returncode:
        raise SystemExit(f"tunepath {' '.join(args)} failed (exit {proc.returncode}); see {log}:\n" + log.read_text()[-2000:])
    return time.perf_counter() - started


def set_params(root: Path, **train) -> None:
    import yaml

    path = root / "params.yaml"
    params = yaml.safe_load(path.read_text(encoding="utf-8"))
    params["train"].update(train)
    path.write_text(yaml.safe_dump(params, sort_keys=False), encoding="utf-8")


def train_run(root: Path, name: str, logs: Path) -> dict:
    wall = tunepath(root, "stage", "train", log=logs / f"train-{name}.log")
    metrics = json.loads((root / "artifacts" / "train" / "metrics.json").read_text(encoding="utf-8"))
    cache = metrics["speed_paths"].get("compile_cache") or {}
    return {"run": name, "seconds_to_first_step": metrics["seconds_to_first_step"], "process_s": round(wall, 2),
            "tokens_per_second": metrics["stages"][0]["tokens_per_second"], "stage_s": metrics["stages"][0]["seconds"],
            "compiled_layers": metrics["speed_paths"]["compiled_layers"], "cache_files_before": cache.get("files_before"),
            "final_loss": metrics["final_loss"]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--max-steps", type=int, default=6, help="optimizer steps per train run (default 6)")
    parser.add_argument("--warm-runs", type=int, default=2, help="compiled runs after the cold one (default 2)")
    parser.add_argument("--work", default=None, help="scratch folder (default: a temporary one)")
    parser.add_argument("--out", default=None, help="JSON path (default: benchmarks/results/compile_cache_<device>_<date>.json)")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    import torch

    work = Path(args.work or tempfile.mkdtemp(prefix="compile_cache-"))
    logs = work / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    root = make_project(work / "project", build_assets(work / "assets"))
    for stage in ("validate", "tokenize", "route"):
        tunepath(root, "stage", stage, log=logs / f"{stage}.log")
    cache = root / ".tunepath" / "compile-cache"
    # no checkpoints: each run starts from step 0 instead of resuming the last run's
    set_params(root, max_steps=args.max_steps, save_steps=0, compile=False)
    runs = [train_run(root, "eager", logs)]
    set_params(root, compile=True)
    shutil.rmtree(cache, ignore_errors=True)
    runs.append(train_run(root, "cold", logs))
    for i in range(args.warm_runs):
        runs.append(train_run(root, f"warm{i + 1}" if args.warm_runs > 1 else "warm", logs))

    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"CPU ({os.cpu_count()} cores)"
    report = {"date": datetime.now(timezone.utc).strftime("%Y-%m-%d"), "device": device, "torch": torch.__version__,
              "max_steps": args.max_steps, "cpu_count": os.cpu_count(), "load_average_after": os.getloadavg(),
              "platform": platform.platform(), "cache_files": sum(1 for p in cache.rglob("*") if p.is_file()), "runs": runs}
    out = Path(args.out) if args.out else REPO / "benchmarks" / "results" / (
        f"compile_cache_{'cpu' if not torch.cuda.is_available() else device.replace(' ', '-')}_{report['date']}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    eager = runs[0]["seconds_to_first_step"]
    print(f"{device}, torch {torch.__version__}, {args.max_steps} steps per run\n")
    print("| run | compiled layers | cache files before | first step s | vs eager | process s | tokens/s |")
    print("|---|---|---|---|---|---|---|")
    for r in runs:
        print(f"| {r['run']} | {r['compiled_layers']} | {r['cache_files_before'] if r['cache_files_before'] is not None else '-'} | "
              f"{r['seconds_to_first_step']} | {r['seconds_to_first_step'] - eager:+.1f} s | {r['process_s']} | {r['tokens_per_second']} |")
    print(f"\nfull figures: {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
