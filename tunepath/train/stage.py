"""run_train: the train stage's entry, used by `tunepath stage train` (DVC) and the Prefect task alike."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

from tunepath.sections import ModelConfig
from tunepath.train import TrainConfig

log = logging.getLogger(__name__)


def pick_backend(requested: str) -> tuple[str, str]:
    """The backend to use and why (logged and recorded with the model)."""
    import importlib.util

    import torch

    has_cuda = torch.cuda.is_available()
    has_unsloth = importlib.util.find_spec("unsloth") is not None
    if requested == "unsloth":
        if not has_cuda:
            raise ValueError("train.backend: unsloth needs a CUDA GPU; use 'hf' or 'auto' on this machine")
        if not has_unsloth:
            raise ValueError("train.backend: unsloth is not installed; pip install 'tunepath[gpu]' or use 'hf'")
        return "unsloth", "requested in params"
    if requested == "hf":
        return "hf", "requested in params"
    if has_cuda and has_unsloth:
        return "unsloth", "auto: CUDA and unsloth are present"
    return "hf", "auto: " + ("unsloth is not installed" if has_cuda else "no CUDA GPU")


def start_model(plan: dict, model: ModelConfig) -> str:
    start = plan.get("start_from", "base")
    if start == "chat":
        if not model.chat_variant:
            raise ValueError("route plan starts from the chat variant but model.chat_variant is not set")
        return model.chat_variant
    if start == "scratch":
        raise NotImplementedError("route plan starts from scratch (pretraining); force start from base with route.force_stages")
    return model.base


def run_train(cfg: TrainConfig, model: ModelConfig, plan_path: Path, tokenize_dir: Path, out_dir: Path) -> dict:
    from transformers import AutoTokenizer, set_seed

    from tunepath.train import recipe

    plan = json.loads(Path(plan_path).read_text(encoding="utf-8"))
    stages, method = list(plan["stages"]), plan["method"]
    recipe.check_plan(stages, method)
    backend, why = pick_backend(cfg.backend)
    if backend != "hf":
        raise NotImplementedError(f"train backend {backend!r} ({why}) is not wired yet; set train.backend: hf")
    log.info("backend %s (%s); stages %s, method %s", backend, why, stages, method)

    if out_dir.exists():
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True)
    set_seed(cfg.seed)
    precision = recipe.pick_precision(cfg)
    tokenizer = AutoTokenizer.from_pretrained(str(tokenize_dir / "tokenizer"))
    base = start_model(plan, model)
    net = recipe.build_model(base, cfg, method, precision, model.trust_remote_code)
    trainable = sum(p.numel() for p in net.parameters() if p.requires_grad)
    total = sum(p.numel() for p in net.parameters())

    per_stage, steps = [], []
    for stage in stages:
        result = recipe.train_stage(net, stage, tokenize_dir, tokenizer, cfg, out_dir, precision)
        per_stage.append(result["metrics"])
        steps.extend(result["steps"])
    recipe.write_loss_curve(steps, out_dir / "loss.csv")
    summary = {
        "backend": backend,
        "backend_reason": why,
        "method": method,
        "stages": per_stage,
        "start_model": base,
        "precision": precision,
        "trainable_params": trainable,
        "total_params": total,
        "first_loss": steps[0]["loss"] if steps else None,
        "final_loss": steps[-1]["loss"] if steps else None,
    }
    recipe.save_outputs(net, tokenizer, method, out_dir, summary)
    return summary
