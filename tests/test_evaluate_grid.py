"""The gates' defaults against real training on the demo: every sane single change a user makes in the run form
passes, training that really hurts fails.

Slow tier (each setting trains and evaluates the demo model, 20-90 s on two busy cores; about 3 minutes on a
loaded machine). The grid is one setting at a time at each end of its range, the others at their defaults (the
issue's "change one setting in the Custom run form"): train.max_steps 20 and 300, learning_rate 1e-4 and 5e-3,
lora_r 4 and 64 (alpha 2r), batch_size 2 and 16, packing off; plus corners combining two ends that a user trying
to go fast or small hits: rank 4 with batch 2, 20 steps with learning rate 1e-4 (the least training in the
ranges), 20 steps with rank 4, learning rate 1e-4 with rank 4, 20 steps with batch 2 (the fewest examples seen).
The bad runs: a learning rate of 1, a diverged run (learning rate 0.3 without clipping), and a model trained on
shuffled answers.

20 steps at 1e-4 decided how the relevance gate is formulated. Its answers beat the base on ROUGE-L (+0.050,
interval +0.006..+0.110) but are still mostly the base's, and the base's answers hardly depend on the question, so
the generated-text relevance (own reference against other prompts' references) cannot be told from zero on 23
held-out prompts (+0.049, lower end -0.003). More held-out prompts do not fix that (-0.026 with 800 demo
conversations: the effect is small, not just noisy), and a lower bar on the same statistic would let shuffled
labels through (their interval reaches +0.05 too). What tells the two apart is the tuned model's likelihood of the
reference answers given their own prompt against other prompts (nats per answer token): the base has +0.096
[+0.057, +0.142]; 20 steps at 1e-4 keep and raise it (+0.119, difference to the base +0.023 [+0.008, +0.042]),
shuffled labels teach the model to ignore the question and lose it (+0.027, difference -0.069 [-0.106, -0.037]).
So the gate passes when the generated answers clearly fit their prompts, or when the prompt dependence is clear of
zero and not surely below the base's (tunepath/evaluate/gates.py, relevance_gate). The shuffled-label run still
fails, and so would shuffled labels on a base with no prompt dependence (nothing clear of zero).
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
    "corner_steps_20_lr_1e-4": ["train.max_steps=20", "train.learning_rate=0.0001"],
    "corner_steps_20_rank_4": ["train.max_steps=20", "train.lora_r=4", "train.lora_alpha=8"],
    "corner_lr_1e-4_rank_4": ["train.learning_rate=0.0001", "train.lora_r=4", "train.lora_alpha=8"],
    # 20 steps of 2 rows see 40 packed rows of the ~370 training samples; perplexity falls as far as with batch 8
    # (2.91 -> 1.98) and the answers fit their prompts (relevance +0.036, lower end +0.004; prompt dependence +0.065
    # over the base), but greedy answers do not yet beat the base's ROUGE-L with confidence (+0.022, interval
    # -0.025..+0.065 on 23 prompts): it failed the primary gate until the undecided text metric deferred to the
    # answer perplexity (evaluate.primary_support).
    "corner_steps_20_batch_2": ["train.max_steps=20", "train.batch_size=2"],
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
            shuffle_answers(next((ws.out("validate") / "records").glob("records-*.jsonl")))
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
    dep = m["comparison"].get("prompt_dependence", {}).get("diff", {})
    return (f"{name:28} {'PASS' if m['passed'] else 'FAIL':4} {m['primary_metric']} base {p['base']['value']:.3f} tuned "
            f"{p['tuned']['value']:.3f} diff {p['diff']['value']:+.3f} [{p['diff']['low']:+.3f}, {p['diff']['high']:+.3f}] "
            f"relevance {rel.get('value', float('nan')):+.3f} [{rel.get('low', float('nan')):+.3f}] "
            f"dependence vs base {dep.get('value', float('nan')):+.3f} [{dep.get('low', float('nan')):+.3f}, {dep.get('high', float('nan')):+.3f}] "
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


@pytest.mark.slow
def test_a_dpo_run_is_judged_on_held_out_preference_accuracy(grid_project):
    """route.style_required with the demo's preference pairs plans SFT then DPO; the primary metric is then the
    per-token preference accuracy on the held-out pairs, and the primary gate reads its interval.

    The demo base already ranks the chosen answer above the rejected one on all 9 held-out pairs (the demo's
    rejected answers are curt one-liners), so the primary gate reads the preference margin (every pair kept,
    margin wider with its interval clear of zero). Measured 2026-12-01: with DPO at the SFT stage's learning rate
    (0.002) the run failed relevance (prompt dependence -0.041 [-0.121, +0.024]), degenerate and the general-text
    benchmark: DPO retrained the model instead of nudging it. At train.dpo_learning_rate auto (a tenth of the
    SFT rate after SFT) every gate passes: margin 4.70 -> 7.08 nats per token, difference +2.38 [+2.08, +2.66],
    prompt dependence +0.194 against the base's +0.096.
    """
    m = run_setting(grid_project, ["route.style_required=true"])
    print(summary("dpo (style_required)", m))
    plan = json.loads((grid_project / "artifacts" / "route" / "plan.json").read_text(encoding="utf-8"))
    assert plan["stages"] == ["sft", "dpo"]
    assert m["primary_metric"] == "preference_accuracy"
    p, margin = m["comparison"]["preference_accuracy"], m["comparison"]["preference_margin"]
    assert p["pairs"] == m["preference"]["pairs"] == margin["pairs"] > 0
    assert p["tuned"]["value"] >= p["base"]["value"]
    if p["base"]["value"] == 1.0:
        assert m["gates"]["primary"]["metric"] == "preference_margin"
        assert m["gates"]["primary"]["passed"] == (p["tuned"]["value"] == 1.0 and margin["diff"]["low"] > 0)
    else:
        assert m["gates"]["primary"]["metric"] == "preference_accuracy"
        assert m["gates"]["primary"]["passed"] == (p["diff"]["low"] > 0)
    assert m["passed"], summary("dpo (style_required)", m)  # the demo's SFT then DPO is a sane run: every gate holds
    curve = (grid_project / "artifacts" / "train" / "loss.csv").read_text(encoding="utf-8").splitlines()[1:]
    dpo_rates = [float(line.split(",")[3]) for line in curve if line.split(",")[1] == "dpo"]
    assert dpo_rates and max(dpo_rates) <= 0.002 / 10 * 1.0001  # DPO after SFT at a tenth of the SFT rate
