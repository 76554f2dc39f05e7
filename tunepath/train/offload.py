"""Gradient checkpointing whose saved layer inputs wait in CPU memory (train.checkpoint_offload).

    offload.enable(model)                  # after gradient checkpointing is on: every decoder layer's input goes to the host
    offload.enable(model, prefetch=False)  # bring each input back only when its layer's backward needs it

Checkpointing keeps one tensor per decoder layer on the GPU, its input (tokens x hidden, bf16), and recomputes
the rest in backward. Offloading moves that input to pinned host memory on a side stream while the next layer
runs: the GPU then holds one layer's activations at a time, whatever the depth. unsloth's "unsloth"
checkpointing does the same. Each layer's input must be its first positional argument, as transformers'
GradientCheckpointingLayer passes it.

Prefetch: backward runs the layers last to first, so when layer i's backward starts, the host-to-device copy
of layer i-1's input starts on the side stream, and it overlaps layer i's recompute and backward instead of
stalling layer i-1's (copied on demand, that stall cost 16% of the step at 7B on an H200). The compute stream
waits on the copy's event before it reads the tensor. At most MAX_PREFETCHED inputs are fetched ahead, so the
GPU holds the input in use plus that one: the memory model (tunepath/route/memory.py) counts both.

`trace` (a list passed to `enable`) receives ("fetch", layer, how) when a layer's backward takes its input
(how: "prefetched" or "on demand") and ("prefetch", layer, None) when a copy ahead starts: on CPU, where
nothing is copied, it shows the order the GPU path follows.
"""

from __future__ import annotations

import functools
import logging
import weakref

log = logging.getLogger(__name__)

MAX_PREFETCHED = 1  # inputs copied back ahead of their layer's backward; more would only cost memory

_streams: dict = {}


def _copy_stream(device):
    import torch

    if device not in _streams:
        _streams[device] = torch.cuda.Stream(device)
    return _streams[device]


class Saved:
    """One checkpointed layer's input between its forward and its backward."""

    def __init__(self, layer: int, host, device, copied, prev: "Saved | None") -> None:
        self.layer, self.host, self.device, self.copied = layer, host, device, copied
        # weak: a forward whose backward never runs (its graph dropped) must not keep the chain alive
        self.prev = weakref.ref(prev) if prev is not None else None
        self.ahead = None  # the input back on the device, fetched before this layer's backward asked for it
        self.fetched = None  # event: that copy has landed
        self.done = False


class Offload:
    """The offloaded inputs of one model, in forward order, so a layer's backward knows which one comes next."""

    def __init__(self, prefetch: bool = True, trace: list | None = None) -> None:
        self.prefetch, self.trace = prefetch, trace
        self.last: Saved | None = None
        self.in_flight = 0  # inputs fetched ahead and not yet taken

    def save(self, layer: int, hidden) -> Saved:
        import torch

        # the previous layer of the same forward pass; a new pass (layer 0) or a pass of another call starts a chain
        prev = self.last if self.last is not None and self.last.layer == layer - 1 and not self.last.done else None
        if hidden.is_cuda:
            stream = _copy_stream(hidden.device)
            stream.wait_stream(torch.cuda.current_stream(hidden.device))
            with torch.cuda.stream(stream):
                host = hidden.detach().to("cpu", non_blocking=True)  # pinned by the caching host allocator
            hidden.record_stream(stream)  # its GPU memory is not reused before the copy has read it
            copied = stream.record_event()
        else:  # on CPU there is nowhere to offload to: the same recompute, so the two devices share one code path
            host, copied = hidden.detach(), None
        saved = Saved(layer, host, hidden.device, copied, prev)
        self.last = saved
        return saved

    def take(self, saved: Saved):
        """`saved`'s input on its device, for its layer's backward; then the copy of the layer before it starts."""
        import torch

        if saved.ahead is not None:
            if saved.fetched is not None:
                current = torch.cuda.current_stream(saved.device)
                current.wait_event(saved.fetched)
                saved.ahead.record_stream(current)  # allocated on the side stream, read and freed on this one
            hidden, how = saved.ahead, "prefetched"
            saved.ahead = None
            self.in_flight -= 1
        else:
            if saved.copied is not None:
                saved.copied.synchronize()
            hidden, how = saved.host.to(saved.device, non_blocking=True), "on demand"
        saved.done, saved.host = True, None
        self._note("fetch", saved.layer, how)
        if self.prefetch:
            prev = saved.prev() if saved.prev is not None else None
            if prev is not None and not prev.done and prev.ahead is None and self.in_flight < MAX_PREFETCHED:
                self._fetch_ahead(prev)
        return hidden.detach().requires_grad_(True)

    def _fetch_ahead(self, saved: Saved) -> None:
        import torch

        if saved.copied is not None:
            stream = _copy_stream(saved.device)
            stream.wait_event(saved.copied)
            with torch.cuda.stream(stream):
                saved.ahead = saved.host.to(saved.device, non_blocking=True)
            saved.fetched = stream.record_event()
        else:
            saved.ahead = saved.host
        self.in_flight += 1
        self._note("prefetch", saved.layer, None)

    def _note(self, what: str, layer: int, how: str | None) -> None:
        if self.trace is not None:
            self.trace.append((what, layer, how))


