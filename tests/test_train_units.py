"""The train stage's checks, errors and bookkeeping, without training a model (except where an error needs one)."""

from __future__ import annotations

import json
import sys

import pytest

from tests.test_train_support import write_plan


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


cpu_only = pytest.mark.skipif("_cuda()", reason="checks the CPU-only behaviour")


@cpu_only
def test_qlora_on_cpu_is_a_clear_error_before_any_work(tmp_path):
    from tunepath.sections import ModelConfig
    from tunepath.train import TrainConfig
    from tunepath.train.stage import run_train

    plan = write_plan(tmp_path / "plan.json", ["sft"], "qlora")
    with pytest.raises(ValueError) as err:
        run_train(TrainConfig(), ModelConfig(base=str(tmp_path / "nowhere")), plan, tmp_path / "tokenize", tmp_path / "train")
    assert str(err.value) == (
        "train.method qlora needs a CUDA GPU (bitsandbytes 4-bit); use lora on this machine or force route.force_method: lora"
    )
    assert not (tmp_path / "train").exists()


@cpu_only
def test_build_model_refuses_qlora_on_cpu_without_importing_bitsandbytes_code(monkeypatch):
    from tunepath.train import TrainConfig
    from tunepath.train.stage import build_model

    monkeypatch.setitem(sys.modules, "tunepath.train.quantize", None)  # importing it would fail loudly
    with pytest.raises(ValueError, match="qlora needs a CUDA GPU"):
        build_model("models/demo", TrainConfig(), "qlora", "fp32", "hf", 256)


def test_a_missing_gpu_backend_module_is_a_clear_error(monkeypatch):
    from tunepath.train import TrainConfig
    from tunepath.train.stage import build_model

    monkeypatch.setitem(sys.modules, "tunepath.train.unsloth_backend", None)
    with pytest.raises(ValueError, match=r"train.backend unsloth is not available in this installation.*tunepath\[gpu\]"):
        build_model("models/demo", TrainConfig(), "lora", "bf16", "unsloth", 256)


@cpu_only
def test_auto_backend_on_cpu_is_hf_and_says_why():
    from tunepath.train.stage import pick_backend

    assert pick_backend("auto") == ("hf", "auto: no CUDA GPU")
    assert pick_backend("hf") == ("hf", "requested in params")
    with pytest.raises(ValueError, match="unsloth needs a CUDA GPU"):
        pick_backend("unsloth")


@pytest.mark.parametrize(
    ("method", "processes", "unsloth", "backend", "why"),
    [
        ("lora", 1, True, "hf", "trains fastest with hf"),
        ("full", 2, True, "hf", "trains fastest with hf"),
        ("qlora", 1, True, "hf", "train.backend unsloth picks it"),
        ("qlora", 2, True, "hf", "several GPUs"),
        ("qlora", 1, False, "hf", "trains fastest with hf"),
    ],
)
def test_auto_backend_on_a_gpu_follows_the_measured_rule(monkeypatch, method, processes, unsloth, backend, why):
    """What `auto` picks where CUDA is present (simulated: the rule is decided before anything touches the GPU)."""
    import importlib.util

    import torch

    from tunepath.train.stage import pick_backend

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object() if name == "unsloth" and unsloth else
                        (None if name == "unsloth" else real_find_spec(name, *a)))
    picked, reason = pick_backend("auto", method, processes)
    assert picked == backend
    assert reason.startswith("auto: ") and why in reason


@pytest.mark.parametrize(
    ("batch", "accum", "row_tokens", "budget", "expected"),
    [
        (8, 1, 512, 8192, (8, 1)),  # the demo on CPU: 8 rows of 512 fit, no split
        (8, 1, 2048, 8192, (4, 2)),  # the GPU default at max_length 2048
        (8, 2, 2048, 8192, (4, 4)),  # grad_accum multiplies on top
        (8, 1, 2048, 6000, (2, 4)),  # 2 rows fit (4,096 tokens); rows must divide the batch
        (6, 1, 2048, 8192, (3, 2)),  # 4 rows would fit, but 4 does not divide 6
        (8, 1, 4096, 2048, (1, 8)),  # not even one row fits: one row per micro-batch
        (8, 1, 2048, 0, (8, 1)),  # 0 switches the split off
    ],
)
def test_micro_batches_keep_the_batch_and_fit_the_token_budget(batch, accum, row_tokens, budget, expected):
    from tunepath.train.speed import micro_batches

    rows, steps = micro_batches(batch, accum, row_tokens, budget)
    assert (rows, steps) == expected
    assert rows * steps == batch * accum


