"""run_route: the route stage. Builds the profile from the tokenize stats, the model config and the GPUs, plans, writes.

Writes `out_dir/plan.json` (the RoutePlan's fields plus `profile`) and `out_dir/plan.md`.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from tunepath.route.config import RouteConfig
from tunepath.route.knobs import TrainSettings
from tunepath.route.plan import plan_route
from tunepath.route.profile import Profile
from tunepath.route.render import render_markdown
from tunepath.sections import ModelConfig

log = logging.getLogger(__name__)

STATS_KEYS = ("labeled_examples", "unlabeled_tokens", "preference_pairs")


def run_route(
    cfg: RouteConfig,
    model: ModelConfig,
    tokenize_dir: Path,
    out_dir: Path,
    train: TrainSettings,
    *,
    max_steps: int = -1,
    grad_accum: int = 1,
) -> dict:
    """Plan the training route for this data, model and machine; returns the plan as written to plan.json.

    train describes how the train stage will run (tokenize.max_length and the train section, see
    `train_settings`); the knobs it leaves None (train.* `auto`) are chosen by the planner. max_steps
    (train.max_steps) adds the hours that the configured step count asks for, so a step count far beyond the
    data shows in the plan.
    """
    stats = read_stats(Path(tokenize_dir) / "stats.json")
    shape = model_shape_from_config(model, cfg.params_b)
    gpus, memory_gb = detect_gpus(cfg)
    profile = Profile.model_validate({
        "data": {
            **{k: stats[k] for k in STATS_KEYS},
            "feedback_examples": stats.get("feedback_examples", 0),  # stats written before KTO lack it
            "labeled_tokens": labeled_tokens(stats),
        },
        "resources": {"gpus": gpus, "gpu_memory_gb": memory_gb, "time_budget_hours": cfg.time_budget_hours},
        "model": {**shape, "has_chat_variant": model.chat_variant is not None},
        "intent": {"goal": cfg.goal, "strict_grounding": cfg.strict_grounding, "style_required": cfg.style_required},
    })
    plan = plan_route(profile, cfg, train)
    if max_steps > 0:
        step_tokens = train.batch_size * grad_accum * train.max_length * max(gpus, 1)
        _add_step_hours(plan, profile, cfg, train, max_steps, step_tokens)
    result = {**plan.model_dump(mode="json"), "profile": profile.model_dump(mode="json")}
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "plan.json").write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    (out_dir / "plan.md").write_text(render_markdown(plan, profile), encoding="utf-8")
    log.info("route: stages %s, method %s, start from %s, retrieval %s%s",
             plan.stages, plan.method, plan.start_from, plan.retrieval, " (forced)" if plan.forced else "")
    log.info("route: train.gradient_checkpointing %s, train.micro_batch_tokens %s (%s)", plan.train["gradient_checkpointing"],
             plan.train["micro_batch_tokens"], ", ".join(f"{k} by {v}" for k, v in plan.train["set_by"].items()))
    for warning in plan.warnings:
        log.warning("route: %s", warning)
    return result


def train_settings(train, max_length: int) -> TrainSettings:
    """TrainSettings from the train section (a TrainConfig): `auto` knobs become None, for the planner to choose."""
    import importlib.util

    from tunepath.train.speed import long_enough

    compile_on = train.compile is True or (train.compile == "auto" and long_enough(train))
    processes = train.num_processes if isinstance(train.num_processes, int) else None
    return TrainSettings(
        max_length=max_length,
        batch_size=train.batch_size,
        lora_rank=train.lora_r,
        gradient_checkpointing=None if train.gradient_checkpointing == "auto" else train.gradient_checkpointing,
        micro_batch_tokens=None if train.micro_batch_tokens == "auto" else train.micro_batch_tokens,
        checkpoint_offload=None if train.checkpoint_offload == "auto" else train.checkpoint_offload,
        compile=compile_on,
        chunked_loss=train.chunked_loss,
        backend=train.backend,
        unsloth=importlib.util.find_spec("unsloth") is not None,
        processes=processes,
    )


def _add_step_hours(plan, profile: Profile, cfg: RouteConfig, train: TrainSettings, max_steps: int, tokens_per_step: int) -> None:
    """tokens_per_step: all GPUs together; each method at the knobs the planner chose for it."""
    from tunepath.route.knobs import choose_knobs
    from tunepath.route.rules import hours
    from tunepath.route.speed import estimate_hours

    options = choose_knobs(profile, cfg, train)
    stages = plan.stages or ["sft"]
    est = {m: estimate_hours(profile, cfg, stages, o.knobs, {s: max_steps * tokens_per_step for s in stages})
           for m, o in options.items()}
    plan.memory["max_steps"] = {"max_steps": max_steps, "tokens_per_step": tokens_per_step,
                                "hours": {m: (round(h, 3) if h is not None else None) for m, h in est.items()}}
    h, budget = est[plan.method], cfg.time_budget_hours
    if h is not None and budget and h > budget:
        plan.warnings.append(f"train.max_steps={max_steps:,} per stage takes ≈ {hours(h)} with {plan.method}, more "
                             f"than the {hours(budget)} budget (route.time_budget_hours); lower train.max_steps")


def read_stats(path: Path) -> dict:
    """The tokenize stage's counts; a missing file or key is an error that names it."""
    try:
        stats = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as e:
        raise FileNotFoundError(f"{path}: no tokenize stats; run the tokenize stage first (tunepath stage tokenize)") from e
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} line {e.lineno}: invalid JSON ({e.msg}); re-run the tokenize stage") from e
    if not isinstance(stats, dict):
        raise ValueError(f"{path}: expected a JSON object with {list(STATS_KEYS)}, got {type(stats).__name__}")
    missing = [k for k in STATS_KEYS if k not in stats]
    if missing:
        raise ValueError(f"{path}: missing key(s) {missing} (the route stage needs {list(STATS_KEYS)}); re-run the tokenize stage")
    for key in (k for k in STATS_KEYS + ("labeled_tokens", "feedback_examples") if k in stats):
        value = stats[key]
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise ValueError(f"{path}: {key} must be a non-negative integer, got {value!r}")
    return stats


