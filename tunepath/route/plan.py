"""RoutePlan and plan_route: profile + thresholds in, an explained training route out. Pure: no I/O."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from tunepath.route import rules
from tunepath.route.config import Method, RouteConfig, Stage
from tunepath.route.memory import estimate_hours, estimate_memory
from tunepath.route.profile import Profile
from tunepath.strict import Strict


class RuleHit(Strict):
    """One rule that fired: which, from which seed scenario (None: not from a scenario, e.g. a forced route), why."""

    id: str
    scenario: int | None = Field(None, ge=1, le=6)
    reason: str


class RoutePlan(Strict):
    """What to train and how, with the rules that decided it."""

    stages: list[Stage] = Field(description="Training stages in order; empty when training is not advised.")
    method: Method = Field(description="full, lora or qlora.")
    start_from: Literal["scratch", "base", "chat"] = Field(description="Random init, the base model, or its chat variant.")
    retrieval: Literal["none", "recommended", "required"] = Field(description="Whether answers need retrieval (RAG) beside the model.")
    rules: list[RuleHit] = Field(description="Every rule that fired, in order, with the numbers that decided it.")
    warnings: list[str] = Field(description="Limits of the chosen route and what to do about them.")
    memory: dict = Field(description="Per-GPU memory estimate per method, what is available and fits, hours per method, the formula.")
    forced: bool = Field(description="True when route.force_stages or route.force_method overrode the rules.")


def plan_route(profile: Profile, cfg: RouteConfig, *, max_length: int, batch_size: int, lora_rank: int,
               gradient_checkpointing: bool = False) -> RoutePlan:
    """Apply the scenario rules to a profile. The profile's intent wins over cfg's (the stage copies cfg into it)."""
    memory = estimate_memory(profile, cfg, max_length=max_length, batch_size=batch_size, lora_rank=lora_rank,
                             gradient_checkpointing=gradient_checkpointing)
    facts = rules.Facts.of(profile, cfg)
    draft = rules.Draft()
    requested = profile.intent.goal

    new_model = requested == "new_model" and rules.plan_new_model(profile, cfg, facts, memory, draft)
    if new_model:
        est = {m: estimate_hours(profile, cfg, draft.stages, m, gradient_checkpointing) for m in ("full", "lora", "qlora")}
    else:
        auto = requested in ("auto", "new_model")
        goal = rules.derive_goal(profile, cfg, facts, draft, "auto" if auto else requested)
        rules.choose_stages(profile, cfg, goal, auto, facts, draft)
        est = rules.choose_method(profile, cfg, memory, facts, draft)
        draft.start_from = rules.choose_start(profile, cfg, facts, draft.stages, draft)
    memory["hours"] = {m: (round(h, 3) if h is not None else None) for m, h in est.items()}

    forced = cfg.force_stages is not None or cfg.force_method is not None
    if forced:
        apply_force(profile, cfg, facts, memory, draft)
    return RoutePlan(
        stages=draft.stages,
        method=draft.method,
        start_from=draft.start_from,
        retrieval=draft.retrieval,
        rules=[RuleHit(**r) for r in draft.rules],
        warnings=draft.warnings,
        memory=memory,
        forced=forced,
    )


def apply_force(profile: Profile, cfg: RouteConfig, facts: rules.Facts, memory: dict, draft: rules.Draft) -> None:
    """Override stages and/or method from params, keeping what the rules chose in the `forced` rule's reason."""
    chosen = f"stages={draft.stages}, method={draft.method}, start_from={draft.start_from}"
    stages = list(cfg.force_stages) if cfg.force_stages is not None else draft.stages
    method = cfg.force_method or draft.method
    if cfg.force_stages is not None:
        scratch = rules.Draft()  # the start point's own rule would repeat the forced reason
        start = rules.choose_start(profile, cfg, facts, stages, scratch)
        draft.warnings.extend(w for w in scratch.warnings if w not in draft.warnings)
    else:
        start = draft.start_from
    what = ", ".join(
        part for part in (
            f"stages={stages}" if cfg.force_stages is not None else "",
            f"method={method}" if cfg.force_method is not None else "",
        ) if part
    )
    draft.fire("forced", None, f"params forced {what} (start_from={start}); the rules chose {chosen}")
    per, avail = memory["per_gpu_gb"], memory["available_gb"]
    if profile.resources.gpus == 0 and method == "qlora":
        draft.warn("forced method qlora needs a CUDA GPU (bitsandbytes); this profile has none")
    elif avail is not None and not memory["fits"][method]:
        draft.warn(f"forced method {method} needs {rules.gb(per[method])} per GPU > {rules.gb(avail)} available: expect out-of-memory")
    if "pretrain" in stages and method != "full":
        draft.warn(f"forced pretraining with {method}: pretraining from scratch must train every weight (method full)")
    if "cpt" in stages and method != "full":
        draft.warn(rules.PEFT_CPT_WARNING.format(method=method))
    empty = {"pretrain": facts.unlabeled, "cpt": facts.unlabeled, "sft": facts.labeled, "dpo": facts.pairs,
             "kto": facts.feedback}
    what = {"dpo": "preference pairs", "kto": "feedback examples", "sft": "labelled examples"}
    for stage in stages:
        if not empty[stage]:
            draft.warn(f"forced stage {stage} has no data in this profile (0 {what.get(stage, 'unlabelled tokens')})")
    draft.stages, draft.method, draft.start_from = stages, method, start


def plan_tags(plan: RoutePlan | dict) -> dict[str, str]:
    """MLflow tags for a plan: route.stages (comma-separated, or 'none'), route.method, route.forced."""
    p = plan.model_dump() if isinstance(plan, RoutePlan) else plan
    return {
        "route.stages": ",".join(p["stages"]) or "none",
        "route.method": p["method"],
        "route.start_from": p["start_from"],
        "route.retrieval": p["retrieval"],
        "route.forced": str(p["forced"]).lower(),
    }
