"""Switches of the training engine that are not user settings: no params.yaml key, the defaults are what the
train stage runs. The GPU benchmark passes other values to measure a path before and after, through the same
calls the train stage makes (`stage.build_model`, `speed.apply`), instead of writing module globals.

    from tunepath.train.options import EngineOptions
    options = EngineOptions(offload_prefetch=False, compile_cache=Path(".tunepath/compile-cache"))
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from tunepath.train.loss import CHUNK_BYTES


@dataclass(frozen=True)
class EngineOptions:
    upcast_float_params: bool = False  # hf QLoRA: peft.prepare_model_for_kbit_training's fp32 embeddings, head and norms
    loss_chunk_bytes: int = CHUNK_BYTES  # the chunked loss's fp32 logits per chunk
    # train.checkpoint_offload: copy the next layer's input back during this layer's backward. Off by default: its CUDA
    # side (side stream, events) has not run on a GPU yet, and offload on demand is the path measured on the H200.
    # The benchmark turns it on with `+offload_prefetch=1` to measure it; then it can become the default.
    offload_prefetch: bool = False
    compile_cache: Path | None = None  # folder for torch.compile's caches across runs (None: torch's own default)
