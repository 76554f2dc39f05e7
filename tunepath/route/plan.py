"""RoutePlan and plan_route: profile + thresholds in, an explained training route out. Pure: no I/O."""

from __future__ import annotations

from dataclasses import replace
from typing import Literal

from pydantic import Field

from tunepath.route import knobs, rules, speed
from tunepath.route.config import Method, RouteConfig, Stage
from tunepath.route.knobs import TrainSettings
from tunepath.route.memory import METHODS, estimate_memory
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
    train: dict = Field(
        default_factory=dict,
        description="The train.* knobs the method runs with (gradient_checkpointing, micro_batch_tokens, backend), who set "
        "each (params or route), expected tokens/s per GPU and hours. The train stage applies the route's where params say auto.",
    )


def plan_route(profile: Profile, cfg: RouteConfig, train: TrainSettings | None = None) -> RoutePlan:
    """Apply the scenario rules to a profile. The profile's intent wins over cfg's (the stage copies cfg into it).

    train: how the train stage will run; its None knobs (train.* `auto`) are chosen here (`knobs.py`). A knob
    or a forced method that cannot fit the GPU raises ConfigError naming it and what would fit."""
    settings = train or TrainSettings()
    options = knobs.choose_knobs(profile, cfg, settings)
    memory = estimate_memory(profile, cfg, {m: o.knobs for m, o in options.items()})
    memory["knobs"] = {m: knob_summary(o) for m, o in options.items()}
    facts = rules.Facts.of(profile, cfg)
    draft = rules.Draft()
    requested = profile.intent.goal

    def hours_for(stages: list[str]) -> dict:
        return {m: speed.estimate_hours(profile, cfg, stages, o.knobs) for m, o in options.items()}

    new_model = requested == "new_model" and rules.plan_new_model(
        profile, cfg, facts, memory, draft, speed.estimate_hours(profile, cfg, ["pretrain"], options["full"].knobs))
    if new_model:
        est = hours_for(draft.stages)
    else:
        auto = requested in ("auto", "new_model")
        goal = rules.derive_goal(profile, cfg, facts, draft, "auto" if auto else requested)
        rules.choose_stages(profile, cfg, goal, auto, facts, draft)
        est = rules.choose_method(profile, cfg, memory, facts, draft, hours_for(draft.stages or ["sft"]))
        draft.start_from = rules.choose_start(profile, cfg, facts, draft.stages, draft)
    memory["hours"] = {m: (round(h, 3) if h is not None else None) for m, h in est.items()}

    forced = cfg.force_stages is not None or cfg.force_method is not None
    if forced:
        apply_force(profile, cfg, facts, memory, draft)
    check_fits(profile, cfg, settings, options, draft)
    chosen = options[draft.method]
    explain_knobs(profile, cfg, settings, chosen, draft)
    return RoutePlan(
        stages=draft.stages,
        method=draft.method,
        start_from=draft.start_from,
        retrieval=draft.retrieval,
        rules=[RuleHit(**r) for r in draft.rules],
        warnings=draft.warnings,
        memory=memory,
        forced=forced,
        train={**knob_summary(chosen), "hours": memory["hours"][draft.method]},
    )


def knob_summary(o: knobs.Option) -> dict:
    """The train.* values an option runs with, who set each, and its expected speed."""
    return {
        "gradient_checkpointing": o.knobs.gradient_checkpointing,
        "checkpoint_offload": o.knobs.offload,
        "micro_batch_tokens": o.micro_batch_tokens,
        "micro_batch_rows": o.knobs.rows,
        "backend": o.knobs.backend,
        "set_by": dict(o.set_by),
        "tokens_per_second": round(o.tokens_per_second) if o.tokens_per_second is not None else None,
        "speed_measured": o.measured,
    }


