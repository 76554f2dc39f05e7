"""The train stage's speed paths, checked on CPU against transformers' own computation on a tiny Qwen2:
the chunked LM-head loss (value and gradients), the varlen attention (logits), and micro-batching."""

from __future__ import annotations

import pytest
import torch

from tunepath.collate import PadCollator


def _model(tie: bool = True, seed: int = 0):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    config = Qwen2Config(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=tie, use_cache=False)
    return Qwen2ForCausalLM(config).eval()


def _packed_batch():
    """Two packed rows of several samples (position ids restart per sample), prompt tokens masked, right padding."""
    g = torch.Generator().manual_seed(1)
    rows = []
    for lengths in ((7, 12, 5), (20, 9)):
        ids, labels, pos = [], [], []
        for n in lengths:
            x = torch.randint(3, 300, (n,), generator=g).tolist()
            ids += x
            labels += [-100] * 3 + x[3:]
            pos += list(range(n))
        rows.append({"input_ids": ids, "labels": labels, "position_ids": pos})
    return PadCollator(0)(rows)


def _lora(model, train_embeddings: bool = False, nonzero_b: bool = False):
    from peft import LoraConfig, get_peft_model

    extra = {"modules_to_save": ["embed_tokens", "lm_head"]} if train_embeddings else {}
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM", **extra))
    if nonzero_b:  # LoRA B starts at zero: give the adapters weights so their gradients are not trivially equal
        with torch.no_grad():
            for n, p in model.named_parameters():
                if "lora_B" in n:
                    p.normal_(0, 0.02, generator=torch.Generator().manual_seed(len(n)))
    return model


def _loss_and_grads(model, batch, **kwargs):
    model.zero_grad(set_to_none=True)
    loss = model(**batch, **kwargs).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("setup", ["full", "lora", "lora+embeddings"])
def test_chunked_loss_matches_transformers_loss_and_gradients(setup):
    from tunepath.train.loss import use_chunked_loss

    batch = _packed_batch()
    results = []
    for chunked in (False, True):
        model = _model(tie=setup != "lora+embeddings")
        if setup != "full":
            model = _lora(model, train_embeddings=setup == "lora+embeddings", nonzero_b=True)
        if chunked:
            assert use_chunked_loss(model, chunk=7)  # several chunks, a ragged last one
        results.append(_loss_and_grads(model, batch, num_items_in_batch=torch.tensor(40)))
    (ref_loss, ref_grads), (loss, grads) = results
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
    assert grads.keys() == ref_grads.keys() and grads
    if setup == "lora+embeddings":
        assert any("lm_head" in n for n in grads)
    for name in ref_grads:
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-4, atol=1e-6, msg=name)


def test_chunked_loss_without_num_items_is_the_mean_over_labelled_tokens():
    from tunepath.train.loss import use_chunked_loss

    batch = _packed_batch()
    ref = _model()(**batch).loss
    model = _model()
    use_chunked_loss(model, chunk=16)
    torch.testing.assert_close(model(**batch).loss, ref, rtol=1e-5, atol=1e-6)


def test_chunked_loss_leaves_calls_without_labels_alone():
    from tunepath.train.loss import restore, use_chunked_loss

    batch = _packed_batch()
    model = _model()
    ref = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits
    use_chunked_loss(model)
    out = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"])
    torch.testing.assert_close(out.logits, ref)
    assert model(**batch).logits is None  # with labels: no logits kept
    restore(model)
    assert model(**batch).logits is not None


def test_chunked_loss_refuses_models_that_scale_their_logits():
    from tunepath.train.loss import use_chunked_loss, why_not

    model = _model()
    model.config.final_logit_softcapping = 30.0
    assert "final_logit_softcapping" in why_not(model)
    assert use_chunked_loss(model) is False


def test_varlen_attention_matches_the_packed_sdpa_mask():
    from tunepath.train.attention import segments, use_default_attention, use_varlen_attention

    batch = _packed_batch()
    batch.pop("labels")
    model = _lora(_model())
    with torch.no_grad():
        ref = model(**batch).logits
        use_varlen_attention(model)
        out = model(**batch).logits
        use_default_attention(model)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
    cu, longest = segments(batch["position_ids"], *batch["position_ids"].shape)
    width = batch["input_ids"].shape[1]
    # row 1: samples 7, 12, 5, then 5 padding positions (their own segment); row 2: 20, 9
    assert cu.tolist() == [0, 7, 19, 24, width, width + 20, 2 * width]
    assert longest == 20


