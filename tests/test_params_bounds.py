"""Parameters with sane bounds: finite rates, a step ceiling the plan shows, target modules the model has, and a
params.yaml that cannot expand into gigabytes before anything refuses it."""

from __future__ import annotations

import json
import resource
import time
from pathlib import Path

import pytest

from tunepath.params import MAX_PARAMS_BYTES, ConfigError, build_config, load_config, render_defaults
from tunepath.train import MAX_STEPS_CEILING


@pytest.mark.parametrize("key, value, message", [
    ("train.learning_rate", float("inf"), "train.learning_rate: Input should be a finite number"),
    ("train.learning_rate", float("nan"), "train.learning_rate: Input should be a finite number"),
    ("demo.pretrain_lr", float("inf"), "demo.pretrain_lr: Input should be a finite number"),
    ("train.warmup_steps", float("inf"), "train.warmup_steps: Input should be a finite number"),
    ("train.max_steps", 10**23, f"train.max_steps: Input should be less than or equal to {MAX_STEPS_CEILING}"),
    ("train.epochs", 1e30, "train.epochs: Input should be less than or equal to 10000"),
    ("train.target_modules", [], "train.target_modules: Value should have at least 1 item"),
])
def test_values_past_their_bounds_are_refused_naming_the_key(key, value, message):
    section, name = key.split(".")
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        build_config({section: {name: value}})


def test_the_ceiling_itself_and_the_generated_defaults_load(tmp_path):
    assert build_config({"train": {"max_steps": MAX_STEPS_CEILING}}).train.max_steps == MAX_STEPS_CEILING
    (tmp_path / "params.yaml").write_text(render_defaults())
    assert load_config(tmp_path / "params.yaml").train.max_steps == 60
    # --set values are YAML too: `.inf` is YAML's infinity
    with pytest.raises(ConfigError, match="finite"):
        load_config(tmp_path / "params.yaml", ["train.learning_rate=.inf"])


def test_an_alias_bomb_is_refused_before_it_expands(tmp_path):
    # 9 levels of 9 aliases: 9^9 (387 million) strings once expanded, from a file of about 500 bytes
    lines = ['a0: &a0 ["' + "x" * 20 + '"]'] + [f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 9) + "]" for i in range(1, 10)]
    path = tmp_path / "params.yaml"
    path.write_text("\n".join(lines) + "\ntrain:\n  target_modules: *a9\n")
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    with pytest.raises(ConfigError, match=r"params.yaml: its YAML aliases expand to more than 100,000 values"):
        load_config(path)
    assert time.perf_counter() - start < 5
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 200_000  # KiB: nothing was expanded
    # a few aliases that stay small are fine YAML and still load
    path.write_text("x: &lr 0.001\ntrain:\n  learning_rate: *lr\n  target_modules: &t [q_proj, v_proj]\n")
    with pytest.raises(ConfigError, match="x: unknown key"):
        load_config(path)
    path.write_text("train:\n  learning_rate: &lr 0.001\n  target_modules: [q_proj, v_proj]\ndemo:\n  pretrain_lr: *lr\n")
    assert load_config(path).demo.pretrain_lr == 0.001


def test_an_oversized_params_file_is_refused_before_parsing(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text(render_defaults() + "#" * MAX_PARAMS_BYTES)
    with pytest.raises(ConfigError, match=r"params.yaml: 1,0\d\d,\d{3} bytes, more than the 1,000,000"):
        load_config(path)


@pytest.fixture(scope="module")
def tiny_llama():
    from transformers import AutoModelForCausalLM, LlamaConfig

    return AutoModelForCausalLM.from_config(LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
        vocab_size=64))


def test_target_modules_are_checked_against_the_model_naming_the_key_and_the_valid_names(tiny_llama):
    from tunepath.train.recipe import check_target_modules

    check_target_modules(tiny_llama, "all-linear")
    check_target_modules(tiny_llama, ["q_proj", "v_proj"])
    check_target_modules(tiny_llama, ["self_attn.q_proj"])  # peft matches a dotted suffix too
    check_target_modules(tiny_llama, r".*\.(q|v)_proj")  # a string is a regular expression over full names
    with pytest.raises(ConfigError) as e:
        check_target_modules(tiny_llama, ["q_proj", "query_key_value"])
    assert str(e.value).startswith("train.target_modules: 'query_key_value' matches no layer of LlamaForCausalLM; ")
    for name in ("down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj", "lm_head", "embed_tokens"):
        assert name in str(e.value)
    with pytest.raises(ConfigError, match="'attn' matches no layer"):
        check_target_modules(tiny_llama, "attn")


def test_add_lora_refuses_unknown_modules_before_peft(tiny_llama):
    from tunepath.train import TrainConfig
    from tunepath.train.recipe import add_lora

    with pytest.raises(ConfigError, match="train.target_modules: 'c_attn' matches no layer"):
        add_lora(tiny_llama, TrainConfig(target_modules=["c_attn"]))


def test_the_route_plan_shows_the_hours_that_max_steps_asks_for(tmp_path):
    from transformers import Qwen2Config

    from tunepath.route import RouteConfig, run_route
    from tunepath.sections import ModelConfig

    model = tmp_path / "model"
    Qwen2Config(hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                vocab_size=1024).save_pretrained(model)
    tok = tmp_path / "tokenize"
    tok.mkdir()
    (tok / "stats.json").write_text(json.dumps({"labeled_examples": 20_000, "unlabeled_tokens": 40_000, "preference_pairs": 0}))
    cfg = RouteConfig(gpus=1, gpu_memory_gb=80, time_budget_hours=24, params_b=1.0)
    from tunepath.route.knobs import TrainSettings, choose_knobs
    from tunepath.route.speed import tokens_per_second

    train = TrainSettings(max_length=2048, batch_size=8, lora_rank=16)
    small = run_route(cfg, ModelConfig(base=str(model)), tok, tmp_path / "a", train, max_steps=60)
    huge = run_route(cfg, ModelConfig(base=str(model)), tok, tmp_path / "b", train, max_steps=MAX_STEPS_CEILING)
    steps = huge["memory"]["max_steps"]
    assert steps["max_steps"] == MAX_STEPS_CEILING and steps["tokens_per_step"] == 8 * 2048
    # one SFT stage, each method at its expected tokens/s with the knobs the planner chose (route/speed.py)
    assert huge["stages"] == ["sft"]
    from tunepath.route import parse_profile

    options = choose_knobs(parse_profile(huge["profile"]), cfg, train)
    for method in ("full", "lora", "qlora"):
        speed = tokens_per_second(parse_profile(huge["profile"]), cfg, options[method].knobs)
        expected = MAX_STEPS_CEILING * 8 * 2048 / speed / 3600
        assert steps["hours"][method] == pytest.approx(expected, rel=1e-3)
        assert small["memory"]["max_steps"]["hours"][method] == pytest.approx(expected * 60 / MAX_STEPS_CEILING, abs=1e-3)
    assert any("train.max_steps=10,000,000" in w and "time_budget_hours" in w for w in huge["warnings"])
    assert not any("train.max_steps" in w for w in small["warnings"])
    md = (tmp_path / "b" / "plan.md").read_text()
    assert "train.max_steps: 10,000,000 optimizer steps per stage" in md and f"qlora {expected:,.1f}" in md
