"""The route rules, table-driven: at least two profiles per seed scenario and the boundaries between them.

Each row asserts stages, method, start point and retrieval, and that the deciding rule's reason names the
numbers that decided it.
"""

from __future__ import annotations

import pytest

from tunepath.route import RouteConfig, parse_profile, plan_route
from tunepath.route.knobs import TrainSettings, choose_knobs
from tunepath.route.rules import gb

LLAMA7 = dict(params_b=6.74, hidden_size=4096, num_layers=32, intermediate_size=11008, vocab_size=32000)
QWEN15 = dict(params_b=1.54, hidden_size=1536, num_layers=28, intermediate_size=8960, vocab_size=151936)
TRAIN = TrainSettings(max_length=2048, batch_size=1, lora_rank=16)


def profile(labeled=0, unlabeled=0, pairs=0, *, gpus=1, mem=80.0, budget=None, model=LLAMA7, chat=True,
            goal="auto", grounding=False, style=False, labeled_tokens=None, feedback=0):
    return parse_profile({
        "data": {"labeled_examples": labeled, "unlabeled_tokens": unlabeled, "preference_pairs": pairs,
                 "labeled_tokens": labeled_tokens, "feedback_examples": feedback},
        "resources": {"gpus": gpus, "gpu_memory_gb": mem if gpus else None, "time_budget_hours": budget},
        "model": {**model, "has_chat_variant": chat},
        "intent": {"goal": goal, "strict_grounding": grounding, "style_required": style},
    })


def row(name, prof, stages, method, start, retrieval, reasons, cfg=None):
    """reasons: {rule id: substrings its reason must contain}."""
    return pytest.param(prof, cfg or {}, stages, method, start, retrieval, reasons, id=name)


