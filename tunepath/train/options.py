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
    # the varlen attention call inside each compiled layer's graph (boundaries computed once per forward) instead of
    # an eager call between two compiled halves: 1.14x the steady tokens/s at 1.5B LoRA on an H200, same memory.
    # `+attention_in_graph=0` in the benchmark measures the old way.
    attention_in_graph: bool = True
    # fp32 matmuls on TF32 tensor cores (CUDA, hf backend). peft keeps LoRA adapters in fp32 and casts their input
    # to fp32 (no autocast under a bf16 base); the H200 profile of 7B QLoRA lean showed FP32 (FFMA) GEMMs taking
    # ~10% of its step. At 1.5B LoRA with compiled layers it changed nothing (their adapter matmuls were on tensor
    # cores already). Off until measured where those kernels showed (`+tf32=1` in the benchmark).
    tf32: bool = False
    compile_cache: Path | None = None  # folder for torch.compile's caches across runs (None: torch's own default)
