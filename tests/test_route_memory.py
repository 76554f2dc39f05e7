"""The memory estimate: the formula's terms, sharding, checkpointing, and the shape derivation."""

from __future__ import annotations

import pytest

from tunepath.route import RouteConfig, parse_profile
from tunepath.route.memory import GB, NF4_BYTES, estimate_hours, estimate_memory, model_shape

LLAMA7 = dict(params_b=6.74, hidden_size=4096, num_layers=32, intermediate_size=11008, vocab_size=32000)


def prof(gpus=1, mem=80.0, model=LLAMA7, **data):
    counts = {"labeled_examples": 1000, "unlabeled_tokens": 0, "preference_pairs": 0, **data}
    return parse_profile({"data": counts, "resources": {"gpus": gpus, "gpu_memory_gb": mem if gpus else None},
                          "model": model})


def est(p, cfg=None, **kw):
    return estimate_memory(p, cfg or RouteConfig(), **{"max_length": 2048, "batch_size": 1, "lora_rank": 16, **kw})


def test_full_counts_16_bytes_per_parameter_and_shards_them():
    one, four = est(prof(gpus=1)), est(prof(gpus=4))
    static = lambda m: sum(m["breakdown_gb"]["full"][k] for k in ("weights", "gradients", "optimizer"))  # noqa: E731
    assert static(one) == pytest.approx(16 * 6.74e9 / GB, rel=1e-3)
    assert static(four) == pytest.approx(static(one) / 4, rel=1e-3)
    # activations are per GPU: not divided by sharding
    assert four["breakdown_gb"]["full"]["activations"] == one["breakdown_gb"]["full"]["activations"]
    # LoRA replicates the frozen weights on every GPU
    assert four["per_gpu_gb"]["lora"] == one["per_gpu_gb"]["lora"]


def test_methods_order_and_qlora_weights():
    m = est(prof())
    assert m["per_gpu_gb"]["qlora"] < m["per_gpu_gb"]["lora"] < m["per_gpu_gb"]["full"]
    embed = 2 * 32000 * 4096
    lora_weights = 4 * m["inputs"]["lora_params"]
    expected = ((6.74e9 - embed) * NF4_BYTES + embed * 2 + lora_weights) / GB
    assert m["breakdown_gb"]["qlora"]["weights"] == pytest.approx(expected, abs=1e-3)


def test_lora_params_follow_rank():
    r8, r64 = est(prof(), lora_rank=8), est(prof(), lora_rank=64)
    assert r64["inputs"]["lora_params"] == 8 * r8["inputs"]["lora_params"]
    assert r8["inputs"]["lora_params"] == 8 * 32 * (11 * 4096 + 3 * 11008)


def test_activations_scale_with_tokens_and_checkpointing_cuts_them():
    short, long = est(prof(), max_length=1024), est(prof(), max_length=4096)
    a = lambda m: m["breakdown_gb"]["full"]["activations"]  # noqa: E731
    assert a(long) == pytest.approx(4 * a(short), rel=1e-4)
    assert est(prof(), batch_size=4)["breakdown_gb"]["full"]["activations"] == pytest.approx(a(est(prof())) * 4, rel=1e-4)
    ckpt = est(prof(), gradient_checkpointing=True)
    assert a(ckpt) < a(est(prof())) / 3


def test_activation_factor_overrides_the_derived_one():
    base = est(prof(), RouteConfig(activation_factor=10))
    more = est(prof(), RouteConfig(activation_factor=20))
    layer_part = 2048 * 4096 * 32 * 10 / GB
    assert more["breakdown_gb"]["full"]["activations"] - base["breakdown_gb"]["full"]["activations"] == pytest.approx(layer_part, abs=2e-3)


def test_available_memory_and_fits():
    m = est(prof(mem=48))
    assert m["available_gb"] == pytest.approx(43.2)
    assert m["fits"] == {"full": False, "lora": True, "qlora": True}
    cpu = est(prof(gpus=0))
    assert cpu["available_gb"] is None and cpu["fits"] == {"full": None, "lora": None, "qlora": None}


def test_shape_is_derived_from_size_when_unknown():
    shape = model_shape(prof(model={"params_b": 7.0}))
    assert 3800 <= shape.hidden_size <= 4600 and 28 <= shape.num_layers <= 38
    assert set(shape.derived) == {"hidden_size", "num_layers", "intermediate_size", "vocab_size"}
    given = model_shape(prof())
    assert given.derived == () and given.hidden_size == 4096


def test_hours_follow_six_n_d_and_gpu_count():
    p = prof(gpus=2, labeled_examples=1000, labeled_tokens=1_000_000)
    cfg = RouteConfig(gpu_tflops=100)
    full = estimate_hours(p, cfg, ["sft"], "full")
    assert full == pytest.approx(6 * 6.74e9 * 1e6 / (2 * 100e12) / 3600)
    assert estimate_hours(p, cfg, ["sft"], "lora") == pytest.approx(full * 4 / 6)
    assert estimate_hours(prof(gpus=0), cfg, ["sft"], "full") is None
