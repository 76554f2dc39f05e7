"""KTO end to end on the CPU: unpaired feedback through validate, tokenize and a KTO training stage on the demo model."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest

from tests.test_train_support import curve, load_start, load_trained, single_thread, small_config, train  # noqa: F401


def _feedback_rows(preferences: Path) -> list[dict]:
    """The demo's pairs taken apart: each answer alone, labelled desirable (chosen) or not (rejected)."""
    rows, seen = [], set()
    for i, line in enumerate(preferences.read_text(encoding="utf-8").splitlines()):
        pair = json.loads(line)
        side = "chosen" if i % 2 == 0 else "rejected"  # unpaired: no prompt appears with both of its answers
        messages = [{"role": "user", "content": pair["prompt"]}, {"role": "assistant", "content": pair[side]}]
        key = json.dumps(messages)
        if key not in seen:  # the demo reuses a few bad answers; validate would reject the repeats
            seen.add(key)
            rows.append({"messages": messages, "label": side == "chosen"})
    return rows


@pytest.fixture(scope="module")
def project(tmp_path_factory, demo_assets):
    from tunepath.config import Config
    from tunepath.stages import Workspace, run_stage

    dest = tmp_path_factory.mktemp("kto-project")
    shutil.copytree(demo_assets / "models", dest / "models")
    raw = dest / "data" / "raw"
    raw.mkdir(parents=True)
    rows = _feedback_rows(demo_assets / "data" / "raw" / "preferences.jsonl")
    (raw / "feedback.jsonl").write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\n", encoding="utf-8")
    ws = Workspace(dest, "")
    for stage in ("validate", "tokenize"):
        run_stage(stage, Config(), ws)
    return dest


def test_feedback_is_tokenized_for_kto_and_never_for_sft(project):
    from datasets import load_from_disk

    tokenized = project / "artifacts" / "tokenize"
    stats = json.loads((tokenized / "stats.json").read_text(encoding="utf-8"))
    assert stats["labeled_examples"] == 0 and stats["preference_pairs"] == 0
    assert stats["feedback_examples"] == stats["kto"]["train"]["samples_out"] > 100
    assert 0 < stats["kto"]["train"]["desirable"] < stats["feedback_examples"]
    assert not (tokenized / "sft" / "train").exists()
    data = load_from_disk(str(tokenized / "kto" / "train"))
    assert {"prompt_ids", "completion_ids", "label", "prompt", "completion"} <= set(data.column_names)
    first = data[0]
    assert first["prompt_ids"] and first["completion_ids"] and isinstance(first["label"], bool)
    assert first["completion"] and first["prompt"].endswith(first["prompt"][-5:])


def _answer_logratio(model, project: Path, rows: int = 32) -> float:
    """Mean log p(answer) of desirable examples minus that of undesirable ones, on the first rows."""
    import torch
    from datasets import load_from_disk

    from tunepath.train.dpo import sequence_logps
    from tunepath.train.kto import FeedbackCollator, with_mismatched_answers

    data = with_mismatched_answers(load_from_disk(str(project / "artifacts" / "tokenize" / "kto" / "train")).select(range(rows)))
    batch = FeedbackCollator(0)(list(data))
    model.eval()
    with torch.no_grad():
        logps = sequence_logps(model, {k: batch[k][:rows] for k in ("input_ids", "labels", "position_ids")})
    good = batch["desirable"]
    return float(logps[good].mean() - logps[~good].mean())