ROWS = [
    # --- scenario 1: ample compute and data, aiming at a new model -------------------------------------
    row("s1-pretrain-sft-dpo", profile(200_000, 40_000_000_000, 60_000, gpus=64, model=dict(params_b=1.0), chat=False, goal="new_model"),
        ["pretrain", "sft", "dpo"], "full", "scratch", "none",
        {"S1-new-model": ["40,000,000,000", "20,000,000,000", "64 GPUs", "GPU-hours"]}),
    row("s1-no-pairs", profile(50_000, 15_000_000_000, 0, gpus=16, model=dict(params_b=0.5), goal="new_model"),
        ["pretrain", "sft"], "full", "scratch", "none",
        {"S1-new-model": ["15,000,000,000", "10,000,000,000"]}),
    row("s1-boundary-tokens-exact", profile(200_000, 20_000_000_000, 60_000, gpus=64, model=dict(params_b=1.0), goal="new_model"),
        ["pretrain", "sft", "dpo"], "full", "scratch", "none", {"S1-new-model": ["20,000,000,000"]}),
    row("s1-boundary-tokens-short", profile(200_000, 19_999_999_999, 60_000, gpus=64, model=dict(params_b=1.0), goal="new_model"),
        ["cpt", "sft"], "full", "base", "none",
        {"S1-not-feasible": ["19,999,999,999", "20,000,000,000"], "goal": ["domain_knowledge"]}),
    row("s1-over-time-budget", profile(200_000, 140_000_000_000, 60_000, gpus=8, budget=100, goal="new_model"),
        ["cpt", "sft"], "lora", "base", "recommended",
        {"S1-not-feasible": ["on 8 GPUs", "> 100.0 h (time_budget_hours)"], "S6-lora": ["> 100.0 h budget"]}),
    row("s1-no-gpu", profile(200_000, 40_000_000_000, 60_000, gpus=0, model=dict(params_b=1.0), goal="new_model"),
        ["cpt", "sft"], "lora", "base", "recommended", {"S1-not-feasible": ["no GPU"], "S6-cpu": ["no GPU"]}),

    # --- scenario 2: much unlabelled domain data -> continued pretraining -------------------------------
    row("s2-cpt-then-sft", profile(2_000, 500_000_000, 0, gpus=8),
        ["cpt", "sft"], "full", "base", "none",
        {"S2-cpt": ["500,000,000", "10,000,000", "488.3×", "1,024,000"], "S3-sft": ["2,000", "100"]}),
    row("s2-cpt-only", profile(0, 200_000_000, 0, gpus=8),
        ["cpt"], "full", "base", "none", {"S2-cpt": ["200,000,000", "no labelled tokens"]}),
    row("s2-boundary-tokens-exact", profile(0, 10_000_000, 0, gpus=8), ["cpt"], "full", "base", "none",
        {"S2-cpt": ["10,000,000 unlabelled tokens ≥ 10,000,000"]}),
    row("s2-boundary-tokens-short", profile(0, 9_999_999, 0, gpus=8), [], "full", "chat", "recommended",
        {"goal": ["9,999,999 unlabelled tokens < 10,000,000", "0 labelled examples < 100"]}),
    row("s2-boundary-ratio-exact", profile(5_000, 20_000_000, 0, gpus=8, labeled_tokens=2_000_000),
        ["cpt", "sft"], "full", "base", "none", {"S2-cpt": ["10.0×", "2,000,000 labelled tokens", "≥ 10×"]}),
    row("s2-boundary-ratio-short", profile(5_000, 20_000_000, 0, gpus=8, labeled_tokens=2_000_001),
        ["sft"], "full", "chat", "none", {"goal": ["task_skill", "20,000,000 unlabelled tokens", "< 10×"]}),
    row("s2-explicit-goal-too-little-text", profile(500, 5_000_000, 0, gpus=8, goal="domain_knowledge"),
        ["sft"], "full", "chat", "recommended", {"goal": ["domain_knowledge set in params"]}),

    # --- scenario 3: labelled data for a task -> SFT; little data starts from the chat variant -----------
    row("s3-little-data-chat", profile(400, 0, 0, model=QWEN15), ["sft"], "full", "chat", "none",
        {"S3-sft": ["400", "100"], "start": ["400 labelled examples < 10,000", "chat variant"]}),
    row("s3-much-data-base", profile(50_000, 0, 0, model=QWEN15), ["sft"], "full", "base", "none",
        {"start": ["50,000 labelled examples ≥ 10,000", "base model"]}),
    row("s3-little-data-no-chat", profile(400, 0, 0, model=QWEN15, chat=False), ["sft"], "full", "base", "none",
        {"start": ["400", "no chat variant"]}),
    row("s3-boundary-labeled-exact", profile(100, 0, 0, model=QWEN15), ["sft"], "full", "chat", "none",
        {"S3-sft": ["100 labelled examples ≥ 100"]}),
    row("s3-boundary-labeled-short", profile(99, 0, 0, model=QWEN15), [], "full", "chat", "none",
        {"goal": ["99 labelled examples < 100", "no training advised"]}),
    row("s3-boundary-base-exact", profile(10_000, 0, 0, model=QWEN15), ["sft"], "full", "base", "none",
        {"start": ["10,000 labelled examples ≥ 10,000"]}),
    row("s3-boundary-base-short", profile(9_999, 0, 0, model=QWEN15), ["sft"], "full", "chat", "none",
        {"start": ["9,999 labelled examples < 10,000"]}),

    # --- scenario 4: strict grounding -> SFT on retrieved context + retrieval, or retrieval alone --------
    row("s4-strategy-a", profile(2_500, 3_000_000, 0, grounding=True), ["sft"], "lora", "chat", "required",
        {"goal": ["strict_grounding"], "S4-grounded-sft": ["2,500", "strategy A"]}),
    row("s4-strategy-b", profile(0, 2_000_000, 0, mem=24, goal="grounded_answers", grounding=True), [], "lora", "chat", "required",
        {"S4-retrieval-only": ["0 labelled examples < 100", "strategy B"]}),
    row("s4-flag-with-task-goal", profile(3_000, 0, 0, model=QWEN15, goal="task_skill", grounding=True), ["sft"], "full", "chat", "required",
        {"S4-grounded-sft": ["3,000"]}),

    # --- scenario 5: styled assistant -> SFT then DPO; without pairs SFT and a warning --------------------
    row("s5-sft-dpo", profile(5_000, 0, 3_000, gpus=2, goal="styled_assistant", style=True), ["sft", "dpo"], "full", "chat", "none",
        {"S5-dpo": ["3,000 preference pairs ≥ 100"]}),
    row("s5-no-pairs", profile(5_000, 0, 0, gpus=2, goal="styled_assistant"), ["sft"], "full", "chat", "none",
        {"S5-no-pairs": ["0 preference pairs < 100"]}),
    row("s5-dpo-on-chat", profile(10, 0, 500, model=QWEN15, style=True), ["dpo"], "full", "chat", "none",
        {"S5-dpo": ["500 preference pairs", "10 labelled examples", "chat variant"]}),
    row("s5-boundary-pairs-exact", profile(5_000, 0, 100, model=QWEN15, style=True), ["sft", "dpo"], "full", "chat", "none",
        {"S5-dpo": ["100 preference pairs ≥ 100"]}),
    row("s5-boundary-pairs-short", profile(5_000, 0, 99, model=QWEN15, style=True), ["sft"], "full", "chat", "none",
        {"S5-no-pairs": ["99 preference pairs < 100"]}),
    row("s5-pairs-without-style-unused", profile(5_000, 0, 3_000, model=QWEN15), ["sft"], "full", "chat", "none",
        {"goal": ["style_required is off", "3,000 preference pairs unused"]}),
    # only unpaired feedback (KTO data): SFT then KTO; pairs, when enough, still win
    row("s5-sft-kto", profile(5_000, 0, 0, model=QWEN15, style=True, feedback=800), ["sft", "kto"], "full", "chat", "none",
        {"S5-kto": ["0 preference pairs < 100", "800 feedback examples ≥ 100"]}),
    row("s5-kto-on-chat", profile(10, 0, 0, model=QWEN15, style=True, feedback=300), ["kto"], "full", "chat", "none",
        {"S5-kto": ["300 feedback examples", "10 labelled examples", "chat variant"], "start": ["KTO without SFT"]}),
    row("s5-pairs-beat-feedback", profile(5_000, 0, 200, model=QWEN15, style=True, feedback=800), ["sft", "dpo"], "full",
        "chat", "none", {"S5-dpo": ["200 preference pairs ≥ 100"]}),
    row("s5-boundary-feedback-short", profile(5_000, 0, 0, model=QWEN15, style=True, feedback=99), ["sft"], "full", "chat",
        "none", {"S5-no-pairs": ["0 preference pairs < 100"]}),

    # --- scenario 6: limited resources -> LoRA, QLoRA; LoRA CPT with its warning ------------------------
    row("s6-lora", profile(20_000, 0, 0, mem=48), ["sft"], "lora", "base", "none",
        {"S6-lora": ["110.05 GB", "43.20 GB", "25.26 GB"]}),
    row("s6-qlora", profile(20_000, 0, 0, mem=16), ["sft"], "qlora", "base", "none",
        {"S6-qlora": ["15.81 GB > 14.40 GB", "6.70 GB"]}),
    row("s6-lora-cpt", profile(0, 200_000_000, 0, mem=48, chat=False), ["cpt"], "lora", "base", "recommended",
        {"S6-lora": ["43.20 GB"], "S6-retrieval": ["200,000,000"]}),
    row("s6-cpu-demo", profile(400, 40_000, 200, gpus=0, model=dict(params_b=0.0003), chat=False), ["sft"], "lora", "base", "recommended",
        {"goal": ["task_skill", "400", "40,000", "10,000,000", "style_required is off"], "S6-cpu": ["no GPU"]}),
    row("s6-nothing-fits", profile(20_000, 0, 0, mem=6), [], "qlora", "chat", "none",
        {"S6-no-fit": ["6.41 GB per GPU > 5.40 GB", "['sft']"]}),
    row("s6-full-over-time-budget", profile(3_000_000, 0, 0, model=QWEN15, budget=1), ["sft"], "lora", "base", "none",
        {"S6-lora": ["fits", "> 1.0 h budget"]}),
]