def labeled_tokens(stats: dict) -> int | None:
    """Tokens of the labelled (SFT) training rows: top-level `labeled_tokens`, else `sft.train.tokens`, else None."""
    if "labeled_tokens" in stats:
        return stats["labeled_tokens"]
    value = (stats.get("sft") or {}).get("train", {}).get("tokens") if isinstance(stats.get("sft"), dict) else None
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else None


def model_shape_from_config(model: ModelConfig, params_b: float | None) -> dict:
    """params_b and the shape from the model's config.json, counting parameters on the meta device (no weights loaded).

    With route.params_b set, that size is used and the shape is derived; a model that cannot be read (a hub id
    with no network) then still plans.
    """
    if params_b is not None:
        return {"params_b": params_b}
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(model.base, trust_remote_code=model.trust_remote_code)
    except (OSError, ValueError) as e:
        raise ValueError(
            f"model.base: cannot read the config of {model.base!r} to count its parameters ({e}); "
            "point model.base at a local model folder or set route.params_b"
        ) from e
    with torch.device("meta"):
        net = AutoModelForCausalLM.from_config(config, trust_remote_code=model.trust_remote_code)
    params = sum(p.numel() for p in net.parameters())  # tied weights are one Parameter and count once
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    shape = {
        "params_b": params / 1e9,
        "hidden_size": getattr(text, "hidden_size", None),
        "num_layers": getattr(text, "num_hidden_layers", None),
        "intermediate_size": getattr(text, "intermediate_size", None),
        "vocab_size": getattr(text, "vocab_size", None),
        "tied_embeddings": bool(getattr(config, "tie_word_embeddings", getattr(text, "tie_word_embeddings", False))),
    }
    log.info("route: %s has %s parameters", model.base, f"{params:,}")
    return {k: v for k, v in shape.items() if v is not None}


def detect_gpus(cfg: RouteConfig) -> tuple[int, float | None]:
    """GPU count and the smallest card's memory in GB (1e9 bytes); params override detection."""
    if cfg.gpus == 0:
        return 0, None
    if cfg.gpus is not None and cfg.gpu_memory_gb is not None:
        return cfg.gpus, cfg.gpu_memory_gb
    import torch

    found = torch.cuda.device_count() if torch.cuda.is_available() else 0
    gpus = cfg.gpus if cfg.gpus is not None else found
    if gpus == 0:
        return 0, None
    if cfg.gpu_memory_gb is not None:
        return gpus, cfg.gpu_memory_gb
    if found == 0:
        raise ValueError(f"route.gpu_memory_gb: required when route.gpus is {gpus} and no GPU is detected on this machine")
    memory = min(torch.cuda.get_device_properties(i).total_memory for i in range(found)) / 1e9
    return gpus, round(memory, 2)
