"""The memory estimate: the formula's terms, sharding, checkpointing, the loss, and the shape derivation."""

from __future__ import annotations

import pytest

from tunepath.route import RouteConfig, parse_profile
from tunepath.route.memory import CHUNK_BYTES, GB, NF4_BYTES, Knobs, breakdown, estimate_memory, loss_bytes, model_shape
from tunepath.route.speed import estimate_hours

LLAMA7 = dict(params_b=6.74, hidden_size=4096, num_layers=32, intermediate_size=11008, vocab_size=32000)


def prof(gpus=1, mem=80.0, model=LLAMA7, **data):
    counts = {"labeled_examples": 1000, "unlabeled_tokens": 0, "preference_pairs": 0, **data}
    return parse_profile({"data": counts, "resources": {"gpus": gpus, "gpu_memory_gb": mem if gpus else None},
                          "model": model})


def knobs(method="lora", **kw):
    return Knobs(**{"method": method, "gradient_checkpointing": False, "rows": 1, "max_length": 2048, **kw})


def est(p, cfg=None, **kw):
    return estimate_memory(p, cfg or RouteConfig(), {m: knobs(m, **kw) for m in ("full", "lora", "qlora")})


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
    embed = 2 * 32000 * 4096  # untied: embedding and LM head
    lora_weights = 4 * m["inputs"]["lora_params"]
    # the embeddings and head stay bf16 (tunepath.train.quantize does not upcast them as peft's preparation would)
    expected = ((6.74e9 - embed) * NF4_BYTES + embed * 2 + lora_weights) / GB
    assert m["breakdown_gb"]["qlora"]["weights"] == pytest.approx(expected, abs=1e-3)
    on_unsloth = breakdown(prof(), RouteConfig(), knobs("qlora", backend="unsloth"))
    assert on_unsloth["weights"] == pytest.approx(expected, abs=1e-3)  # unsloth keeps them bf16 too
    upcast = breakdown(prof(), RouteConfig(), knobs("qlora", fp32_embeddings=True))
    assert upcast["weights"] == pytest.approx(expected + embed * 2 / GB, abs=1e-3)


def test_lora_params_follow_rank():
    r8, r64 = est(prof(), lora_rank=8), est(prof(), lora_rank=64)
    assert r64["inputs"]["lora_params"] == 8 * r8["inputs"]["lora_params"]
    assert r8["inputs"]["lora_params"] == 8 * 32 * (11 * 4096 + 3 * 11008)


def test_activations_scale_with_tokens_and_checkpointing_cuts_them():
    act = lambda **kw: breakdown(prof(), RouteConfig(), knobs(**kw))["activations"]  # noqa: E731
    loss = lambda rows: loss_bytes(model_shape(prof()), knobs(rows=rows)) / GB  # noqa: E731
    # the layers' share grows with the tokens of a micro-batch; the loss's chunk is bounded
    assert act(rows=4) - loss(4) == pytest.approx(4 * (act(rows=1) - loss(1)), rel=1e-3)
    assert act(rows=4, gradient_checkpointing=True) < act(rows=4) / 5
    assert act(rows=4, compile=False) > act(rows=4) * 1.3  # eager layers keep more than compiled ones


def test_offload_counts_the_prefetched_layer_input():
    act = lambda **kw: breakdown(prof(), RouteConfig(), knobs("qlora", gradient_checkpointing=True, offload=True, **kw))["activations"]  # noqa: E731
    tokens, hidden = 2048, 4096
    # train.checkpoint_offload's prefetch holds one more bf16 layer input (tunepath.train.offload.MAX_PREFETCHED)
    assert act(prefetch=True) - act() == pytest.approx(2 * hidden * tokens / GB, abs=2e-3)  # off by default (not yet run on a GPU)
    unsloth = lambda **kw: breakdown(prof(), RouteConfig(), knobs("qlora", backend="unsloth", gradient_checkpointing=True, **kw))  # noqa: E731
    assert unsloth() == unsloth(prefetch=False)  # unsloth's own offload has no prefetch of ours


def test_chunked_loss_is_bounded_and_the_plain_loss_is_not():
    shape = model_shape(prof(model=dict(LLAMA7, vocab_size=151936)))
    chunked = [loss_bytes(shape, knobs(rows=r)) for r in (1, 4, 16)]
    assert chunked[1] == chunked[2]  # past two chunks, the peak stops growing
    assert chunked[1] == pytest.approx(4 * CHUNK_BYTES, rel=0.01)  # four chunks' worth of fp32 logits at the peak
    plain = loss_bytes(shape, knobs(rows=4, chunked_loss=False))
    assert plain == 4 * 2048 * 151936 * 12


def test_activation_factor_overrides_the_derived_one():
    a10 = breakdown(prof(), RouteConfig(activation_factor=10), knobs())["activations"]
    a20 = breakdown(prof(), RouteConfig(activation_factor=20), knobs())["activations"]
    assert a20 - a10 == pytest.approx(2048 * 4096 * 32 * 10 / GB, abs=2e-3)


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


def test_hours_follow_tokens_gpu_count_and_flops_per_token():
    p1 = prof(gpus=1, labeled_examples=1000, labeled_tokens=1_000_000)
    p2 = prof(gpus=2, labeled_examples=1000, labeled_tokens=1_000_000)
    cfg = RouteConfig(gpu_tflops=100)
    lora = estimate_hours(p1, cfg, ["sft"], knobs("lora", rows=4))
    assert estimate_hours(p2, cfg, ["sft"], knobs("lora", rows=4)) == pytest.approx(lora / 2)
    assert estimate_hours(p1, RouteConfig(gpu_tflops=200), ["sft"], knobs("lora", rows=4)) == pytest.approx(lora / 2)
    # full fine-tuning without compile: the LoRA path's utilisation over 6 FLOPs per parameter and token, not 4
    eager = estimate_hours(p1, cfg, ["sft"], knobs("lora", rows=4, compile=False))
    assert estimate_hours(p1, cfg, ["sft"], knobs("full", rows=4, compile=False)) == pytest.approx(eager * 6 / 4)
    # compiled, its own measured path: its matmuls keep the card busier than LoRA's (1.21x at 1.5B), so a token
    # costs less than 6/4 of LoRA's time, and more than LoRA's
    assert lora < estimate_hours(p1, cfg, ["sft"], knobs("full", rows=4)) < lora * 6 / 4
    assert estimate_hours(p1, cfg, ["sft"], knobs("lora", rows=4, gradient_checkpointing=True)) > lora
    assert estimate_hours(prof(gpus=0), cfg, ["sft"], knobs("full")) is None