@pytest.mark.parametrize("prof, cfg, stages, method, start, retrieval, reasons", ROWS)
def test_route_table(prof, cfg, stages, method, start, retrieval, reasons):
    plan = plan_route(prof, RouteConfig(**cfg), TRAIN)
    got = (plan.stages, plan.method, plan.start_from, plan.retrieval)
    assert got == (stages, method, start, retrieval), plan.model_dump_json(indent=1)
    fired = {r.id: r.reason for r in plan.rules}
    for rule_id, numbers in reasons.items():
        assert rule_id in fired, f"rule {rule_id} did not fire; fired: {list(fired)}"
        for n in numbers:
            assert n in fired[rule_id], f"{rule_id} reason lacks {n!r}: {fired[rule_id]}"
    assert plan.forced is False
    assert all(r.scenario is None or 1 <= r.scenario <= 6 for r in plan.rules)


def test_every_scenario_has_at_least_two_rows():
    for n in range(1, 7):
        assert sum(1 for p in ROWS if p.id.startswith(f"s{n}-")) >= 2


def needed(prof, cfg, method):
    """The least memory `method` can run in (the planner's smallest option: checkpointing, offloaded)."""
    fixed = TrainSettings(max_length=2048, batch_size=1, lora_rank=16, gradient_checkpointing=True, checkpoint_offload=True)
    return choose_knobs(prof, cfg, fixed)[method].per_gpu_gb