def test_kto_trains_on_unpaired_feedback_on_the_cpu(project, tmp_path):
    summary = train(project, tmp_path, ["kto"], "lora", cfg=small_config(max_steps=8, batch_size=8))
    assert [s["stage"] for s in summary["stages"]] == ["kto"] and summary["weights"] == "adapter"
    losses = [float(row[2]) for row in curve(tmp_path)[1:]]
    assert len(losses) == 8 and all(math.isfinite(x) for x in losses)
    assert losses[0] == pytest.approx(0.5, abs=1e-4)  # policy == reference and KL 0: 1 - σ(0)
    state = json.loads((tmp_path / "train" / "stages" / "kto" / "trainer_state.json").read_text())
    logged = [h for h in state["log_history"] if "kto_kl" in h]
    assert logged and all(h["kto_kl"] >= 0 for h in logged)
    last = logged[-1]
    assert last["kto_reward_desirable"] > last["kto_reward_undesirable"]
    start, tuned = load_start(summary["start_model"]), load_trained(tmp_path)
    assert _answer_logratio(tuned, project) > _answer_logratio(start, project)
    # a KTO-only run has only feedback held out: it is judged on it (feedback AUC), its desirable answers standing in
    # for the SFT split (perplexity, generated answers)
    from tunepath.config import Config
    from tunepath.evaluate.gates import GateFailed
    from tunepath.evaluate.stage import run_evaluate
    from tunepath.sections import ModelConfig

    art = project / "artifacts"
    held = load_from_disk_rows(art / "tokenize" / "kto" / "eval")
    cfg = Config().evaluate.model_copy(update={"benchmarks": [], "samples": 8})
    try:
        run_evaluate(cfg, ModelConfig(), art / "validate", art / "tokenize", tmp_path / "train", tmp_path / "evaluate")
    except GateFailed:
        pass  # 8 steps need not pass every gate; the numbers below are what this test checks
    m = json.loads((tmp_path / "evaluate" / "metrics.json").read_text(encoding="utf-8"))
    auc = m["comparison"]["feedback_auc"]
    margin = m["comparison"]["feedback_margin"]
    assert m["primary_metric"] == "feedback_auc"
    assert auc["examples"] == margin["examples"] == len(held) and 0 < auc["desirable"] == sum(r["label"] for r in held) < len(held)
    assert auc["base"]["low"] <= auc["base"]["value"] <= auc["base"]["high"] <= 1.0
    assert auc["tuned"]["value"] >= auc["base"]["value"]
    assert margin["tuned"]["value"] > margin["base"]["value"]  # KTO pushed desirable answers further above undesirable ones
    if auc["base"]["value"] == 1.0:  # the demo's undesirable answers are curt one-liners: the base ranks them all last
        assert m["gates"]["primary"]["metric"] == "feedback_margin"
        assert m["gates"]["primary"]["passed"] == (auc["tuned"]["value"] == 1.0 and margin["diff"]["low"] > 0)
    else:
        assert m["gates"]["primary"]["metric"] == "feedback_auc" and m["gates"]["primary"]["passed"] == (auc["diff"]["low"] > 0)
    assert m["eval_rows"] == sum(r["label"] for r in held)  # the desirable answers are the perplexity rows


def load_from_disk_rows(path: Path) -> list[dict]:
    from datasets import load_from_disk

    return list(load_from_disk(str(path)))


def test_kto_loss_matches_trl_formula():
    import torch

    from tunepath.train.kto import feedback_loss

    policy = torch.tensor([-2.0, -5.0, -3.0])
    policy_kl = torch.tensor([-4.0, -4.0, -4.0])
    ref = torch.tensor([-3.0, -4.0, -3.5, -4.5, -4.5, -4.5])
    desirable = torch.tensor([True, False, True])
    loss, metrics = feedback_loss(policy, policy_kl, ref, desirable, beta=0.5, desirable_weight=1.0, undesirable_weight=2.0)
    kl = 0.5  # mean(-4 - -4.5), clamped at 0
    ratios = policy - ref[:3]  # [1, -1, 0.5]
    expected = torch.cat([1 - torch.sigmoid(0.5 * (ratios[desirable] - kl)),
                          2.0 * (1 - torch.sigmoid(0.5 * (kl - ratios[~desirable])))]).mean()
    assert float(loss) == pytest.approx(float(expected)) and metrics["kto_kl"] == pytest.approx(kl)
