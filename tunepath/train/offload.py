"""Gradient checkpointing whose saved layer inputs wait in CPU memory (train.checkpoint_offload).

    offload.enable(model)     # after gradient checkpointing is on: every decoder layer's input goes to the host

Checkpointing keeps one tensor per decoder layer on the GPU, its input (tokens x hidden, bf16), and recomputes
the rest in backward. Offloading moves that input to pinned host memory on a side stream while the next layer
runs, and brings it back just before the layer's backward: the GPU then holds one layer's activations at a time,
whatever the depth. unsloth's "unsloth" checkpointing does the same. Each layer's input must be its first
positional argument, as transformers' GradientCheckpointingLayer passes it.
"""

from __future__ import annotations

import functools
import logging

log = logging.getLogger(__name__)

_streams: dict = {}


def _copy_stream(device):
    import torch

    if device not in _streams:
        _streams[device] = torch.cuda.Stream(device)
    return _streams[device]


@functools.cache
def _function():
    import torch

    class OffloadedCheckpoint(torch.autograd.Function):
        """Runs `run(hidden, *rest)` without keeping activations; backward brings `hidden` back and reruns it."""

        @staticmethod
        def forward(ctx, run, hidden, *rest):
            ctx.run, ctx.rest, ctx.device = run, rest, hidden.device
            cuda = hidden.is_cuda
            ctx.rng = torch.cuda.get_rng_state(hidden.device) if cuda else torch.get_rng_state()  # same dropout masks
            if cuda:
                stream = _copy_stream(hidden.device)
                stream.wait_stream(torch.cuda.current_stream(hidden.device))
                with torch.cuda.stream(stream):
                    ctx.host = hidden.detach().to("cpu", non_blocking=True)  # pinned by the caching host allocator
                hidden.record_stream(stream)  # its GPU memory is not reused before the copy has read it
                ctx.copied = stream.record_event()
            else:  # on CPU there is nowhere to offload to: the same recompute, so the two devices share one code path
                ctx.host, ctx.copied = hidden.detach(), None
            with torch.no_grad():
                return run(hidden, *rest)

        @staticmethod
        def backward(ctx, *grads):
            if ctx.copied is not None:
                ctx.copied.synchronize()
            hidden = ctx.host.to(ctx.device, non_blocking=True).detach().requires_grad_(True)
            devices = [ctx.device] if ctx.device.type == "cuda" else []
            with torch.random.fork_rng(devices=devices), torch.enable_grad():
                if devices:
                    torch.cuda.set_rng_state(ctx.rng, ctx.device)
                else:
                    torch.set_rng_state(ctx.rng)
                out = ctx.run(hidden, *ctx.rest)
            outs = out if isinstance(out, tuple) else (out,)
            pairs = [(o, g) for o, g in zip(outs, grads) if torch.is_tensor(o) and o.requires_grad and g is not None]
            torch.autograd.backward([o for o, _ in pairs], [g for _, g in pairs])
            return (None, hidden.grad, *([None] * len(ctx.rest)))

    return OffloadedCheckpoint


def checkpoint(run, hidden, *rest):
    """The `_gradient_checkpointing_func` of a layer: `run` is the layer with its keyword arguments bound."""
    import torch

    if not (torch.is_tensor(hidden) and torch.is_grad_enabled()):
        return run(hidden, *rest)
    return _function().apply(run, hidden, *rest)


def enable(model) -> int:
    """Route every checkpointed decoder layer of `model` through `checkpoint`; returns how many layers."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    layers = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer) and m.gradient_checkpointing]
    for layer in layers:
        layer._gradient_checkpointing_func = checkpoint
    log.info("checkpoint offload: the inputs of %d checkpointed layers wait in CPU memory", len(layers))
    return len(layers)