@pytest.mark.parametrize(
    ("stages", "method", "start", "message"),
    [
        ([], "lora", "base", "no training stages"),
        (["rlhf"], "lora", "base", "stage"),
        (["sft"], "ia3", "base", "method"),
        (["pretrain"], "lora", "scratch", "random weights"),
    ],
)
def test_plans_the_stage_cannot_run_are_rejected(stages, method, start, message):
    from tunepath.train.recipe import check_plan

    with pytest.raises(ValueError, match=message):
        check_plan(stages, method, start)


def _checkpoint(stage_dir, step: int, complete: bool):
    from tunepath.train.checkpoints import MARKER

    folder = stage_dir / f"checkpoint-{step}"
    folder.mkdir(parents=True)
    (folder / "adapter_model.safetensors").write_bytes(b"x" * 10)
    if complete:
        (folder / MARKER).write_text("complete\n")
    return folder


def test_checkpoints_without_the_marker_are_never_used(tmp_path):
    from tunepath.train import checkpoints

    stage_dir = tmp_path / "sft"
    _checkpoint(stage_dir, 5, True)
    ten = _checkpoint(stage_dir, 10, True)
    _checkpoint(stage_dir, 15, False)  # killed while saving
    assert checkpoints.last_complete(stage_dir) == ten
    checkpoints.prune(stage_dir, keep=1)
    assert sorted(p.name for p in stage_dir.iterdir()) == ["checkpoint-10"]
    assert checkpoints.last_complete(tmp_path / "missing") is None


def test_checkpoints_of_other_settings_are_discarded(tmp_path):
    from tunepath.train import checkpoints

    root = tmp_path / "ckpt"
    checkpoints.open_run(root, {"lr": 1}, resumable=True)
    _checkpoint(root / "sft", 5, True)
    assert checkpoints.open_run(root, {"lr": 1}, resumable=True)["fingerprint"] == {"lr": 1}
    assert (root / "sft" / "checkpoint-5").exists()
    checkpoints.open_run(root, {"lr": 2}, resumable=True)
    assert not (root / "sft").exists()
    _checkpoint(root / "sft", 5, True)
    checkpoints.open_run(root, {"lr": 2}, resumable=False)  # save_steps 0: nothing may be resumed
    assert not (root / "sft").exists()


def test_the_fingerprint_ignores_bookkeeping_but_not_training_settings(tmp_path):
    from tunepath.train import TrainConfig
    from tunepath.train.stage import fingerprint

    plan = {"stages": ["sft"], "method": "lora", "start_from": "base"}
    (tmp_path / "tok").mkdir()
    (tmp_path / "tok" / "stats.json").write_text("{}")

    def fp(**kw):
        return fingerprint(TrainConfig(**kw), plan, str(tmp_path / "model"), "hf", "fp32", tmp_path / "tok")

    assert fp() == fp(save_steps=7, logging_steps=3, keep_checkpoints=True, checkpoint_limit=5)
    assert fp() != fp(learning_rate=1e-4)
    assert fp() != fp(seed=1)
    (tmp_path / "tok" / "stats.json").write_text('{"max_length": 128}')
    assert fp() != fingerprint(TrainConfig(), plan, str(tmp_path / "model"), "hf", "fp32", tmp_path / "other")


def test_the_oom_message_names_each_knob_with_its_value():
    from tunepath.train import TrainConfig
    from tunepath.train.recipe import oom_message

    text = oom_message("sft", "lora", TrainConfig(batch_size=8, grad_accum=2), 2048)
    for part in ("train.micro_batch_tokens 8192 -> 4096", "train.batch_size 8 -> 4", "train.grad_accum 2 -> 4",
                 "tokenize.max_length 2048 -> 1024",
                 "train.gradient_checkpointing false -> true", "method lora -> qlora", "'sft'"):
        assert part in text, part
    full = oom_message("cpt", "full", TrainConfig(batch_size=1, gradient_checkpointing=True), 512)
    assert "method full -> lora" in full and "gradient_checkpointing" not in full and "grad_accum" not in full
    # a micro-batch already down to one row: halving the token budget would change nothing, so it is not offered
    one_row = oom_message("sft", "lora", TrainConfig(micro_batch_tokens=2048), 2048)
    assert "micro_batch_tokens" not in one_row