def check_fits(profile: Profile, cfg: RouteConfig, settings: TrainSettings, options: dict, draft: rules.Draft) -> None:
    """A forced method, or train.* knobs set in params, that leave nothing fitting: an error before any model loads."""
    from tunepath.params import ConfigError

    avail = memory_available(profile, cfg)
    if avail is None:
        return
    explicit = settings.explicit()
    given = ", ".join(f"train.{k} {_yaml(v)}" for k, v in explicit.items())
    if cfg.force_method is not None and not options[cfg.force_method].fits:
        method = cfg.force_method
        o = options[method]
        head = (f"route.force_method {method}: needs {rules.gb(o.per_gpu_gb)} per GPU > {rules.gb(avail)} available "
                f"({knobs.describe(o)}{', with ' + given + ' set in params' if given else ''})")
        raise ConfigError(f"{head}; {what_fits(profile, cfg, settings, [method] + [m for m in METHODS if m != method])}")
    no_fit = any(r["id"] == "S6-no-fit" for r in draft.rules)
    if explicit and no_fit:
        smallest = min(options.values(), key=lambda o: o.per_gpu_gb)
        raise ConfigError(
            f"{given} (set in params): no method fits {rules.gb(avail)} per GPU; the smallest is {knobs.describe(smallest)}; "
            f"{what_fits(profile, cfg, settings, list(METHODS))}"
        )


def what_fits(profile: Profile, cfg: RouteConfig, settings: TrainSettings, methods: list[str]) -> str:
    """The first of `methods` that fits once the planner may turn every knob, and which knobs to set for it."""
    for method in methods:
        free = knobs.best_option(profile, cfg, settings, method, free=True)
        if not free.fits:
            continue
        changes = []
        for key, value in settings.explicit().items():
            new = {"gradient_checkpointing": free.knobs.gradient_checkpointing, "checkpoint_offload": free.knobs.offload,
                   "micro_batch_tokens": free.micro_batch_tokens}[key]
            if new != value:
                changes.append(f"train.{key}: {_yaml(new)} (or auto)")
        if method != (cfg.force_method or method) or (cfg.force_method is None and not changes):
            changes.append(f"route.force_method: {method}")
        return f"it fits with {' and '.join(changes) or 'these settings'}: {knobs.describe(free)}"
    return ("nothing fits even with every knob turned: shorten tokenize.max_length, lower train.batch_size, "
            "or use more or larger GPUs")


def explain_knobs(profile: Profile, cfg: RouteConfig, settings: TrainSettings, o: knobs.Option, draft: rules.Draft) -> None:
    """The `knobs` rule: what train.gradient_checkpointing and train.micro_batch_tokens will be, and why."""
    k = o.knobs
    parts = []
    for key, value in (("gradient_checkpointing", k.gradient_checkpointing), ("checkpoint_offload", k.offload),
                       ("micro_batch_tokens", o.micro_batch_tokens)):
        who = o.set_by.get(key)
        note = {"params": "set in params, kept", "route": "chosen by the route", "default": "the default: no GPU to fit"}[who]
        parts.append(f"train.{key} {_yaml(value)} ({note})")
    text = f"{k.method}: " + "; ".join(parts)
    if profile.resources.gpus > 0:
        avail = memory_available(profile, cfg)
        fit = "fits" if o.fits else "does not fit"
        text += (f": {knobs.describe(o)} {fit} {rules.gb(avail)} available, the fastest of {o.tried} combinations tried"
                 if o.fits else f": {knobs.describe(o)} {fit} {rules.gb(avail)} available")
        if not o.measured:
            text += " (speed derived from the measured paths, see route/speed.py)"
        if k.gradient_checkpointing and o.set_by.get("gradient_checkpointing") == "route":
            off = knobs.best_option(profile, cfg, replace(settings, gradient_checkpointing=False, checkpoint_offload=None), k.method)
            text += f"; without checkpointing the best is {knobs.describe(off)}" + (", which does not fit" if not off.fits else "")
        if settings.explicit():
            free = knobs.best_option(profile, cfg, settings, k.method, free=True)
            if free.fits and (free.tokens_per_second or 0) > (o.tokens_per_second or 0) * 1.01:
                draft.warn(f"train.* values set in params make {k.method} slower than the route would: "
                           f"{knobs.describe(o)} against {knobs.describe(free)}; set them to auto to let the route choose")
    draft.fire("knobs", None, text)


def memory_available(profile: Profile, cfg: RouteConfig) -> float | None:
    from tunepath.route.memory import available_gb

    return available_gb(profile, cfg)


def _yaml(value) -> str:
    return str(value).lower() if isinstance(value, bool) else f"{value}"


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
    if profile.resources.gpus == 0 and method == "qlora":
        draft.warn("forced method qlora needs a CUDA GPU (bitsandbytes); this profile has none")
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
