"""Evaluation time on the demo: the evaluate stage with batched generation against one prompt at a time, and its
share of a whole demo run (validate → merge, the stage functions called directly).

    python -m benchmarks.evaluate                 # builds the demo in a temporary folder; prints a table,
                                                  # writes benchmarks/results/evaluate_<hardware>_<date>.json
    python -m benchmarks.evaluate --project DIR   # reuse a project that has data/raw and models/demo

Each evaluate variant runs twice on the same trained adapter; the faster run counts. Generation is greedy with the
same max_new_tokens in both variants, so the answers are the same; only the batching differs.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def prepare(root: Path) -> None:
    """A project folder with the repo's params, the shipped benchmark tasks, the demo data and model."""
    from tunepath.demo import DemoConfig, build_demo_model, generate_demo_data

    root.mkdir(parents=True, exist_ok=True)
    shutil.copy(REPO / "params.yaml", root / "params.yaml")
    if not (root / "evals").exists():
        shutil.copytree(REPO / "evals", root / "evals")
    if not (root / "data" / "raw").exists():
        generate_demo_data(root / "data" / "raw", DemoConfig())
    if not (root / "models" / "demo" / "config.json").exists():
        build_demo_model(root / "models" / "demo", DemoConfig(), sorted((root / "data" / "raw").iterdir()))


def stage_times(root: Path) -> dict[str, float]:
    from tunepath.params import load_config
    from tunepath.stages import Workspace, run_stage

    cfg = load_config(root / "params.yaml")
    ws = Workspace(root, "")
    out = {}
    for name in ("validate", "tokenize", "route", "train", "evaluate", "merge"):
        t = time.perf_counter()
        run_stage(name, cfg, ws)
        out[name] = time.perf_counter() - t
    return out


def evaluate_variant(root: Path, batch: int, repeat: int) -> dict:
    from tunepath.evaluate.stage import run_evaluate
    from tunepath.params import load_config
    from tunepath.stages import resolve_model, Workspace

    cfg = load_config(root / "params.yaml", [f"evaluate.generation_batch_size={batch}"])
    ws = Workspace(root, "")
    runs = []
    for _ in range(repeat):
        t = time.perf_counter()
        m = run_evaluate(cfg.evaluate, resolve_model(cfg.model, ws), ws.out("validate"), ws.out("tokenize"), ws.out("train"),
                         root / "artifacts" / f"evaluate_b{batch}", root=root)
        runs.append({"stage_s": time.perf_counter() - t, **m["timings"], "answers": m["samples"]})
    return min(runs, key=lambda r: r["stage_s"])


def main() -> None:
    parser = argparse.ArgumentParser(description="evaluation time on the demo")
    parser.add_argument("--project", type=Path, default=None)
    parser.add_argument("--repeat", type=int, default=2)
    args = parser.parse_args()

    import torch

    from tunepath import lineage

    with tempfile.TemporaryDirectory(prefix="tunepath-bench-eval-") as tmp:
        root = args.project or Path(tmp) / "project"
        prepare(root)
        stages = stage_times(root)
        variants = {f"batch {b}": evaluate_variant(root, b, args.repeat) for b in (16, 1)}
    whole = sum(stages.values())
    rows = [("evaluate stage in the run", stages["evaluate"], stages["evaluate"] / whole)]
    for name, v in variants.items():
        rows.append((f"evaluate, generation {name}", v["stage_s"], v["stage_s"] / whole))
        rows.append((f"  of which generation ({v['answers']} prompts x 2 models)", v["generation_s"], v["generation_s"] / whole))
        rows.append(("  of which benchmarks (lm-eval)", v["benchmarks_s"], v["benchmarks_s"] / whole))
    print(f"\nwhole demo run validate..merge: {whole:.1f} s ({', '.join(f'{k} {v:.1f}' for k, v in stages.items())})\n")
    print("| what | seconds | share of the run |\n|---|---|---|")
    for label, seconds, share in rows:
        print(f"| {label} | {seconds:.2f} | {share:.0%} |")
    speedup = variants["batch 1"]["generation_s"] / max(variants["batch 16"]["generation_s"], 1e-9)
    print(f"\nbatched generation (16) is {speedup:.1f}x faster than one prompt at a time")
    hardware = lineage.hardware()
    out = REPO / "benchmarks" / "results" / f"evaluate_{hardware.split(' (')[0].replace(' ', '-')}_{dt.date.today()}.json"
    out.write_text(json.dumps({"hardware": hardware, "torch_threads": torch.get_num_threads(), "stages_s": stages,
                               "whole_run_s": whole, "variants": variants, "generation_speedup": speedup}, indent=2) + "\n")
    print(f"written: {out.relative_to(REPO)}")


if __name__ == "__main__":
    main()
