"""train.checkpoint_offload: the offloaded checkpoint gives the same loss and gradients as transformers' own
checkpointing and as no checkpointing (on CPU the same recompute runs, only the copies to and from host memory
are skipped), dropout included, with the prefetch on and off; and the prefetch fetches the inputs in the
order backward needs them, one layer ahead, never more than one input ahead."""

from __future__ import annotations

import copy

import pytest

torch = pytest.importorskip("torch")

LAYERS = 3


def _tiny_qwen2():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    config = Qwen2Config(hidden_size=64, intermediate_size=128, num_hidden_layers=LAYERS, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=300, use_cache=False)
    return Qwen2ForCausalLM(config)


def _lora_model(base, checkpointing: bool, offloaded: bool, prefetch: bool = True, trace: list | None = None,
                device: str = "cpu"):
    from peft import LoraConfig, get_peft_model

    from tunepath.train import offload

    model = copy.deepcopy(base).to(device)
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    torch.manual_seed(5)
    model = get_peft_model(model, LoraConfig(r=4, target_modules="all-linear", lora_dropout=0.1, init_lora_weights=False))
    model.enable_input_require_grads()
    layers = offload.enable(model, prefetch=prefetch, trace=trace) if offloaded else 0
    model.train()
    return model, layers


def _batch(seed: int = 1):
    return torch.randint(0, 300, (2, 16), generator=torch.Generator().manual_seed(seed))


def _loss_and_grads(base, checkpointing: bool = True, offloaded: bool = False, prefetch: bool = True,
                    device: str = "cpu", trace: list | None = None):
    model, layers = _lora_model(base, checkpointing, offloaded, prefetch, trace, device)
    ids = _batch().to(device)
    torch.manual_seed(2)
    if device == "cuda":
        torch.cuda.manual_seed(2)
    out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    return layers, out.loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("prefetch", [True, False], ids=["prefetch", "on-demand"])
def test_offloaded_checkpointing_matches_plain_checkpointing_and_none(prefetch):
    base = _tiny_qwen2()
    _, plain_loss, plain = _loss_and_grads(base)
    _, eager_loss, eager = _loss_and_grads(base, checkpointing=False)
    layers, loss, grads = _loss_and_grads(base, offloaded=True, prefetch=prefetch)
    assert layers == LAYERS
    assert loss == pytest.approx(plain_loss, abs=1e-6) and loss == pytest.approx(eager_loss, abs=1e-6)
    assert grads.keys() == plain.keys() == eager.keys() and len(grads) == 42  # every LoRA A and B of the 7 linears in 3 layers
    for name, g in grads.items():
        assert torch.allclose(g, plain[name], atol=1e-6), name
        assert torch.allclose(g, eager[name], atol=1e-6), name
        assert g.abs().sum() > 0, f"{name} got no gradient"


def _traced_steps(prefetch: bool, micro_batches: int = 1) -> list:
    """The trace of `micro_batches` forward+backward passes, with each decoder layer's runs (forward in the
    forward pass, the recompute in backward) recorded as ("run", layer, None)."""
    trace: list = []
    model, _ = _lora_model(_tiny_qwen2(), True, True, prefetch, trace)
    for i, layer in enumerate(model.get_base_model().model.layers):
        layer.register_forward_pre_hook(lambda *_a, i=i: trace.append(("run", i, None)))
    for step in range(micro_batches):
        ids = _batch(step)
        model(input_ids=ids, labels=ids).loss.backward()
    return trace


FORWARD = [("run", 0, None), ("run", 1, None), ("run", 2, None)]


def test_prefetch_starts_the_previous_layers_copy_before_this_layers_recompute():
    backward = [("fetch", 2, "on demand"), ("prefetch", 1, None), ("run", 2, None),
                ("fetch", 1, "prefetched"), ("prefetch", 0, None), ("run", 1, None),
                ("fetch", 0, "prefetched"), ("run", 0, None)]
    assert _traced_steps(prefetch=True) == FORWARD + backward
    # two micro-batches (gradient accumulation): each pass is its own chain; the second never waits on the first
    assert _traced_steps(prefetch=True, micro_batches=2) == (FORWARD + backward) * 2


def test_without_prefetch_every_input_comes_back_on_demand():
    backward = [("fetch", 2, "on demand"), ("run", 2, None), ("fetch", 1, "on demand"), ("run", 1, None),
                ("fetch", 0, "on demand"), ("run", 0, None)]
    assert _traced_steps(prefetch=False) == FORWARD + backward


def test_at_most_one_input_is_fetched_ahead_and_an_abandoned_pass_is_not_fetched():
    from tunepath.train import offload

    trace: list = []
    model, _ = _lora_model(_tiny_qwen2(), True, True, True, trace)
    ids = _batch()
    abandoned = model(input_ids=ids, labels=ids).loss  # a forward whose backward never runs
    del abandoned
    for step in range(2):
        model(input_ids=_batch(step), labels=_batch(step)).loss.backward()
    ahead = peak = 0
    for what, _layer, how in trace:
        ahead += (what == "prefetch") - (what == "fetch" and how == "prefetched")
        peak = max(peak, ahead)
    assert peak == offload.MAX_PREFETCHED == 1 and ahead == 0  # every input fetched ahead was used
    fetched = [layer for what, layer, _ in trace if what == "fetch"]
    assert fetched == [2, 1, 0, 2, 1, 0]  # the abandoned pass's inputs were never brought back


def test_enable_touches_only_checkpointed_layers_and_eval_runs_plain():
    from tunepath.train import offload

    model = _tiny_qwen2()
    assert offload.enable(model) == 0  # checkpointing off: nothing to offload
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    assert offload.enable(model) == LAYERS
    model.eval()
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([[1, 2, 3]])).logits
    assert logits.shape == (1, 3, 300)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("prefetch", [True, False], ids=["prefetch", "on-demand"])
def test_on_cuda_the_copies_through_host_memory_change_no_gradient(prefetch):
    """The real streams: inputs copied to pinned host memory and back (ahead, on the side stream, or on demand)."""
    base = _tiny_qwen2()
    _, plain_loss, plain = _loss_and_grads(base, device="cuda")
    trace: list = []
    _, loss, grads = _loss_and_grads(base, offloaded=True, prefetch=prefetch, device="cuda", trace=trace)
    assert loss == pytest.approx(plain_loss, abs=1e-5)
    for name, g in grads.items():
        assert torch.allclose(g, plain[name], atol=1e-5), name
    ways = [how for what, _, how in trace if what == "fetch"]
    assert ways == (["on demand", "prefetched", "prefetched"] if prefetch else ["on demand"] * LAYERS)
