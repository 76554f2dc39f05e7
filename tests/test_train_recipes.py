"""Every recipe and method that runs on CPU, on the tiny demo model and the real tokenized demo data."""

from __future__ import annotations

import json
import math

import pytest

from tests.test_train_support import (  # noqa: F401  (project, single_thread: module fixtures)
    LN2, curve, lm_loss, load_start, load_trained, preference_margin, project, single_thread, small_config, train,
)


def _losses(run_dir) -> list[float]:
    return [float(row[2]) for row in curve(run_dir)[1:]]


def _changed(a: dict, b: dict) -> set[str]:
    import torch

    return {k for k in a if not torch.equal(a[k], b[k])}


@pytest.mark.parametrize(
    ("stage", "method", "options"),
    [
        ("cpt", "lora", {}),
        ("cpt", "full", {"learning_rate": 1e-3}),
        ("sft", "lora", {}),
        ("sft", "lora", {"use_dora": True}),
        ("sft", "full", {"learning_rate": 1e-3}),
        ("dpo", "lora", {}),
        ("dpo", "full", {"learning_rate": 1e-3}),
    ],
    ids=["cpt-lora", "cpt-full", "sft-lora", "sft-dora", "sft-full", "dpo-lora", "dpo-full"],
)
def test_recipe_improves_its_objective(project, tmp_path, stage, method, options):
    summary = train(project, tmp_path, [stage], method, cfg=small_config(**options))
    losses = _losses(tmp_path)
    assert len(losses) == 6 and all(math.isfinite(x) for x in losses)
    assert summary["weights"] == ("adapter" if method == "lora" else "model")
    start, tuned = load_start(summary["start_model"]), load_trained(tmp_path)
    if stage == "dpo":
        assert losses[0] == pytest.approx(LN2, abs=1e-5)  # policy == reference before the first step
        assert preference_margin(tuned, project) > preference_margin(start, project)
    else:
        folder = "cpt" if stage == "cpt" else "sft"
        assert lm_loss(tuned, project, folder) < lm_loss(start, project, folder)


def test_lora_trains_adapters_and_leaves_the_base_alone(project, tmp_path):
    """In memory: every trainable tensor moved, every frozen one is bit-identical; the saved adapter is the model."""
    import torch
    from transformers import AutoTokenizer

    from tunepath.collate import PadCollator
    from tunepath.train import recipe
    from tunepath.train.stage import build_model

    cfg = small_config()
    tokenizer = AutoTokenizer.from_pretrained(str(project / "artifacts" / "tokenize" / "tokenizer"))
    model = build_model(str(project / "models" / "demo"), cfg, "lora", "fp32", "hf", 256)
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    trainable = {k for k, v in model.named_parameters() if v.requires_grad}
    assert trainable and all("lora_" in k for k in trainable)
    result = recipe.train_stage(model, "sft", (0, 1), project / "artifacts" / "tokenize", tokenizer,
                                PadCollator(tokenizer.pad_token_id), cfg, tmp_path / "ckpt", "fp32", "lora", 256, 0)
    after = {k: v.detach().clone() for k, v in model.named_parameters()}
    assert _changed(before, after) == trainable
    recipe.save_outputs(result["trainer"], tokenizer, "lora", tmp_path / "train")
    (tmp_path / "train" / "metrics.json").write_text(json.dumps({"weights": "adapter", "start_model": str(project / "models" / "demo")}))
    reloaded = load_trained(tmp_path)
    ids = torch.tensor([list(range(5, 40))])
    model.eval()
    with torch.no_grad():
        assert torch.allclose(model(input_ids=ids).logits, reloaded(input_ids=ids).logits, atol=1e-5)


def test_cpt_then_sft_runs_in_order_on_one_adapter(project, tmp_path):
    summary = train(project, tmp_path / "chain", ["cpt", "sft"], "lora")
    assert [s["stage"] for s in summary["stages"]] == ["cpt", "sft"]
    rows = curve(tmp_path / "chain")[1:]
    assert [int(r[0]) for r in rows] == list(range(1, 13))  # one step axis across plan stages
    assert [r[1] for r in rows] == ["cpt"] * 6 + ["sft"] * 6
    assert sorted(p.name for p in (tmp_path / "chain" / "train").iterdir()) == [
        "adapter", "loss.csv", "loss.png", "metrics.json", "stages", "tokenizer"]
    # SFT started from the CPT weights, not from the base: its first loss differs from an SFT-only run's
    alone = train(project, tmp_path / "alone", ["sft"], "lora")
    assert _losses(tmp_path / "chain")[6] != _losses(tmp_path / "alone")[0]
    tuned, start = load_trained(tmp_path / "chain"), load_start(summary["start_model"])
    assert lm_loss(tuned, project, "sft") < lm_loss(start, project, "sft")


def test_dpo_after_sft_uses_the_sft_model_as_reference(project, tmp_path):
    summary = train(project, tmp_path, ["sft", "dpo"], "lora")
    assert [s["stage"] for s in summary["stages"]] == ["sft", "dpo"]
    losses = _losses(tmp_path)
    # the reference is the model after SFT: at DPO's first step policy == reference, so the loss is exactly ln 2
    # (with the adapter-disabled base as reference it would not be)
    assert losses[6] == pytest.approx(LN2, abs=1e-5)
    assert losses[-1] < LN2
    state = json.loads((tmp_path / "train" / "stages" / "dpo" / "trainer_state.json").read_text())
    assert [h for h in state["log_history"] if "dpo_reward_margin" in h][-1]["dpo_reward_margin"] > 0


