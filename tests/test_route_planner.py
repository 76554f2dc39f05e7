"""The planner's common cases: a user's model, card and data in, the method and knobs that fit out; and the
forced settings that cannot fit, refused before any model loads with the estimate and what would fit."""

from __future__ import annotations

import pytest

from tunepath.params import ConfigError
from tunepath.route import RouteConfig, parse_profile, plan_route
from tunepath.route.knobs import TrainSettings
from tunepath.train import TrainConfig

# shapes as in each model's config.json
QWEN7 = dict(params_b=7.62, hidden_size=3584, num_layers=28, intermediate_size=18944, vocab_size=152064, tied_embeddings=False)
LLAMA8 = dict(params_b=8.03, hidden_size=4096, num_layers=32, intermediate_size=14336, vocab_size=128256, tied_embeddings=False)
QWEN15 = dict(params_b=1.54, hidden_size=1536, num_layers=28, intermediate_size=8960, vocab_size=151936, tied_embeddings=True)
LLAMA70 = dict(params_b=70.55, hidden_size=8192, num_layers=80, intermediate_size=28672, vocab_size=128256, tied_embeddings=False)


def profile(model, mem, labeled=5_000, gpus=1):
    return parse_profile({"data": {"labeled_examples": labeled, "unlabeled_tokens": 0, "preference_pairs": 0},
                          "resources": {"gpus": gpus, "gpu_memory_gb": mem}, "model": model})


def plan(model, mem, cfg=None, **train):
    return plan_route(profile(model, mem), cfg or RouteConfig(), TrainSettings(**train))


@pytest.mark.parametrize("model", [QWEN7, LLAMA8], ids=["qwen2.5-7b", "llama-3-8b"])
@pytest.mark.parametrize("backend", ["hf", "unsloth"])
def test_7b_on_a_16gb_card_is_qlora_with_checkpointing(model, backend):
    p = plan(model, 16, backend=backend)
    assert (p.stages, p.method) == (["sft"], "qlora"), p.rules
    assert p.train["gradient_checkpointing"] is True and p.train["set_by"]["gradient_checkpointing"] == "route"
    assert p.memory["per_gpu_gb"]["qlora"] <= p.memory["available_gb"] == 14.4
    knobs = next(r.reason for r in p.rules if r.id == "knobs")
    assert "without checkpointing the best is" in knobs and "does not fit" in knobs
    assert p.train["tokens_per_second"] > 0 and p.train["hours"] > 0


@pytest.mark.parametrize("model", [QWEN7, LLAMA8], ids=["qwen2.5-7b", "llama-3-8b"])
def test_7b_on_a_24gb_card_is_lora_with_checkpointing(model):
    p = plan(model, 24)
    assert p.method == "lora" and p.train["gradient_checkpointing"] is True
    assert p.memory["fits"] == {"full": False, "lora": True, "qlora": True}


def test_1_5b_on_an_80gb_card_is_full_without_checkpointing_at_the_largest_micro_batch():
    p = plan(QWEN15, 80)
    assert p.method == "full" and p.train["gradient_checkpointing"] is False
    assert p.train["micro_batch_tokens"] == 8 * 2048  # all 8 rows at once: the fastest, and it fits
    assert p.memory["per_gpu_gb"]["full"] <= 72


def test_70b_on_an_80gb_card_is_qlora():
    for backend in ("hf", "unsloth"):
        p = plan(LLAMA70, 80, backend=backend)
        assert p.method == "qlora" and p.train["gradient_checkpointing"] is True, backend
        assert p.memory["fits"]["lora"] is False and p.memory["fits"]["qlora"] is True


def test_more_memory_buys_speed_not_just_a_fit():
    small, large = (plan(QWEN7, mem, RouteConfig(force_method="lora")) for mem in (24, 141))
    assert small.train["gradient_checkpointing"] and not large.train["gradient_checkpointing"]
    assert small.train["tokens_per_second"] < large.train["tokens_per_second"]


def test_knobs_set_in_params_win_and_the_plan_says_so():
    p = plan(QWEN15, 80, gradient_checkpointing=True, micro_batch_tokens=4096)
    assert p.method == "full"
    assert (p.train["gradient_checkpointing"], p.train["micro_batch_tokens"], p.train["micro_batch_rows"]) == (True, 4096, 2)
    assert p.train["set_by"] == {"gradient_checkpointing": "params", "checkpoint_offload": "route", "micro_batch_tokens": "params"}
    knobs = next(r.reason for r in p.rules if r.id == "knobs")
    assert "train.gradient_checkpointing true (set in params, kept)" in knobs
    assert any("slower than the route would" in w for w in p.warnings)


def test_a_knob_that_only_changes_the_method_is_kept():
    """Checkpointing off on a 24 GB card: LoRA no longer fits, QLoRA does; the user's value wins."""
    p = plan(QWEN7, 24, gradient_checkpointing=False, backend="unsloth")
    assert p.method != "lora" and p.train["gradient_checkpointing"] is False


