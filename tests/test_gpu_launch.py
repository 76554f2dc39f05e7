"""The GPU side of the train stage, checked on CPU: multi-GPU launch decisions, clear errors for GPU-only methods,
the flattening collator of the unsloth backend, and that nothing imports unsloth by accident."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tunepath.train import TrainConfig
from tunepath.train.launch import LaunchError, launch_command, maybe_relaunch, wanted_processes


def test_auto_uses_one_process_per_visible_gpu():
    assert wanted_processes(TrainConfig(), visible_gpus=4) == 4
    assert wanted_processes(TrainConfig(), visible_gpus=0) == 1
    assert wanted_processes(TrainConfig(num_processes=1), visible_gpus=4) == 1


def test_more_processes_than_gpus_is_a_clear_error():
    with pytest.raises(LaunchError, match="train.num_processes is 2 but 0 CUDA GPU"):
        wanted_processes(TrainConfig(num_processes=2), visible_gpus=0)


def test_lora_launches_ddp_and_full_launches_fsdp():
    argv = ["--project", "p", "stage", "train"]
    ddp = launch_command(2, "lora", "bf16", argv)
    assert ddp[:3] == [sys.executable, "-m", "accelerate.commands.launch"]
    assert "--multi_gpu" in ddp and "--use_fsdp" not in ddp
    assert ddp[ddp.index("--num_processes") + 1] == "2"
    assert ddp[-6:] == ["-m", "tunepath.cli", *argv]
    fsdp = launch_command(4, "full", "bf16", argv)
    assert "--use_fsdp" in fsdp and "--multi_gpu" not in fsdp
    assert fsdp[fsdp.index("--fsdp_sharding_strategy") + 1] == "FULL_SHARD"
    assert fsdp[fsdp.index("--fsdp_state_dict_type") + 1] == "FULL_STATE_DICT"


def test_no_relaunch_on_one_device_or_inside_a_launch(monkeypatch):
    import torch

    monkeypatch.delenv("LOCAL_RANK", raising=False)
    monkeypatch.delenv("TUNEPATH_LAUNCHED", raising=False)
    if torch.cuda.device_count() <= 1:
        assert maybe_relaunch(TrainConfig(), ["stage", "train"]) is None
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert maybe_relaunch(TrainConfig(num_processes=8), ["stage", "train"]) is None


def test_relaunch_asking_for_missing_gpus_fails_before_launching(monkeypatch):
    import torch

    monkeypatch.delenv("LOCAL_RANK", raising=False)
    monkeypatch.delenv("TUNEPATH_LAUNCHED", raising=False)
    too_many = torch.cuda.device_count() + 1
    with pytest.raises(LaunchError, match="check CUDA_VISIBLE_DEVICES"):
        maybe_relaunch(TrainConfig(num_processes=max(too_many, 2)), ["stage", "train"])


def test_flat_collator_keeps_sample_boundaries_and_masks_row_joins():
    from tunepath.train.unsloth_backend import make_collator

    rows = [
        {"input_ids": [5, 6, 7, 8], "labels": [5, 6, 7, 8], "position_ids": [0, 1, 0, 1]},
        {"input_ids": [9, 10, 11], "labels": [-100, 10, 11], "position_ids": [0, 1, 2]},
    ]
    batch = make_collator(pad_token_id=0)(rows)
    assert batch["input_ids"].shape == (1, 7)
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8, 9, 10, 11]]
    assert batch["position_ids"].tolist() == [[0, 1, 0, 1, 0, 1, 2]]
    # the first token of each row is never a target (it would be predicted from the previous row)
    assert batch["labels"].tolist() == [[-100, 6, 7, 8, -100, 10, 11]]


def test_importing_the_gpu_modules_imports_neither_unsloth_nor_torch():
    code = (
        "import sys; import tunepath.train.unsloth_backend, tunepath.train.quantize, tunepath.train.launch; "
        "print(sorted(m for m in ('unsloth', 'torch', 'bitsandbytes', 'transformers') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_gpu_only_methods_fail_clearly_on_cpu():
    import torch

    if torch.cuda.is_available():
        pytest.skip("CPU behaviour")
    from tunepath.train.quantize import QLoRAUnavailable, load_4bit
    from tunepath.train.unsloth_backend import UnslothUnavailable, build_model

    with pytest.raises(QLoRAUnavailable, match="QLoRA needs a CUDA GPU.*method lora"):
        load_4bit("models/demo", TrainConfig())
    with pytest.raises(UnslothUnavailable, match="needs a CUDA GPU"):
        build_model("models/demo", TrainConfig(), "lora", "fp32", 256)
    assert "unsloth" not in sys.modules