def test_pretraining_from_scratch_starts_from_a_seeded_random_init(project, tmp_path):
    summary = train(project, tmp_path / "a", ["pretrain"], "full", "scratch")
    assert summary["start_model"].endswith("init") and summary["start_from"] == "scratch"
    init = load_start(summary["start_model"])
    base = load_start(str(project / "models" / "demo"))
    assert init.config.to_dict()["hidden_size"] == base.config.to_dict()["hidden_size"]
    assert not all(__import__("torch").equal(a, b) for a, b in zip(init.parameters(), base.parameters()))
    assert lm_loss(load_trained(tmp_path / "a"), project, "cpt") < lm_loss(init, project, "cpt")
    again = train(project, tmp_path / "b", ["pretrain"], "full", "scratch")
    assert again["first_loss"] == summary["first_loss"]  # same seed, same init


def test_lora_can_train_tied_embeddings_and_still_merges(project, tmp_path):
    import torch

    summary = train(project, tmp_path, ["cpt"], "lora", cfg=small_config(lora_train_embeddings=True))
    base = load_start(summary["start_model"])
    embeddings = base.get_input_embeddings().weight
    lora_only = train(project, tmp_path / "plain", ["cpt"], "lora")
    assert summary["trainable_params"] == lora_only["trainable_params"] + embeddings.numel()  # one tied matrix
    tuned = load_trained(tmp_path)
    ids = torch.tensor([list(range(5, 60))])
    with torch.no_grad():
        expected = tuned(input_ids=ids).logits
        merged = tuned.merge_and_unload()
        got = merged(input_ids=ids).logits
    assert torch.allclose(got, expected, atol=1e-4)
    assert not torch.equal(merged.get_input_embeddings().weight, embeddings)
    assert torch.equal(merged.get_output_embeddings().weight, merged.get_input_embeddings().weight)


def test_same_settings_give_the_same_loss_curve(project, tmp_path):
    cfg = small_config(max_steps=5, lora_dropout=0.1)
    train(project, tmp_path / "a", ["sft"], "lora", cfg=cfg)
    train(project, tmp_path / "b", ["sft"], "lora", cfg=cfg)
    train(project, tmp_path / "c", ["sft"], "lora", cfg=small_config(max_steps=5, lora_dropout=0.1, seed=1))
    assert curve(tmp_path / "a") == curve(tmp_path / "b")
    assert curve(tmp_path / "a") != curve(tmp_path / "c")


def test_a_crashed_run_resumes_to_the_same_curve(project, tmp_path):
    """In process: the run dies after a checkpoint (an exception from the progress hook), the rerun resumes.
    (tests/test_train_resume.py does the same with SIGKILL, through DPO; it is in the slow tier.)"""
    cfg = small_config(max_steps=4, save_steps=2, keep_checkpoints=True)
    train(project, tmp_path / "whole", ["cpt", "sft"], "lora", cfg=cfg)

    def die(row):
        if row["stage"] == "sft" and row["step"] == 3:
            raise KeyboardInterrupt("simulated kill")

    with pytest.raises(KeyboardInterrupt):
        train(project, tmp_path / "cut", ["cpt", "sft"], "lora", cfg=cfg, on_progress=die)
    summary = train(project, tmp_path / "cut", ["cpt", "sft"], "lora", cfg=cfg)
    assert [s["resumed_from_step"] for s in summary["stages"]] == [4, 2]  # CPT had finished, SFT was cut after step 2
    assert [s["steps"] for s in summary["stages"]] == [4, 4]
    assert curve(tmp_path / "cut") == curve(tmp_path / "whole")


def test_steps_are_tracked_in_mlflow_while_training(project, tmp_path):
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    seen = []
    summary = train(project, tmp_path, ["sft"], "lora", cfg=small_config(max_steps=3), tracking_uri=uri, on_progress=seen.append)
    client = MlflowClient(uri)
    run = client.get_run(summary["mlflow_run_id"])
    assert run.data.tags["stage"] == "train" and run.info.status == "FINISHED"
    assert client.get_experiment(run.info.experiment_id).name == "tunepath"
    for key in ("loss", "learning_rate", "grad_norm", "tokens_per_second"):
        assert [m.step for m in client.get_metric_history(run.info.run_id, key)] == [1, 2, 3], key
    assert [r["step"] for r in seen] == [1, 2, 3] and all(r["tokens_per_second"] > 0 for r in seen)
    header = (tmp_path / "train" / "loss.csv").read_text().splitlines()[0]
    assert header == "step,stage,loss,learning_rate,grad_norm,tokens_per_second"
    # the picture of the curve, beside it and on the run
    assert (tmp_path / "train" / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert {"train/loss.png", "train/loss.csv"} <= {a.path for a in client.list_artifacts(run.info.run_id, "train")}


def test_micro_batches_give_the_whole_batch_curve(project, tmp_path):
    """train.micro_batch_tokens splits a batch into micro-batches: the same optimizer steps, so the same curve."""
    stats = json.loads((project / "artifacts" / "tokenize" / "stats.json").read_text())
    whole = train(project, tmp_path / "whole", ["sft"], "lora", cfg=small_config(max_steps=4, micro_batch_tokens=0))
    split = train(project, tmp_path / "split", ["sft"], "lora", cfg=small_config(max_steps=4, micro_batch_tokens=stats["max_length"]))
    assert (whole["stages"][0]["micro_batch_rows"], whole["stages"][0]["grad_accum_steps"]) == (4, 1)
    assert (split["stages"][0]["micro_batch_rows"], split["stages"][0]["grad_accum_steps"]) == (1, 4)
    a, b = curve(tmp_path / "whole")[1:], curve(tmp_path / "split")[1:]
    assert [float(r[2]) for r in b] == pytest.approx([float(r[2]) for r in a], rel=1e-4)  # loss
    assert [float(r[4]) for r in b] == pytest.approx([float(r[4]) for r in a], rel=1e-3)  # grad norm
