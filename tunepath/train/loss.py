"""The causal-LM loss without the full logits tensor: LM head and cross-entropy in chunks, on labelled tokens only.

    from tunepath.train.loss import use_chunked_loss
    use_chunked_loss(model)     # a transformers causal LM, or a PEFT model around one; returns False if it cannot

transformers computes the logits of every position ([tokens, vocab], then an fp32 copy for the loss and the
gradient of both): at a vocabulary of 151,936 and 8,192 tokens per micro-batch that is about 15 GB of
transient memory, mostly for prompt tokens whose labels are masked out. Here the forward pass of the causal
LM is replaced (on this model object only, while training with labels) by: the decoder's last hidden states,
the positions that have a label, and, in chunks of about 256 MiB of fp32 logits, LM head -> log-softmax ->
loss, with the gradients of the hidden states (and of the LM head when it trains) computed in the same pass
(no logits are kept for backward, none recomputed). The loss is the same as transformers' (`ForCausalLMLoss`:
labels shifted by one, summed and divided by `num_items_in_batch` under gradient accumulation, else by the
labelled-token count); tests/test_train_loss.py checks the loss and the gradients against it.

Calls without labels (evaluation, generation, DPO's log-probs) run the model's own forward. Models the
generic path cannot express (logit soft-capping or scaling, an LM head with a bias, no `get_decoder`) keep
their own forward: `use_chunked_loss` returns False and logs why.
"""

from __future__ import annotations

import functools
import logging
import types

log = logging.getLogger(__name__)

IGNORE_INDEX = -100
CHUNK_BYTES = 256 << 20  # fp32 logits per chunk: 7B QLoRA measured as fast as with 1 GiB, 1.5 GiB less at the peak


def chunk_rows(vocab: int, budget: int | None = None) -> int:
    return max(64, (CHUNK_BYTES if budget is None else budget) // (4 * vocab))


@functools.cache
def _linear_cross_entropy():
    """The autograd Function, built on first use (torch is imported only by the processes that train)."""
    import torch

    class LinearCrossEntropy(torch.autograd.Function):
        """sum over rows of -log softmax(hidden @ weight.T)[target], with both gradients computed in forward."""

        @staticmethod
        def forward(ctx, hidden, weight, targets, chunk):
            need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
            total = torch.zeros((), dtype=torch.float32, device=hidden.device)
            grad_h = torch.empty_like(hidden) if need_h else None
            grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
            for s in range(0, hidden.shape[0], chunk):
                h, t = hidden[s : s + chunk], targets[s : s + chunk]
                logits = (h @ weight.t()).float()
                lse = torch.logsumexp(logits, dim=-1)
                total += (lse - logits.gather(1, t[:, None]).squeeze(1)).sum()
                if need_h or need_w:
                    probs = (logits - lse[:, None]).exp_()  # softmax, in place of the logits
                    probs[torch.arange(t.shape[0], device=t.device), t] -= 1.0
                    g = probs.to(torch.promote_types(h.dtype, weight.dtype))
                    if need_h:
                        grad_h[s : s + chunk] = (g @ weight.to(g.dtype)).to(hidden.dtype)
                    if need_w:
                        grad_w += (g.t() @ h.to(g.dtype)).float()
            ctx.save_for_backward(*(x for x in (grad_h, grad_w) if x is not None))
            ctx.has = (need_h, need_w)
            ctx.weight_dtype = weight.dtype
            return total

        @staticmethod
        def backward(ctx, grad_out):
            saved = list(ctx.saved_tensors)
            need_h, need_w = ctx.has
            gh = gw = None
            if need_h:
                grad_h = saved.pop(0)
                gh = grad_h * grad_out.to(grad_h.dtype)
            if need_w:
                gw = (saved.pop(0) * grad_out).to(ctx.weight_dtype)
            return gh, gw, None, None

    return LinearCrossEntropy


def linear_cross_entropy(hidden, weight, targets, chunk: int):
    """Summed cross-entropy of `targets` under logits hidden @ weight.T, computed chunk by chunk (fp32 math)."""
    return _linear_cross_entropy().apply(hidden, weight, targets, chunk)


def causal_lm_loss(hidden, labels, head_weight, num_items_in_batch=None, chunk: int | None = None):
    """transformers' causal-LM loss from the last hidden states [B, L, D] and labels [B, L]."""
    import torch

    targets = labels[:, 1:]
    keep = targets != IGNORE_INDEX
    h = hidden[:, :-1][keep]
    t = targets[keep]
    total = linear_cross_entropy(h, head_weight, t, chunk or chunk_rows(head_weight.shape[0]))
    if num_items_in_batch is None:
        denom = keep.sum().clamp(min=1)
    else:
        denom = num_items_in_batch.to(total.device) if torch.is_tensor(num_items_in_batch) else num_items_in_batch
    return total / denom


def why_not(causal_lm) -> str | None:
    """None when the chunked loss can stand in for this model's loss, else the reason it cannot."""
    config = getattr(causal_lm, "config", None)
    head = causal_lm.get_output_embeddings() if hasattr(causal_lm, "get_output_embeddings") else None
    if head is None or not hasattr(causal_lm, "get_decoder"):
        return "the model has no separate decoder and LM head"
    if getattr(head, "bias", None) is not None:
        return "its LM head has a bias"
    weight = getattr(head, "weight", None)
    if weight is None or weight.dim() != 2 or weight.shape[0] != getattr(config, "vocab_size", weight.shape[0]):
        return "its LM head is not a plain [vocab, hidden] matrix (quantized or sharded)"
    for key in ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier_scale"):
        if getattr(config, key, None) not in (None, 1, 1.0):
            return f"its config scales the logits ({key})"
    return None


def use_chunked_loss(model, chunk: int | None = None, chunk_bytes: int | None = None) -> bool:
    """Give the causal LM inside `model` the chunked loss for calls with labels; False (and a log line) if it cannot.

    chunk: rows per chunk; else rows of about `chunk_bytes` fp32 logits (default CHUNK_BYTES)."""
    causal_lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    reason = why_not(causal_lm)
    if reason is not None:
        log.info("chunked loss not used: %s", reason)
        return False
    original = causal_lm.forward
    if chunk is None and chunk_bytes is not None:
        chunk = chunk_rows(causal_lm.get_output_embeddings().weight.shape[0], chunk_bytes)

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None, inputs_embeds=None,
                labels=None, use_cache=None, logits_to_keep=0, num_items_in_batch=None, **kwargs):
        if labels is None:
            return original(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                            past_key_values=past_key_values, inputs_embeds=inputs_embeds, use_cache=use_cache,
                            logits_to_keep=logits_to_keep, **kwargs)
        from transformers.modeling_outputs import CausalLMOutputWithPast

        out = self.get_decoder()(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                                 inputs_embeds=inputs_embeds, use_cache=False, **kwargs)
        head = self.get_output_embeddings()
        loss = causal_lm_loss(out.last_hidden_state, labels, head.weight, num_items_in_batch, chunk)
        return CausalLMOutputWithPast(loss=loss, logits=None)

    causal_lm.forward = types.MethodType(forward, causal_lm)
    causal_lm._tunepath_original_forward = original
    return True


def restore(model) -> None:
    causal_lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    original = causal_lm.__dict__.pop("_tunepath_original_forward", None)
    if original is not None:
        causal_lm.__dict__.pop("forward", None)
