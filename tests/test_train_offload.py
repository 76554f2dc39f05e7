"""train.checkpoint_offload: the offloaded checkpoint gives the same loss and gradients as transformers' own
checkpointing (on CPU the same recompute runs, only the copy to host memory is skipped), dropout included."""

from __future__ import annotations

import copy

import pytest

torch = pytest.importorskip("torch")


def _tiny_qwen2():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    config = Qwen2Config(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=300, use_cache=False)
    return Qwen2ForCausalLM(config)


def _loss_and_grads(base, offloaded: bool):
    from peft import LoraConfig, get_peft_model

    from tunepath.train import offload

    model = copy.deepcopy(base)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    torch.manual_seed(5)
    model = get_peft_model(model, LoraConfig(r=4, target_modules="all-linear", lora_dropout=0.1, init_lora_weights=False))
    model.enable_input_require_grads()
    layers = offload.enable(model) if offloaded else 0
    model.train()
    ids = torch.randint(0, 300, (2, 16), generator=torch.Generator().manual_seed(1))
    torch.manual_seed(2)
    out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    return layers, out.loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def test_offloaded_checkpointing_matches_plain_checkpointing():
    base = _tiny_qwen2()
    _, plain_loss, plain = _loss_and_grads(base, offloaded=False)
    layers, loss, grads = _loss_and_grads(base, offloaded=True)
    assert layers == 3
    assert loss == pytest.approx(plain_loss, abs=1e-6)
    assert grads.keys() == plain.keys() and len(grads) == 42  # every LoRA A and B of the 7 linears in 3 layers
    for name, g in grads.items():
        assert torch.allclose(g, plain[name], atol=1e-6), name
        assert g.abs().sum() > 0, f"{name} got no gradient"


def test_enable_touches_only_checkpointed_layers_and_eval_runs_plain():
    from tunepath.train import offload

    model = _tiny_qwen2()
    assert offload.enable(model) == 0  # checkpointing off: nothing to offload
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    assert offload.enable(model) == 3
    model.eval()
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([[1, 2, 3]])).logits
    assert logits.shape == (1, 3, 300)