def test_cuda_out_of_memory_during_training_becomes_training_oom(tmp_path, monkeypatch, demo_assets):
    import torch
    import transformers
    from datasets import Dataset
    from transformers import AutoTokenizer

    from tunepath.sections import ModelConfig
    from tunepath.train import TrainConfig
    from tunepath.train.recipe import TrainingOOM
    from tunepath.train.stage import run_train

    model_dir = demo_assets / "models" / "demo"
    tok_dir = tmp_path / "tokenize"
    AutoTokenizer.from_pretrained(str(model_dir)).save_pretrained(str(tok_dir / "tokenizer"))
    Dataset.from_dict({"input_ids": [[5, 6, 7]] * 4, "labels": [[5, 6, 7]] * 4}).save_to_disk(str(tok_dir / "sft" / "train"))
    (tok_dir / "stats.json").write_text(json.dumps({"max_length": 512}))

    def out_of_memory(self, *args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(transformers.Trainer, "train", out_of_memory)
    plan = write_plan(tmp_path / "plan.json", ["sft"], "lora")
    with pytest.raises(TrainingOOM) as err:
        run_train(TrainConfig(batch_size=4), ModelConfig(base=str(model_dir)), plan, tok_dir, tmp_path / "train")
    assert "train.batch_size 4 -> 2" in str(err.value) and "tokenize.max_length 512 -> 256" in str(err.value)
    assert isinstance(err.value.__cause__, torch.OutOfMemoryError)


def test_the_loss_curve_counts_steps_across_plan_stages(tmp_path):
    from tunepath.train.tracking import write_loss_curve

    steps = [
        {"stage": "cpt", "step": 1, "global_step": 1, "loss": 3.0, "learning_rate": 1e-3, "grad_norm": 1.5, "tokens_per_second": 100.0},
        {"stage": "sft", "step": 1, "global_step": 2, "loss": 2.5, "learning_rate": 1e-3, "grad_norm": 1.0, "tokens_per_second": None},
    ]
    write_loss_curve(steps, tmp_path / "loss.csv")
    assert (tmp_path / "loss.csv").read_text().splitlines() == [
        "step,stage,loss,learning_rate,grad_norm,tokens_per_second",
        "1,cpt,3.000000,0.001,1.5,100.0",
        "2,sft,2.500000,0.001,1,",
    ]


@pytest.mark.parametrize("stages, dpo_lr, expected", [
    (["sft", "dpo"], "auto", 2e-4),   # after SFT: a tenth of the SFT rate
    (["dpo"], "auto", 2e-3),          # DPO alone, from the base model: the run's rate
    (["sft", "dpo"], 5e-5, 5e-5),     # set by the user: as set
])
def test_dpo_trains_at_its_own_rate_and_the_other_stages_at_the_runs(stages, dpo_lr, expected):
    from tunepath.train import TrainConfig

    cfg = TrainConfig(learning_rate=2e-3, dpo_learning_rate=dpo_lr)
    assert cfg.for_stage("dpo", stages).learning_rate == pytest.approx(expected)
    assert cfg.for_stage("sft", stages).learning_rate == 2e-3
    with pytest.raises(ValueError, match="dpo_learning_rate"):
        TrainConfig(dpo_learning_rate=float("inf"))


def test_special_tokens_are_aligned_once_in_one_line_and_the_trainer_then_has_nothing_to_say(tmp_path, caplog):
    """The Trainer aligns the model's special ids with the tokenizer's and warns on every stage; tunepath does it
    first and says it once (around a real tokenizer of the corpus, Llama 3.2's)."""
    import logging

    import transformers
    from transformers import AutoTokenizer

    from tests.test_export import tiny_model
    from tunepath.train.recipe import align_special_tokens

    folder = tiny_model("llama-3.2-instruct", "llama", tmp_path / "m")
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    model = transformers.AutoModelForCausalLM.from_pretrained(str(folder))
    stale = tokenizer.bos_token_id + 1
    model.config.bos_token_id = stale  # a config whose BOS is not the tokenizer's
    with caplog.at_level(logging.INFO):
        changed = align_special_tokens(model, tokenizer)
    assert changed["bos_token_id"] == tokenizer.bos_token_id == model.config.bos_token_id
    assert f"bos_token_id {stale} -> {tokenizer.bos_token_id}" in caplog.text and "new PAD/BOS/EOS" not in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        transformers.trainer_utils.align_special_tokens(model, tokenizer)  # what the Trainer runs next
    assert "new PAD/BOS/EOS" not in caplog.text and align_special_tokens(model, tokenizer) == {}
