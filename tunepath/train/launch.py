"""Several GPUs: re-run `tunepath stage train` under `accelerate launch`, one process per GPU.

Usage (the CLI's `stage train` calls this first and returns its exit code when it relaunched):

    from tunepath.train.launch import maybe_relaunch
    code = maybe_relaunch(cfg.train, sys.argv[1:], method=plan["method"])
    if code is not None:
        return code          # the launched processes did the training
    ...train in this process...

LoRA and QLoRA run as DDP (each GPU holds the whole model, gradients are averaged); full fine-tuning runs
under FSDP (parameters, gradients and optimizer state sharded across GPUs), since a full copy per GPU is what
does not fit. transformers.Trainer picks the distributed setup up from the environment accelerate sets.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys

from tunepath.train import TrainConfig

log = logging.getLogger(__name__)

# Set in the launched processes so that they train instead of launching again.
LAUNCHED_ENV = "TUNEPATH_LAUNCHED"


class LaunchError(ValueError):
    """The requested number of processes cannot run on this machine."""


def is_launched() -> bool:
    """True inside a process started by accelerate/torchrun (or by `maybe_relaunch`)."""
    return os.environ.get(LAUNCHED_ENV) == "1" or "LOCAL_RANK" in os.environ


def wanted_processes(cfg: TrainConfig, visible_gpus: int) -> int:
    """Processes to train with: `train.num_processes` when set, else one per visible GPU (auto)."""
    requested = getattr(cfg, "num_processes", None)
    if requested in (None, "auto"):
        return max(visible_gpus, 1)
    requested = int(requested)
    if requested > 1 and visible_gpus < requested:
        raise LaunchError(
            f"train.num_processes is {requested} but {visible_gpus} CUDA GPU(s) are visible; "
            f"set train.num_processes to at most {max(visible_gpus, 1)} (or check CUDA_VISIBLE_DEVICES)"
        )
    return requested


def launch_command(processes: int, method: str, mixed_precision: str, argv: list[str]) -> list[str]:
    """The `accelerate launch` command line that re-runs this CLI call in `processes` processes."""
    command = [
        sys.executable, "-m", "accelerate.commands.launch",
        "--num_processes", str(processes),
        "--num_machines", "1",
        "--mixed_precision", mixed_precision,
        "--dynamo_backend", "no",
    ]
    if method == "full":
        command += [
            "--use_fsdp",
            "--fsdp_version", "1",
            "--fsdp_sharding_strategy", "FULL_SHARD",
            "--fsdp_auto_wrap_policy", "TRANSFORMER_BASED_WRAP",  # wraps each decoder layer (model._no_split_modules)
            "--fsdp_state_dict_type", "FULL_STATE_DICT",  # save_pretrained writes one ordinary checkpoint
            "--fsdp_use_orig_params", "true",
            "--fsdp_sync_module_states", "true",
            "--fsdp_cpu_ram_efficient_loading", "true",
        ]
    else:
        command += ["--multi_gpu"]
    return command + ["-m", "tunepath.cli", *argv]


def maybe_relaunch(cfg: TrainConfig, argv: list[str], method: str | None = None) -> int | None:
    """Relaunch under accelerate when more than one process is wanted; None when training should run here.

    `argv` is the CLI's own argument list (without the program name); `method` is the route plan's method
    (full selects FSDP, anything else DDP).
    """
    if is_launched():
        return None
    import torch

    visible = torch.cuda.device_count() if torch.cuda.is_available() else 0
    processes = wanted_processes(cfg, visible)
    if processes <= 1:
        return None
    bf16 = cfg.precision in ("auto", "bf16") and torch.cuda.is_bf16_supported()
    command = launch_command(processes, method or "lora", "bf16" if bf16 else "no", argv)
    mode = "FSDP" if method == "full" else "DDP"
    log.info("training on %d GPUs (%s): %s", processes, mode, " ".join(command))
    env = {**os.environ, LAUNCHED_ENV: "1"}
    return subprocess.run(command, env=env, check=False).returncode
