"""The evaluate stage: held-out scores for base and tuned, preference accuracy, samples from the tokenize stage's
prompt ids, and gates that block a worse model."""

from __future__ import annotations

import json

import pytest

from tests.test_promote_support import build_workspace, fast_config, make_train_dir
from tunepath.evaluate import EvaluateConfig
from tunepath.evaluate.gates import GateFailed, apply_gates
from tunepath.evaluate.samples import is_degenerate
from tunepath.evaluate.scoring import mean_loss, preference_summary
from tunepath.sections import ModelConfig


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, demo_assets):
    return build_workspace(tmp_path_factory.mktemp("evaluate") / "ws", demo_assets / "models" / "demo")


def evaluate(root, scale: float, **settings) -> dict:
    from tunepath.evaluate.stage import run_evaluate

    art = root / "artifacts"
    make_train_dir(root, scale)
    return run_evaluate(fast_config(**settings).evaluate, ModelConfig(), art / "validate", art / "tokenize", art / "train", art / "evaluate")


def test_repaired_model_beats_the_noised_base_and_everything_is_written(workspace):
    m = evaluate(workspace, 1.0)
    out = workspace / "artifacts" / "evaluate"
    assert m["passed"] and m["split_kind"] == "sft"
    assert m["tuned_perplexity"] < 0.5 * m["base_perplexity"]
    assert set(m["splits"]) == {"sft", "cpt"}  # every held-out split is scored; sft is the gate split
    assert m["preference"]["pairs"] == 4 and m["preference"]["reward_accuracy"] == 1.0
    assert m["tuned_preference_accuracy"] >= m["base_preference_accuracy"]
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 2 and {"tuned", "tuned_without_template", "base", "stopped_at_eot", "degenerate"} <= set(samples[0])
    rows = json.loads((out / "row_scores.json").read_text())
    assert rows["split"] == "sft" and len(rows["rows"]) == m["eval_rows"]
    assert mean_loss([(r["logprob"], r["tokens"]) for r in rows["rows"]])[0] == pytest.approx(m["tuned_loss"])
    report = (out / "report.md").read_text()
    assert "passed every gate" in report and "preference accuracy" in report


def test_a_worse_model_fails_the_perplexity_gate_and_the_metrics_say_why(workspace):
    with pytest.raises(GateFailed, match="perplexity: tuned .* vs base .*; nothing is registered"):
        evaluate(workspace, -1.0)
    m = json.loads((workspace / "artifacts" / "evaluate" / "metrics.json").read_text())
    assert m["passed"] is False and m["gates"]["perplexity"]["passed"] is False
    assert m["tuned_perplexity"] > m["base_perplexity"]


def test_samples_are_prompted_with_the_tokenize_stage_ids_and_injection_stays_text(workspace):
    from datasets import load_from_disk
    from transformers import AutoTokenizer

    from tunepath.evaluate.heldout import Heldout
    from tunepath.evaluate.samples import conversation_prompts, end_of_turn_ids

    tok_dir = workspace / "artifacts" / "tokenize"
    tokenizer = AutoTokenizer.from_pretrained(str(tok_dir / "tokenizer"))
    heldout = Heldout.load(tok_dir, workspace / "artifacts" / "validate" / "records.jsonl")
    prompts = conversation_prompts(heldout.rows, heldout.records("conversation"), tokenizer, 8)
    rows = list(load_from_disk(str(tok_dir / "sft" / "eval")))
    assert [p.templated_ids for p in prompts] == [list(r["prompt_ids"]) for r in rows[: len(prompts)]]
    start = tokenizer.convert_tokens_to_ids("<|im_start|>")
    special = {start, tokenizer.convert_tokens_to_ids("<|im_end|>")}
    injected = next(p for p in prompts if "<|im_start|>system" in p.prompt)
    assert injected.templated_ids.count(start) == 3  # system, user, assistant prompt: the user's text added none
    assert not special & set(injected.raw_ids)
    assert end_of_turn_ids(heldout.rows, tokenizer) == [tokenizer.convert_tokens_to_ids("<|im_end|>")]


def test_gates_block_each_failure_and_name_it():
    cfg = EvaluateConfig(min_ppl_improvement=0.05, max_degenerate_share=0.5, min_stop_share=0.5, max_preference_drop=0.1)
    base = {"perplexity": 20.0, "samples": 4, "degenerate_share": 1.0, "stopped_at_eot_share": 0.0}
    good = {"perplexity": 15.0, "samples": 4, "degenerate_share": 0.25, "stopped_at_eot_share": 0.75}
    pref = {"pairs": 10, "base_accuracy": 0.6, "tuned_accuracy": 0.5}
    assert all(g["passed"] for g in apply_gates(cfg, base, good, "sft", pref).values())
    assert not apply_gates(cfg, base, {**good, "perplexity": 19.5}, "sft", pref)["perplexity"]["passed"]
    assert not apply_gates(cfg, base, {**good, "degenerate_share": 0.75}, "sft", pref)["degenerate"]["passed"]
    never_stops = apply_gates(cfg, base, {**good, "stopped_at_eot_share": 0.25}, "sft", pref)["stop_at_eot"]
    assert not never_stops["passed"] and "1/4 samples ended" in never_stops["detail"]
    assert not apply_gates(cfg, base, good, "sft", {**pref, "tuned_accuracy": 0.4})["preference"]["passed"]
    assert "stop_at_eot" not in apply_gates(cfg, base, good, "cpt", pref)  # continuations of text have no turn to end


def test_preference_summary_counts_pairs_and_reward_accuracy():
    base = [(-10.0, 5, -8.0, 4), (-12.0, 6, -20.0, 6)]
    tuned = [(-7.0, 5, -9.0, 4), (-11.0, 6, -19.0, 6)]
    s = preference_summary(base, tuned)
    assert s["base_accuracy"] == 0.5 and s["tuned_accuracy"] == 1.0
    assert s["base_accuracy_per_token"] == 0.5  # -2.0/token vs -2.0/token is not "above"
    assert s["reward_accuracy"] == 0.5  # pair 1: chosen +3, rejected -1; pair 2: chosen +1, rejected +1


@pytest.mark.parametrize("text, bad", [
    ("", True), ("   ", True), ("the cat the cat the cat the cat", True), ("ok ok ok ok ok ok ok ok ok", True),
    ("答答答答答答答答答答", True), ("Your refund arrives in 3-5 business days.", False), ("Wow!!!!", False), ("in 2000", False),
])
def test_degenerate_answers(text, bad):
    assert is_degenerate(text, 4) is bad


def test_no_label_tokens_is_an_error_that_says_what_to_do():
    with pytest.raises(ValueError, match="eval_share"):
        mean_loss([(0.0, 0)])
