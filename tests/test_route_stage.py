"""run_route: stats + model config + GPUs → plan.json and plan.md; clear errors on missing inputs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tunepath.route import RouteConfig, plan_tags, run_route
from tunepath.route.knobs import TrainSettings
from tunepath.sections import ModelConfig

DEMO_STATS = {"labeled_examples": 400, "unlabeled_tokens": 40_000, "preference_pairs": 200}
SHAPE = dict(train=TrainSettings(max_length=256, batch_size=8, lora_rank=16))


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    """A config.json of a small Qwen2 (no weights: the route counts parameters on the meta device)."""
    from transformers import Qwen2Config

    path = tmp_path_factory.mktemp("model")
    Qwen2Config(hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                vocab_size=1024, tie_word_embeddings=True).save_pretrained(path)
    return path


def write_stats(folder: Path, stats: dict) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "stats.json").write_text(json.dumps(stats))
    return folder


def test_demo_on_cpu_is_lora_sft(tmp_path, tiny_model):
    tok = write_stats(tmp_path / "tokenize", {**DEMO_STATS, "sft": {"train": {"tokens": 61_234}}})
    out = tmp_path / "route"
    result = run_route(RouteConfig(gpus=0), ModelConfig(base=str(tiny_model)), tok, out, **SHAPE)
    assert (result["stages"], result["method"]) == (["sft"], "lora")
    written = json.loads((out / "plan.json").read_text())
    assert written == result
    # parameters counted from config.json: 1024*64 tied embedding + 2 layers, no weights read
    from transformers import AutoModelForCausalLM, Qwen2Config

    real = sum(p.numel() for p in AutoModelForCausalLM.from_config(Qwen2Config.from_pretrained(tiny_model)).parameters())
    assert written["profile"]["model"]["params_b"] == pytest.approx(real / 1e9)
    assert written["profile"]["model"]["hidden_size"] == 64 and written["profile"]["model"]["vocab_size"] == 1024
    assert written["profile"]["model"]["has_chat_variant"] is False
    assert written["memory"]["inputs"]["derived"] == []
    assert written["profile"]["data"]["labeled_tokens"] == 61_234  # read from the tokenize stage's sft.train.tokens
    md = (out / "plan.md").read_text()
    assert "**Stages:** sft" in md and "**Method:** lora" in md and "S6-cpu" in md
    assert plan_tags(result)["route.stages"] == "sft" and plan_tags(result)["route.method"] == "lora"


def test_params_and_chat_variant_flow_into_the_profile(tmp_path, tiny_model):
    tok = write_stats(tmp_path / "tokenize", {**DEMO_STATS, "labeled_tokens": 150_000})
    cfg = RouteConfig(gpus=2, gpu_memory_gb=80, goal="styled_assistant", style_required=True, time_budget_hours=5)
    model = ModelConfig(base=str(tiny_model), chat_variant=str(tiny_model))
    result = run_route(cfg, model, tok, tmp_path / "route", **SHAPE)
    assert (result["stages"], result["method"], result["start_from"]) == (["sft", "dpo"], "full", "chat")
    prof = result["profile"]
    assert prof["resources"] == {"gpus": 2, "gpu_memory_gb": 80.0, "time_budget_hours": 5.0}
    assert prof["intent"]["goal"] == "styled_assistant" and prof["data"]["labeled_tokens"] == 150_000


def test_the_train_sections_knobs_reach_the_plan(tmp_path, tiny_model):
    from tunepath.route.stage import train_settings
    from tunepath.train import TrainConfig

    tok = write_stats(tmp_path / "tokenize", DEMO_STATS)
    cfg, model = RouteConfig(gpus=0), ModelConfig(base=str(tiny_model))
    auto = train_settings(TrainConfig(), 256)
    assert (auto.gradient_checkpointing, auto.micro_batch_tokens) == (None, None)  # auto: the route chooses
    mine = train_settings(TrainConfig(gradient_checkpointing=True, micro_batch_tokens=512), 256)
    off = run_route(cfg, model, tok, tmp_path / "a", auto)
    on = run_route(cfg, model, tok, tmp_path / "b", mine)
    assert on["train"]["gradient_checkpointing"] is True and on["train"]["set_by"]["gradient_checkpointing"] == "params"
    assert on["train"]["micro_batch_rows"] == 2
    assert on["memory"]["per_gpu_gb"]["full"] < off["memory"]["per_gpu_gb"]["full"]


def test_params_b_override_skips_reading_the_model(tmp_path):
    tok = write_stats(tmp_path / "tokenize", DEMO_STATS)
    result = run_route(RouteConfig(gpus=0, params_b=7.0), ModelConfig(base="some-org/not-downloadable"), tok, tmp_path / "r", **SHAPE)
    assert result["profile"]["model"]["params_b"] == 7.0
    assert "hidden_size" in result["memory"]["inputs"]["derived"]


def test_unreadable_model_names_the_fix(tmp_path):
    tok = write_stats(tmp_path / "tokenize", DEMO_STATS)
    with pytest.raises(ValueError, match="route.params_b"):
        run_route(RouteConfig(gpus=0), ModelConfig(base=str(tmp_path / "no-model")), tok, tmp_path / "r", **SHAPE)


@pytest.mark.parametrize("stats, message", [
    (None, "no tokenize stats"),
    ({"labeled_examples": 1, "unlabeled_tokens": 2}, "missing key(s) ['preference_pairs']"),
    ({**DEMO_STATS, "labeled_examples": -1}, "labeled_examples must be a non-negative integer"),
])
def test_bad_stats_name_the_file_and_key(tmp_path, tiny_model, stats, message):
    tok = tmp_path / "tokenize"
    if stats is not None:
        write_stats(tok, stats)
    with pytest.raises((ValueError, FileNotFoundError)) as info:
        run_route(RouteConfig(gpus=0), ModelConfig(base=str(tiny_model)), tok, tmp_path / "r", **SHAPE)
    assert message in str(info.value) and "stats.json" in str(info.value)


def test_gpu_detection(tmp_path, tiny_model, monkeypatch):
    import torch

    from tunepath.route.stage import detect_gpus

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert detect_gpus(RouteConfig()) == (0, None)
    with pytest.raises(ValueError, match="route.gpu_memory_gb"):
        detect_gpus(RouteConfig(gpus=1))

    class Props:
        def __init__(self, total):
            self.total_memory = total

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: Props([85_520_000_000, 79_000_000_000][i]))
    assert detect_gpus(RouteConfig()) == (2, 79.0)  # the smallest card bounds every GPU
    assert detect_gpus(RouteConfig(gpus=1)) == (1, 79.0)
    assert detect_gpus(RouteConfig(gpus=4, gpu_memory_gb=24)) == (4, 24)


def test_feedback_examples_from_the_tokenize_stats_route_to_kto(tmp_path, tiny_model):
    stats = {**DEMO_STATS, "preference_pairs": 0, "feedback_examples": 180}
    tok = write_stats(tmp_path / "tokenize", stats)
    result = run_route(RouteConfig(gpus=0, style_required=True), ModelConfig(base=str(tiny_model)), tok, tmp_path / "r1", **SHAPE)
    assert result["stages"] == ["sft", "kto"] and result["profile"]["data"]["feedback_examples"] == 180
    assert any(r["id"] == "S5-kto" and "180 feedback examples" in r["reason"] for r in result["rules"])
    # without style_required the feedback stays unused: the default demo route is still LoRA SFT
    result = run_route(RouteConfig(gpus=0), ModelConfig(base=str(tiny_model)), tok, tmp_path / "r2", **SHAPE)
    assert (result["stages"], result["method"]) == (["sft"], "lora")
    # stats written before KTO existed have no feedback_examples: zero
    tok = write_stats(tmp_path / "old", DEMO_STATS)
    result = run_route(RouteConfig(gpus=0), ModelConfig(base=str(tiny_model)), tok, tmp_path / "r3", **SHAPE)
    assert result["profile"]["data"]["feedback_examples"] == 0