def test_in_graph_attention_takes_the_boundaries_from_one_pre_hook_per_forward():
    """attention_in_graph: the decoder's pre-hook hands every layer the same cu_seqlens `segments` computes, with
    the row width as the longest sample (no read back to the host); off CUDA the call falls back, same logits."""
    from tunepath.train import attention

    batch = _packed_batch()
    batch.pop("labels")
    model = _lora(_model())
    with torch.no_grad():
        ref = model(**batch).logits
        attention.use_varlen_attention(model, in_graph=True)
        seen = []
        decoder = model.get_base_model().get_decoder()
        decoder.layers[0].self_attn.register_forward_pre_hook(lambda m, a, kw: seen.append(kw), with_kwargs=True)
        out = model(**batch).logits
        attention.use_default_attention(model)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
    width = batch["input_ids"].shape[1]
    cu, _ = attention.segments(batch["position_ids"], *batch["position_ids"].shape)
    assert seen[0]["cu_seq_lens_q"].tolist() == cu.tolist() and seen[0]["max_length_q"] == width
    # a call with a mask (generation, padded batches) gets no boundaries: transformers' own path
    assert attention._boundaries(decoder, (), {"position_ids": batch["position_ids"], "attention_mask": torch.ones(2, width)}) is None


@pytest.mark.gpu
def test_in_graph_attention_compiles_each_layer_to_one_graph_with_the_same_gradients(monkeypatch):
    """On CUDA: the compiled layers with the attention inside their graph (no graph break) give the loss and
    gradients of the compiled layers around the eager attention call."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    from torch._inductor import config as inductor_config

    monkeypatch.setattr(inductor_config, "compile_threads", 1)  # in this process: no worker pool outlives the test
    from torch._dynamo.utils import counters

    from tunepath.train import TrainConfig, speed
    from tunepath.train.options import EngineOptions

    batch = {k: v.cuda() for k, v in _packed_batch().items()}
    results, breaks = [], []
    for in_graph in (False, True):
        torch._dynamo.reset()
        counters.clear()
        model = _lora(_model(), nonzero_b=True).cuda().to(torch.bfloat16)
        applied = speed.apply(model, TrainConfig(compile=True, attention="varlen"), "hf", EngineOptions(attention_in_graph=in_graph))
        assert applied["attention"] == ("varlen in graph" if in_graph else "varlen")
        results.append([_loss_and_grads(model, batch) for _ in range(2)][-1])
        breaks.append(sum(counters["graph_break"].values()))
    (ref_loss, ref_grads), (loss, grads) = results
    torch.testing.assert_close(loss.float(), ref_loss.float(), rtol=2e-2, atol=2e-2)
    for name in ref_grads:
        torch.testing.assert_close(grads[name].float(), ref_grads[name].float(), rtol=5e-2, atol=5e-3, msg=name)
    assert breaks[0] > 0 and breaks[1] == 0, breaks


@pytest.mark.slow
def test_compiled_layers_give_the_eager_loss_and_gradients():
    """train.compile: every decoder layer through torch.compile (inductor; on CPU it needs a C compiler)."""
    from tunepath.train import TrainConfig, speed

    batch = _packed_batch()
    results = []
    for compiled in (False, True):
        model = _lora(_model(), nonzero_b=True)
        applied = speed.apply(model, TrainConfig(compile=compiled), "hf")
        assert applied["compiled_layers"] == (2 if compiled else 0)
        results.append([_loss_and_grads(model, batch) for _ in range(2)][-1])  # second call: no recompilation surprises
    (ref_loss, ref_grads), (loss, grads) = results
    torch.testing.assert_close(loss, ref_loss, rtol=1e-4, atol=1e-5)
    for name in ref_grads:
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-3, atol=1e-5, msg=name)


@pytest.mark.slow
def test_a_compiled_training_run_follows_the_eager_loss_curve():
    """Ten AdamW steps on the same batches, eager and compiled (fp32, CPU): the loss curves agree."""
    from tunepath.train import TrainConfig, speed

    curves = []
    for compiled in (False, True):
        model = _lora(_model())
        speed.apply(model, TrainConfig(compile=compiled), "hf")
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-3)
        batch, curve = _packed_batch(), []
        for _ in range(10):
            loss = model(**batch).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            curve.append(loss.item())
        curves.append(curve)
    eager, compiled = curves
    assert eager[-1] < eager[0] - 0.05, eager  # it learned something
    assert compiled == pytest.approx(eager, rel=1e-4), (eager, compiled)


def test_compile_auto_waits_for_a_gpu_and_a_long_run():
    from tunepath.train import TrainConfig, speed

    assert not speed.long_enough(TrainConfig(max_steps=60))
    assert speed.long_enough(TrainConfig(max_steps=200)) and speed.long_enough(TrainConfig(max_steps=-1))
    applied = speed.apply(_lora(_model()), TrainConfig(max_steps=500), "hf")
    if not torch.cuda.is_available():
        assert applied == {"attention": "sdpa", "chunked_loss": True, "compiled_layers": 0}
    assert speed.apply(_model(), TrainConfig(), "unsloth")["chunked_loss"] is False  # unsloth keeps its own kernels


def test_speed_settings_another_backend_ignores_are_warned_about(caplog):
    import logging

    from tunepath.train import TrainConfig, speed

    with caplog.at_level(logging.WARNING, logger="tunepath.train.speed"):
        speed.apply(_model(), TrainConfig(compile=True, attention="varlen"), "unsloth")
    assert "train.attention and train.compile ignored: backend unsloth" in caplog.text