@pytest.mark.parametrize("delta, method", [(0.0, "full"), (-0.001, "lora")])
def test_boundary_just_enough_memory_for_full(delta, method):
    """Full fine-tuning when its estimate equals the memory available; LoRA when 1 MB short."""
    cfg = RouteConfig(headroom=0)
    probe = profile(3_000, 0, 0, model=QWEN15)
    need = needed(probe, cfg, "full")
    plan = plan_route(profile(3_000, 0, 0, model=QWEN15, mem=need + delta), cfg, TRAIN)
    assert (plan.stages, plan.method) == (["sft"], method)
    reason = next(r.reason for r in plan.rules if r.id.startswith("S6-"))
    assert gb(need) in reason and gb(need + delta) in reason


@pytest.mark.parametrize("delta, method", [(0.0, "lora"), (-0.001, "qlora")])
def test_boundary_just_enough_memory_for_lora(delta, method):
    cfg = RouteConfig(headroom=0)
    need = needed(profile(20_000), cfg, "lora")
    plan = plan_route(profile(20_000, mem=need + delta), cfg, TRAIN)
    assert (plan.stages, plan.method) == (["sft"], method)


def test_sharding_across_gpus_turns_lora_into_full():
    one = plan_route(profile(20_000, mem=80), RouteConfig(), TRAIN)
    eight = plan_route(profile(20_000, gpus=8, mem=80), RouteConfig(), TRAIN)
    assert (one.method, eight.method) == ("lora", "full")
    assert "on 8 GPUs" in next(r.reason for r in eight.rules if r.id == "S6-full")


def test_thresholds_are_parameters():
    prof = profile(400, 0, 0, model=QWEN15)
    assert plan_route(prof, RouteConfig(), TRAIN).stages == ["sft"]
    raised = plan_route(prof, RouteConfig(sft_min_examples=500, base_min_examples=500), TRAIN)
    assert raised.stages == []
    assert "400 labelled examples < 500" in raised.rules[0].reason


def test_peft_cpt_warns_and_full_cpt_does_not():
    lora = plan_route(profile(0, 200_000_000, 0, mem=48), RouteConfig(), TRAIN)
    full = plan_route(profile(0, 200_000_000, 0, gpus=8), RouteConfig(), TRAIN)
    assert any("parameter-efficient training limits" in w for w in lora.warnings)
    assert not any("parameter-efficient training limits" in w for w in full.warnings)


def test_styled_without_pairs_recommends_collecting_them():
    plan = plan_route(profile(5_000, 0, 0, gpus=2, goal="styled_assistant"), RouteConfig(), TRAIN)
    assert any("collect at least 100 preference pairs" in w for w in plan.warnings)


def test_forced_route_records_what_the_rules_chose():
    demo = profile(400, 40_000, 200, gpus=0, model=dict(params_b=0.0003), chat=False)
    plan = plan_route(demo, RouteConfig(force_stages=["cpt", "sft"], force_method="full"), TRAIN)
    assert plan.forced is True
    assert (plan.stages, plan.method, plan.start_from) == (["cpt", "sft"], "full", "base")
    forced = next(r for r in plan.rules if r.id == "forced")
    assert forced.scenario is None
    assert "the rules chose stages=['sft'], method=lora" in forced.reason
    # the rules' own reasons are still there
    assert any(r.id == "S6-cpu" for r in plan.rules)


def test_forced_method_that_does_not_fit_is_an_error():
    from tunepath.params import ConfigError

    with pytest.raises(ConfigError, match=r"route.force_method full: needs .* > 21.60 GB available .* it fits with route.force_method: lora"):
        plan_route(profile(20_000, mem=24), RouteConfig(force_method="full"), TRAIN)


def test_forced_empty_stages_and_stage_without_data():
    plan = plan_route(profile(400, 0, 0, model=QWEN15), RouteConfig(force_stages=["sft", "dpo"]), TRAIN)
    assert plan.stages == ["sft", "dpo"]
    assert any("forced stage dpo has no data" in w for w in plan.warnings)
    none = plan_route(profile(400, 0, 0, model=QWEN15), RouteConfig(force_stages=[]), TRAIN)
    assert none.stages == [] and none.forced


def test_plan_has_exactly_the_issue_fields():
    plan = plan_route(profile(400, 0, 0, model=QWEN15), RouteConfig(), TRAIN)
    data = plan.model_dump()
    assert set(data) == {"stages", "method", "start_from", "retrieval", "rules", "warnings", "memory", "forced", "train"}
    assert set(data["rules"][0]) == {"id", "scenario", "reason"}
    assert set(data["memory"]["per_gpu_gb"]) == {"full", "lora", "qlora"}
    assert {"available_gb", "gpus", "fits", "formula", "hours"} <= set(data["memory"])
