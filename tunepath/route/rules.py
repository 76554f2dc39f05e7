"""The route rules: the six scenarios of the seed (§3.3) turned into decisions, each with its reason.

Every function adds the rules it fires to a `Draft`; a reason names the numbers that decided it, so a
reader of plan.md can see which threshold to move to get another route. docs/routing.md is the table.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from tunepath.route.config import RouteConfig
from tunepath.route.memory import labeled_tokens
from tunepath.route.profile import Profile

GOAL_SCENARIO = {"new_model": 1, "domain_knowledge": 2, "task_skill": 3, "grounded_answers": 4, "styled_assistant": 5}
RETRIEVAL_RANK = {"none": 0, "recommended": 1, "required": 2}
PEFT_CPT_WARNING = (
    "continued pretraining with {method}: parameter-efficient training limits how much new knowledge pretraining "
    "can add (seed §3.4); prefer full fine-tuning when memory allows, and serve the domain text through retrieval"
)


def num(x: float) -> str:
    """A count as it appears in reasons: 40,000."""
    return f"{x:,.0f}"


def gb(x: float) -> str:
    return f"{x:,.2f} GB"


def hours(x: float) -> str:
    return f"{x:,.1f} h"


@dataclass
class Draft:
    """The plan being built: decisions plus the rules and warnings that explain them."""

    stages: list[str] = field(default_factory=list)
    method: str = "lora"
    start_from: str = "base"
    retrieval: str = "none"
    rules: list[dict] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def fire(self, rule_id: str, scenario: int | None, reason: str) -> None:
        self.rules.append({"id": rule_id, "scenario": scenario, "reason": reason})

    def warn(self, text: str) -> None:
        if text not in self.warnings:
            self.warnings.append(text)

    def need_retrieval(self, level: str) -> None:
        if RETRIEVAL_RANK[level] > RETRIEVAL_RANK[self.retrieval]:
            self.retrieval = level


@dataclass(frozen=True)
class Facts:
    """The data counts compared with their thresholds, computed once."""

    labeled: int
    unlabeled: int
    pairs: int
    labeled_tokens: int
    labeled_tokens_estimated: bool
    enough_labeled: bool
    ample_labeled: bool
    enough_unlabeled: bool
    unlabeled_ratio: float
    much_unlabeled: bool
    enough_pairs: bool
    feedback: int = 0
    enough_feedback: bool = False

    @classmethod
    def of(cls, profile: Profile, cfg: RouteConfig) -> "Facts":
        d = profile.data
        lt = labeled_tokens(profile, cfg)
        ratio = d.unlabeled_tokens / lt if lt else float("inf")
        enough_unlabeled = d.unlabeled_tokens >= cfg.cpt_min_tokens
        return cls(
            labeled=d.labeled_examples,
            unlabeled=d.unlabeled_tokens,
            pairs=d.preference_pairs,
            labeled_tokens=lt,
            labeled_tokens_estimated=d.labeled_tokens is None,
            enough_labeled=d.labeled_examples >= cfg.sft_min_examples,
            ample_labeled=d.labeled_examples >= cfg.base_min_examples,
            enough_unlabeled=enough_unlabeled,
            unlabeled_ratio=ratio,
            much_unlabeled=enough_unlabeled and ratio >= cfg.cpt_min_ratio,
            enough_pairs=d.preference_pairs >= cfg.dpo_min_pairs,
            feedback=d.feedback_examples,
            enough_feedback=d.feedback_examples >= cfg.kto_min_examples,
        )

    def labeled_tokens_text(self) -> str:
        est = " (estimated)" if self.labeled_tokens_estimated else ""
        return f"{num(self.labeled_tokens)} labelled tokens{est}"

    def ratio_clause(self, cfg: RouteConfig) -> str:
        """Why the unlabelled text does or does not dominate the labelled data (the cpt_min_ratio test)."""
        if self.labeled_tokens == 0:
            return "there are no labelled tokens"
        op = "≥" if self.unlabeled_ratio >= cfg.cpt_min_ratio else "<"
        return f"that is {self.unlabeled_ratio:,.1f}× the {self.labeled_tokens_text()} {op} {cfg.cpt_min_ratio:g}× (cpt_min_ratio)"


# --- goal -------------------------------------------------------------------------------------------------


def derive_goal(profile: Profile, cfg: RouteConfig, f: Facts, draft: Draft, requested: str) -> str | None:
    """The goal the rules plan for: the user's, or for `auto` the strongest signal in intent and data.

    auto never picks new_model: pretraining from scratch is an intent, rarely right (seed scenario 1).
    Order: strict_grounding, style_required (intent flags), then much unlabelled text, then enough labelled
    examples. DPO is never derived from preference pairs alone: alignment is for a required style.
    """
    intent = profile.intent
    if requested != "auto":
        draft.fire("goal", GOAL_SCENARIO[requested], f"goal {requested} set in params")
        return requested
    if intent.strict_grounding:
        draft.fire("goal", 4, "goal auto → grounded_answers: strict_grounding is set")
        return "grounded_answers"
    if intent.style_required:
        draft.fire("goal", 5, "goal auto → styled_assistant: style_required is set")
        return "styled_assistant"
    if f.much_unlabeled:
        draft.fire(
            "goal", 2,
            f"goal auto → domain_knowledge: {num(f.unlabeled)} unlabelled tokens ≥ {num(cfg.cpt_min_tokens)} (cpt_min_tokens) "
            f"and {f.ratio_clause(cfg)}",
        )
        return "domain_knowledge"
    no_cpt = (
        f"{num(f.unlabeled)} unlabelled tokens < {num(cfg.cpt_min_tokens)} (cpt_min_tokens)"
        if not f.enough_unlabeled
        else f"{num(f.unlabeled)} unlabelled tokens, but {f.ratio_clause(cfg)}"
    )
    if f.enough_labeled:
        draft.fire(
            "goal", 3,
            f"goal auto → task_skill: {num(f.labeled)} labelled examples ≥ {num(cfg.sft_min_examples)} (sft_min_examples); "
            f"no CPT: {no_cpt}; no DPO: style_required is off ({num(f.pairs)} preference pairs unused)",
        )
        return "task_skill"
    draft.fire(
        "goal", None,
        f"goal auto: {num(f.labeled)} labelled examples < {num(cfg.sft_min_examples)} (sft_min_examples) and {no_cpt}: "
        "no training advised",
    )
    return None


# --- scenario 1 -------------------------------------------------------------------------------------------


def plan_new_model(profile: Profile, cfg: RouteConfig, f: Facts, memory: dict, draft: Draft, pretrain_hours: float | None) -> bool:
    """Scenario 1: pretrain from scratch, large SFT, alignment. False (with the reason) when not feasible.

    pretrain_hours: pretraining with full fine-tuning and the knobs the planner chose for it (None on CPU)."""
    params_b = profile.model.params_b
    need = cfg.pretrain_tokens_per_param * params_b * 1e9
    gpus = profile.resources.gpus
    budget = profile.resources.time_budget_hours or cfg.pretrain_max_hours
    budget_name = "time_budget_hours" if profile.resources.time_budget_hours else "pretrain_max_hours"
    h = pretrain_hours
    problems = []
    if f.unlabeled < need:
        problems.append(
            f"{num(f.unlabeled)} unlabelled tokens < {cfg.pretrain_tokens_per_param:g} tokens/param × {params_b:g}B = {num(need)}"
        )
    if gpus == 0:
        problems.append("no GPU")
    elif not memory["fits"]["full"]:
        problems.append(f"full training needs {gb(memory['per_gpu_gb']['full'])} per GPU > {gb(memory['available_gb'])} available")
    elif h is not None and h > budget:
        problems.append(f"pretraining ≈ {hours(h)} on {gpus} GPUs > {hours(budget)} ({budget_name})")
    if problems:
        draft.fire("S1-not-feasible", 1, "goal new_model but " + "; ".join(problems) + ": planning from the data as for goal auto")
        draft.warn("pretraining from scratch is not feasible with these resources and data; the plan builds on the base model instead")
        return False
    flops = 6 * params_b * 1e9 * f.unlabeled  # 6 FLOPs per parameter and token (Kaplan et al. 2020)
    draft.fire(
        "S1-new-model", 1,
        f"goal new_model with {num(f.unlabeled)} unlabelled tokens ≥ {num(need)} ({cfg.pretrain_tokens_per_param:g} tokens/param × "
        f"{params_b:g}B) and {gpus} GPUs: pretraining costs ≈ {flops:.2e} FLOPs, {hours(h)} ({num(h * gpus)} GPU-hours) "
        f"≤ {hours(budget)} ({budget_name}); pretrain from scratch, then SFT, then alignment",
    )
    draft.stages = ["pretrain"]
    draft.start_from = "scratch"
    if f.enough_labeled:
        draft.stages.append("sft")
    else:
        draft.warn(f"no SFT after pretraining: {num(f.labeled)} labelled examples < {num(cfg.sft_min_examples)} (sft_min_examples); a pretrained model does not follow instructions")
    if f.enough_pairs and "sft" in draft.stages:
        draft.stages.append("dpo")
    else:
        draft.warn(f"no alignment stage: {num(f.pairs)} preference pairs < {num(cfg.dpo_min_pairs)} (dpo_min_pairs) or no SFT stage")
    draft.method = "full"
    draft.fire("S1-full", 1, f"pretraining trains every weight: full ({gb(memory['per_gpu_gb']['full'])} per GPU ≤ {gb(memory['available_gb'])} available)")
    draft.fire("start", 1, "pretraining starts from random weights: start_from scratch")
    return True


# --- scenarios 2 to 5: stages -----------------------------------------------------------------------------


def choose_stages(profile: Profile, cfg: RouteConfig, goal: str | None, auto: bool, f: Facts, draft: Draft) -> None:
    """Scenarios 2-5: CPT for much unlabelled text, SFT for enough labelled, DPO for a required style, retrieval for grounding."""
    intent = profile.intent
    stages: list[str] = []

    if (auto and f.much_unlabeled) or goal == "domain_knowledge":
        if f.enough_unlabeled:
            stages.append("cpt")
            ratio = f" and {f.ratio_clause(cfg)}" if auto else ""
            draft.fire(
                "S2-cpt", 2,
                f"{num(f.unlabeled)} unlabelled tokens ≥ {num(cfg.cpt_min_tokens)} (cpt_min_tokens){ratio}: continued pretraining from the base model",
            )
        else:
            draft.warn(
                f"goal domain_knowledge but {num(f.unlabeled)} unlabelled tokens < {num(cfg.cpt_min_tokens)} (cpt_min_tokens): "
                "continued pretraining skipped; collect more domain text, serve it through retrieval, or lower route.cpt_min_tokens"
            )
            if f.unlabeled:
                draft.need_retrieval("recommended")

    if f.enough_labeled:
        stages.append("sft")
        draft.fire("S3-sft", 3, f"{num(f.labeled)} labelled examples ≥ {num(cfg.sft_min_examples)} (sft_min_examples): SFT")
    elif goal in ("task_skill", "styled_assistant"):
        draft.warn(
            f"goal {goal} but {num(f.labeled)} labelled examples < {num(cfg.sft_min_examples)} (sft_min_examples): SFT skipped; "
            "collect more examples, lower route.sft_min_examples, or set route.force_stages"
        )

    if goal == "styled_assistant" or intent.style_required:
        plan_alignment(profile, cfg, f, stages, draft)

    if goal == "grounded_answers" or intent.strict_grounding:
        draft.need_retrieval("required")
        if "sft" in stages:
            draft.fire(
                "S4-grounded-sft", 4,
                f"strict grounding with {num(f.labeled)} labelled examples ≥ {num(cfg.sft_min_examples)}: fine-tune to answer "
                "from retrieved context, plus retrieval (strategy A); retrieval required",
            )
            draft.warn("grounded SFT: the labelled examples should carry the retrieved passages in their prompts, so the model learns to answer from them")
        else:
            draft.fire(
                "S4-retrieval-only", 4,
                f"strict grounding with {num(f.labeled)} labelled examples < {num(cfg.sft_min_examples)}: retrieval alone over the "
                "existing model (strategy B); answers depend on the retriever's accuracy and coverage",
            )

    if not stages:
        draft.warn("no training stage: the data does not warrant training under these thresholds (see the rules above)")
        if f.unlabeled:
            draft.need_retrieval("recommended")
    draft.stages = stages


def plan_alignment(profile: Profile, cfg: RouteConfig, f: Facts, stages: list[str], draft: Draft) -> None:
    """Scenario 5: SFT then DPO on preference pairs; with only unpaired feedback, SFT then KTO; without either,
    SFT and a recommendation to collect pairs."""
    has_chat = profile.model.has_chat_variant
    if not f.enough_pairs and f.enough_feedback:
        plan_feedback(f, cfg, stages, has_chat, draft)
        return
    if not f.enough_pairs:
        draft.fire(
            "S5-no-pairs", 5,
            f"style required but {num(f.pairs)} preference pairs < {num(cfg.dpo_min_pairs)} (dpo_min_pairs): no DPO stage",
        )
        draft.warn(f"collect at least {num(cfg.dpo_min_pairs)} preference pairs (chosen/rejected answers) to align the style with DPO after SFT")
        return
    if "sft" in stages:
        stages.append("dpo")
        draft.fire("S5-dpo", 5, f"style required and {num(f.pairs)} preference pairs ≥ {num(cfg.dpo_min_pairs)} (dpo_min_pairs): SFT then DPO")
    elif has_chat and "cpt" not in stages:
        stages.append("dpo")
        draft.fire(
            "S5-dpo", 5,
            f"style required, {num(f.pairs)} preference pairs ≥ {num(cfg.dpo_min_pairs)} but {num(f.labeled)} labelled examples "
            f"< {num(cfg.sft_min_examples)}: DPO directly on the chat variant (it already follows instructions)",
        )
    else:
        draft.warn("DPO skipped: it needs a model that already follows instructions (an SFT stage or a chat variant), and this plan has neither")


def plan_feedback(f: Facts, cfg: RouteConfig, stages: list[str], has_chat: bool, draft: Draft) -> None:
    """Scenario 5 with unpaired feedback only (answers labelled good or bad, no pairs): KTO instead of DPO."""
    pairs = f"{num(f.pairs)} preference pairs < {num(cfg.dpo_min_pairs)} (dpo_min_pairs)"
    feedback = f"{num(f.feedback)} feedback examples ≥ {num(cfg.kto_min_examples)} (kto_min_examples)"
    if "sft" in stages:
        stages.append("kto")
        draft.fire("S5-kto", 5, f"style required, {pairs} but {feedback}: SFT then KTO (binary feedback, no pairs needed)")
    elif has_chat and "cpt" not in stages:
        stages.append("kto")
        draft.fire(
            "S5-kto", 5,
            f"style required, {pairs} but {feedback}, and {num(f.labeled)} labelled examples < {num(cfg.sft_min_examples)}: "
            "KTO directly on the chat variant (it already follows instructions)",
        )
    else:
        draft.warn("KTO skipped: it needs a model that already follows instructions (an SFT stage or a chat variant), and this plan has neither")


# --- scenario 6 and the memory estimate: method -----------------------------------------------------------


def choose_method(profile: Profile, cfg: RouteConfig, memory: dict, f: Facts, draft: Draft, hours_of: dict) -> dict:
    """Full when it fits memory and time; else LoRA; else QLoRA (scenario 6), each with the knobs the planner
    chose for it (`knobs.py`). Returns hours per method."""
    est = hours_of
    per, avail = memory["per_gpu_gb"], memory["available_gb"]
    gpus = profile.resources.gpus
    if not draft.stages:
        draft.method = pick_by_memory(memory, gpus)
        where = f"{gb(per[draft.method])} per GPU" + (f" ≤ {gb(avail)} available" if memory["fits"][draft.method] else "")
        draft.fire("S6-method", 6, f"no training stage; a forced route would use {draft.method} ({where})")
        return est
    if gpus == 0:
        draft.method = "lora"
        draft.fire(
            "S6-cpu", 6,
            f"no GPU: limited resources → LoRA (about {gb(per['lora'])} of memory vs {gb(per['full'])} for full); QLoRA needs a CUDA GPU",
        )
        plan_limited_extras(f, draft)
        return est
    where = f"{gb(avail)} available per GPU ({profile.resources.gpu_memory_gb:g} GB × (1 − {cfg.headroom:g} headroom)) on {gpus} GPU{'s' if gpus > 1 else ''}"
    budget = profile.resources.time_budget_hours
    full_in_time = budget is None or est["full"] <= budget
    if memory["fits"]["full"] and full_in_time:
        draft.method = "full"
        timing = f"; ≈ {hours(est['full'])} ≤ {hours(budget)} budget" if budget else ""
        draft.fire("S6-full", 6, f"resources not limited: full fine-tuning needs {gb(per['full'])} per GPU ≤ {where}{timing}: full")
        return est
    why = (
        f"full fine-tuning needs {gb(per['full'])} per GPU > {where}"
        if not memory["fits"]["full"]
        else f"full fine-tuning fits ({gb(per['full'])} per GPU) but takes ≈ {hours(est['full'])} > {hours(budget)} budget"
    )
    if memory["fits"]["lora"]:
        draft.method = "lora"
        draft.fire("S6-lora", 6, f"limited resources: {why}; LoRA in bf16 needs {gb(per['lora'])} per GPU, which fits: LoRA")
    elif memory["fits"]["qlora"]:
        draft.method = "qlora"
        draft.fire(
            "S6-qlora", 6,
            f"limited resources: {why}; LoRA in bf16 needs {gb(per['lora'])} > {gb(avail)}; QLoRA (4-bit base) needs {gb(per['qlora'])}, which fits: QLoRA",
        )
    else:
        draft.method = "qlora"
        inputs = memory["inputs"]
        draft.fire(
            "S6-no-fit", 6,
            f"even QLoRA needs {gb(per['qlora'])} per GPU > {gb(avail)}: no method fits, so no training stage "
            f"(the rules wanted {draft.stages})",
        )
        draft.warn(
            f"nothing fits in {gb(avail)} per GPU: shorten max_length ({inputs['max_length']}), lower train.batch_size, "
            "or use more or larger GPUs"
        )
        draft.stages = []
        return est
    if budget is not None and est[draft.method] > budget:
        draft.warn(f"{draft.method} training takes ≈ {hours(est[draft.method])}, more than the {hours(budget)} budget")
    plan_limited_extras(f, draft)
    return est


def pick_by_memory(memory: dict, gpus: int) -> str:
    if gpus == 0:
        return "lora"
    return next((m for m in ("full", "lora", "qlora") if memory["fits"][m]), "qlora")


def plan_limited_extras(f: Facts, draft: Draft) -> None:
    """Scenario 6's companions: the PEFT-CPT warning, and retrieval to carry knowledge an adapter will not."""
    if "cpt" in draft.stages:
        draft.warn(PEFT_CPT_WARNING.format(method=draft.method))
    if f.unlabeled and draft.stages:
        draft.need_retrieval("recommended")
        draft.fire(
            "S6-retrieval", 6,
            f"limited resources ({draft.method}) and {num(f.unlabeled)} unlabelled tokens: retrieval over that text supplements "
            "what a parameter-efficient model learns",
        )