def test_checkpointing_off_where_nothing_fits_without_it_is_an_error_naming_the_knob():
    with pytest.raises(ConfigError) as e:
        plan(QWEN7, 16, gradient_checkpointing=False)
    msg = str(e.value)
    assert msg.startswith("train.gradient_checkpointing false (set in params): no method fits 14.40 GB per GPU")
    assert "train.gradient_checkpointing: true (or auto)" in msg and "qlora" in msg and "\n" not in msg


def test_a_forced_method_that_cannot_fit_is_an_error_with_the_estimate_and_what_fits():
    with pytest.raises(ConfigError) as e:
        plan(QWEN7, 16, RouteConfig(force_method="lora"), gradient_checkpointing=False)
    msg = str(e.value)
    assert msg.startswith("route.force_method lora: needs ") and "> 14.40 GB available" in msg
    assert "train.gradient_checkpointing false set in params" in msg
    assert "route.force_method: qlora" in msg  # LoRA's bf16 weights alone exceed the card: only QLoRA fits


def test_a_forced_method_that_fits_once_checkpointing_is_on():
    with pytest.raises(ConfigError) as e:
        plan(QWEN7, 24, RouteConfig(force_method="lora"), gradient_checkpointing=False)
    assert "it fits with train.gradient_checkpointing: true (or auto): lora" in str(e.value)
    assert plan(QWEN7, 24, RouteConfig(force_method="lora")).train["gradient_checkpointing"] is True


def test_on_cpu_the_knobs_are_the_defaults_or_the_users():
    p = plan_route(parse_profile({"data": {"labeled_examples": 400, "unlabeled_tokens": 0, "preference_pairs": 0},
                                  "resources": {"gpus": 0}, "model": {"params_b": 0.0003}}), RouteConfig(), TrainSettings())
    assert p.train["gradient_checkpointing"] is False and p.train["micro_batch_tokens"] == 8192
    assert p.train["set_by"] == {"gradient_checkpointing": "default", "checkpoint_offload": "default", "micro_batch_tokens": "default"}
    assert p.train["tokens_per_second"] is None


def test_the_train_stage_takes_the_plans_knobs_only_where_params_say_auto():
    chosen = {"gradient_checkpointing": True, "micro_batch_tokens": 2048}
    auto = TrainConfig().resolved(chosen)
    assert (auto.gradient_checkpointing, auto.micro_batch_tokens) == (True, 2048)
    mine = TrainConfig(gradient_checkpointing=False, micro_batch_tokens=4096).resolved(chosen)
    assert (mine.gradient_checkpointing, mine.micro_batch_tokens) == (False, 4096)
    bare = TrainConfig().resolved()  # no plan: the defaults
    assert (bare.gradient_checkpointing, bare.micro_batch_tokens) == (False, 8192)


def test_training_slower_than_the_plan_is_logged_with_both_numbers(caplog):
    import logging

    from tunepath.train.stage import compare_speed

    planned = {"tokens_per_second": 10_000, "gradient_checkpointing": True, "micro_batch_tokens": 2048}
    with caplog.at_level(logging.INFO, logger="tunepath.train.stage"):
        compare_speed(planned, {"stage": "sft", "tokens_per_second": 6_000.0})
        compare_speed(planned, {"stage": "sft", "tokens_per_second": 9_500.0})
    slow, fine = caplog.records[-2:]
    assert slow.levelno == logging.WARNING and "6,000 tokens/s" in slow.getMessage() and "expected 10,000" in slow.getMessage()
    assert fine.levelno == logging.INFO and "slower" not in fine.getMessage()


def test_a_card_too_small_for_checkpointing_alone_gets_the_layer_inputs_offloaded():
    """7B QLoRA on a 9.5 GB card: checkpointing alone needs 8.7 GB at one-row micro-batches; offloaded it fits."""
    p = plan(QWEN7, 9.5)
    assert (p.stages, p.method) == (["sft"], "qlora")
    assert p.train["gradient_checkpointing"] is True and p.train["checkpoint_offload"] is True
    assert p.train["set_by"]["checkpoint_offload"] == "route"
    reason = next(r.reason for r in p.rules if r.id == "knobs")
    assert "train.checkpoint_offload true (chosen by the route)" in reason and "offloaded" in reason
    roomy = plan(QWEN7, 16)
    assert roomy.train["checkpoint_offload"] is False  # offload costs speed: only where nothing fits without it
    kept = plan(QWEN7, 16, checkpoint_offload=True)
    assert kept.train["checkpoint_offload"] is True and kept.train["set_by"]["checkpoint_offload"] == "params"


def test_the_train_stage_takes_the_plans_offload_only_where_params_say_auto():
    chosen = {"gradient_checkpointing": True, "checkpoint_offload": True, "micro_batch_tokens": 2048}
    assert TrainConfig().resolved(chosen).checkpoint_offload is True
    assert TrainConfig(checkpoint_offload=False).resolved(chosen).checkpoint_offload is False
    assert TrainConfig().resolved().checkpoint_offload is False
