"""The gates' defaults against real training on the demo: every sane single change a user makes in the run form
passes, training that really hurts fails.

Slow tier (each setting trains and evaluates the demo model, 20-90 s on two busy cores). The grid is one setting at
a time at each end of its range, the others at their defaults (the issue's "change one setting in the Custom run
form"): train.max_steps 20 and 300, learning_rate 1e-4 and 5e-3, lora_r 4 and 64 (alpha 2r), batch_size 2 and
16, packing off; plus one corner combining two small ends (rank 4 with batch 2). The bad runs: a learning rate of
1, a diverged run (learning rate 0.3 without clipping), and a model trained on shuffled answers.

Not in the grid because it fails: the corner of 20 steps at learning rate 1e-4 together. Its answers beat the
base on ROUGE-L, but the relevance gate cannot tell them from answers to other prompts (measured: difference
+0.049, interval lower end -0.003 on 23 held-out prompts; -0.026 with 800 demo conversations): so little
training has not yet made the answers depend on the question.
Every gate runs with its default, the shipped benchmarks (evals/) included.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import pytest

SANE = {
    "default": [],
    "steps_20": ["train.max_steps=20"],
    "steps_300": ["train.max_steps=300"],
    "lr_1e-4": ["train.learning_rate=0.0001"],
    "lr_5e-3": ["train.learning_rate=0.005"],
    "rank_4": ["train.lora_r=4", "train.lora_alpha=8"],
    "rank_64": ["train.lora_r=64", "train.lora_alpha=128"],
    "batch_2": ["train.batch_size=2"],
    "batch_16": ["train.batch_size=16"],
    "no_packing": ["tokenize.pack=false"],
    "corner_rank_4_batch_2": ["train.lora_r=4", "train.lora_alpha=8", "train.batch_size=2"],
}
BAD = {
    "lr_1": ["train.learning_rate=1"],
    "diverged": ["train.learning_rate=0.3", "train.max_grad_norm=1000000"],
    "shuffled_labels": ["shuffle"],
}


def shuffle_answers(records: Path, seed: int = 0) -> None:
    """Give every training conversation another conversation's assistant turns (held-out rows stay as they are)."""
    lines = [json.loads(line) for line in records.read_text(encoding="utf-8").splitlines() if line.strip()]
    turns = [m for r in lines if r["kind"] == "conversation" and r["split"] == "train" for m in r["messages"] if m["role"] == "assistant"]
    contents = [m["content"] for m in turns]
    random.Random(seed).shuffle(contents)
    for message, content in zip(turns, contents):
        message["content"] = content
    records.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in lines), encoding="utf-8")


def run_setting(root: Path, overrides: list[str]) -> dict:
    """validate → tokenize → route → train → evaluate in `root` with the overrides; the evaluation's metrics.json
    whether the gates passed or not."""
    from tunepath.evaluate.gates import GateFailed
    from tunepath.params import load_config
    from tunepath.stages import Workspace, run_stage

    shuffled = "shuffle" in overrides
    cfg = load_config(root / "params.yaml", [o for o in overrides if o != "shuffle"])
    ws = Workspace(root, "")
    for stage in ("validate", "tokenize", "route", "train", "evaluate"):
        if stage == "tokenize" and shuffled:
            shuffle_answers(ws.out("validate") / "records.jsonl")
        if stage == "train" and ws.out("checkpoints").exists():
            shutil.rmtree(ws.out("checkpoints"))
        try:
            run_stage(stage, cfg, ws)
        except GateFailed:
            pass
    return json.loads((ws.out("evaluate") / "metrics.json").read_text(encoding="utf-8"))


def summary(name: str, m: dict) -> str:
    p = m["comparison"][m["primary_metric"]]
    failed = [k for k, g in m["gates"].items() if not g["passed"]]
    rel = m["comparison"].get("relevance", {}).get("diff", {})
    return (f"{name:28} {'PASS' if m['passed'] else 'FAIL':4} {m['primary_metric']} base {p['base']['value']:.3f} tuned "
            f"{p['tuned']['value']:.3f} diff {p['diff']['value']:+.3f} [{p['diff']['low']:+.3f}, {p['diff']['high']:+.3f}] "
            f"relevance {rel.get('value', float('nan')):+.3f} [{rel.get('low', float('nan')):+.3f}] "
            f"ppl {m['base_perplexity']:.2f}->{m['tuned_perplexity']:.2f} failed: {','.join(failed) or '-'}")


@pytest.fixture(scope="module")
def grid_project(tmp_path_factory, demo_assets):
    from tests.conftest import make_project

    return make_project(tmp_path_factory.mktemp("grid") / "project", demo_assets)


@pytest.mark.slow
@pytest.mark.parametrize("name", list(SANE))
def test_sane_settings_pass_the_gates(grid_project, name):
    m = run_setting(grid_project, SANE[name])
    print(summary(name, m))
    assert m["passed"], summary(name, m)


@pytest.mark.slow
@pytest.mark.parametrize("name", list(BAD))
def test_training_that_hurts_fails_the_gates(grid_project, name):
    m = run_setting(grid_project, BAD[name])
    print(summary(name, m))
    assert not m["passed"], summary(name, m)