@functools.cache
def _function():
    import torch

    class OffloadedCheckpoint(torch.autograd.Function):
        """Runs `run(hidden, *rest)` without keeping activations; backward brings `hidden` back and reruns it."""

        @staticmethod
        def forward(ctx, offload, layer, run, hidden, *rest):
            ctx.offload, ctx.run, ctx.rest = offload, run, rest
            ctx.rng = torch.cuda.get_rng_state(hidden.device) if hidden.is_cuda else torch.get_rng_state()  # same dropout masks
            ctx.saved = offload.save(layer, hidden)
            with torch.no_grad():
                return run(hidden, *rest)

        @staticmethod
        def backward(ctx, *grads):
            hidden = ctx.offload.take(ctx.saved)
            device = hidden.device
            devices = [device] if device.type == "cuda" else []
            with torch.random.fork_rng(devices=devices), torch.enable_grad():
                if devices:
                    torch.cuda.set_rng_state(ctx.rng, device)
                else:
                    torch.set_rng_state(ctx.rng)
                out = ctx.run(hidden, *ctx.rest)
            outs = out if isinstance(out, tuple) else (out,)
            pairs = [(o, g) for o, g in zip(outs, grads) if torch.is_tensor(o) and o.requires_grad and g is not None]
            torch.autograd.backward([o for o, _ in pairs], [g for _, g in pairs])
            return (None, None, None, hidden.grad, *([None] * len(ctx.rest)))

    return OffloadedCheckpoint


def checkpoint(offload: Offload, layer: int, run, hidden, *rest):
    """A layer's `_gradient_checkpointing_func` (bound to its Offload and index): `run` is the layer with its
    keyword arguments bound."""
    import torch

    if not (torch.is_tensor(hidden) and torch.is_grad_enabled()):
        return run(hidden, *rest)
    return _function().apply(offload, layer, run, hidden, *rest)


def enable(model, prefetch: bool = True, trace: list | None = None) -> int:
    """Route every checkpointed decoder layer of `model` through `checkpoint`; returns how many layers."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    layers = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer) and m.gradient_checkpointing]
    offload = Offload(prefetch, trace)
    for index, layer in enumerate(layers):
        layer._gradient_checkpointing_func = functools.partial(checkpoint, offload, index)
    log.info("checkpoint offload: the inputs of %d checkpointed layers wait in CPU memory (%s)", len(layers),
             "each fetched back while the layer after it runs backward" if prefetch else "each fetched back when its backward starts")
    return len(layers)