# --- start point ------------------------------------------------------------------------------------------


def choose_start(profile: Profile, cfg: RouteConfig, f: Facts, stages: list[str], draft: Draft) -> str:
    """Scratch for pretraining, base for CPT; SFT starts from the chat variant when labelled data is little."""
    has_chat = profile.model.has_chat_variant
    first = stages[0] if stages else None
    if first == "pretrain":
        return "scratch"
    if first == "cpt":
        draft.fire("start", 2, "continued pretraining starts from the base model (raw-text training erodes a chat model's behaviour)")
        return "base"
    if first == "sft":
        if f.ample_labeled:
            draft.fire("start", 3, f"{num(f.labeled)} labelled examples ≥ {num(cfg.base_min_examples)} (base_min_examples): start from the base model, which offers more room")
            return "base"
        if has_chat:
            draft.fire("start", 3, f"{num(f.labeled)} labelled examples < {num(cfg.base_min_examples)} (base_min_examples): start from the chat variant")
            return "chat"
        draft.fire("start", 3, f"{num(f.labeled)} labelled examples < {num(cfg.base_min_examples)} (base_min_examples) but no chat variant: start from the base model")
        draft.warn("little labelled data and no chat variant: SFT starts from the base model; set model.chat_variant to start from an instruct model")
        return "base"
    if first in ("dpo", "kto"):
        draft.fire("start", 5, f"{first.upper()} without SFT starts from the chat variant")
        return "chat" if has_chat else "base"
    return "chat" if has_chat else "base"
