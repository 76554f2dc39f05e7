"""The hf backend's speed paths, applied to the model the train stage builds (one call, after `build_model`).

    from tunepath.train import speed
    applied = speed.apply(model, cfg, backend)     # {"attention": "varlen", "chunked_loss": True, "compiled_layers": 0}
    rows, accum = speed.micro_batches(cfg.batch_size, cfg.grad_accum, row_tokens=2048, budget=cfg.micro_batch_tokens)

- attention (train.attention): packed rows through torch's varlen flash kernel (`attention.py`) on CUDA;
  transformers' default (SDPA with the packed-sample mask) elsewhere.
- chunked loss (train.chunked_loss): LM head and cross-entropy in chunks on labelled tokens only (`loss.py`).
- compiled layers (train.compile, auto: on CUDA for runs of 200 steps or more): each decoder layer through
  torch.compile ("regional compilation": one compiled graph reused by every layer). With varlen attention the
  attention call is inside each layer's graph (`attention.use_varlen_attention(in_graph=True)`: 1.14x at 1.5B
  on an H200, `EngineOptions.attention_in_graph`). Costs about 20 s of compiling in the first steps at the
  1.5B shape on an H200, and gives 1.5x the tokens/s there.
  With a cache folder (the train stage passes the project's `.tunepath/compile-cache`), a rerun of the same
  shapes compiles from torch's on-disk caches (`compile_cache.py`).
- micro-batches (train.micro_batch_tokens): a batch of `batch_size` rows is split into micro-batches of at most
  that many tokens and their gradients accumulated, so the optimizer sees the same batch whatever the memory.

The unsloth backend has its own kernels for all of these: `apply` leaves its model alone.
"""

from __future__ import annotations

import logging

from tunepath.train import TrainConfig
from tunepath.train.options import EngineOptions

log = logging.getLogger(__name__)


def apply(model, cfg: TrainConfig, backend: str, options: EngineOptions | None = None) -> dict:
    """Switch on the speed paths `cfg` asks for; returns what was applied (recorded in metrics.json)."""
    options = options or EngineOptions()
    if backend != "hf":
        ignored = [k for k, v in (("train.attention", cfg.attention == "varlen"), ("train.compile", cfg.compile is True)) if v]
        if ignored:
            log.warning("%s ignored: backend %s uses its own kernels", " and ".join(ignored), backend)
        return {"attention": f"{backend}'s own", "chunked_loss": False, "compiled_layers": 0}
    from tunepath.train import attention, loss

    applied = {"attention": "sdpa", "chunked_loss": False, "compiled_layers": 0}
    if options.tf32 and _on_cuda():
        import torch

        torch.backends.cuda.matmul.allow_tf32 = True  # the LoRA adapters' fp32 matmuls on tensor cores
        applied["tf32"] = True
    if cfg.attention == "varlen" or (cfg.attention == "auto" and attention.available()):
        if not attention.available():
            log.warning("train.attention varlen: no CUDA varlen kernel here; attention runs per sample (correct, slow)")
        attention.use_varlen_attention(model, in_graph=options.attention_in_graph)
        applied["attention"] = "varlen in graph" if options.attention_in_graph else "varlen"
    if cfg.chunked_loss:
        applied["chunked_loss"] = loss.use_chunked_loss(model, chunk_bytes=options.loss_chunk_bytes)
    if cfg.compile is True or (cfg.compile == "auto" and _on_cuda() and long_enough(cfg)):
        if options.compile_cache is not None:
            from tunepath.train import compile_cache

            applied["compile_cache"] = compile_cache.use(options.compile_cache, model)
        applied["compiled_layers"] = compile_layers(model)
    log.info("speed paths: attention %s, chunked loss %s, compiled layers %d",
             applied["attention"], applied["chunked_loss"], applied["compiled_layers"])
    return applied


COMPILE_MIN_STEPS = 200


def long_enough(cfg: TrainConfig) -> bool:
    """Compiling costs about 20 s up front and saves about a third of each step: worth it for runs of
    COMPILE_MIN_STEPS optimizer steps or more (or epoch-based runs, whose length is not known here)."""
    return cfg.max_steps == -1 or cfg.max_steps >= COMPILE_MIN_STEPS


def _on_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def compile_layers(model) -> int:
    """torch.compile each decoder layer (the module classes transformers never splits); returns how many."""
    import torch

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    names = set(getattr(base, "_no_split_modules", None) or [])
    layers = [m for m in base.modules() if type(m).__name__ in names]
    # every layer shares one graph; shapes change with the batch width, so allow a few variants before giving up
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    for layer in layers:
        layer.compile()
    return len(layers)


def micro_batches(batch_size: int, grad_accum: int, row_tokens: int, budget: int) -> tuple[int, int]:
    """(rows per micro-batch, micro-batches per optimizer step) for `batch_size` rows of up to `row_tokens` tokens.

    The rows per micro-batch divide `batch_size` exactly, so the optimizer step sees the same rows in the same
    order as without the split; budget 0 (or rows that fit) keeps one micro-batch per `batch_size`.
    """
    if budget <= 0 or row_tokens <= 0 or batch_size * row_tokens <= budget:
        return batch_size, grad_accum
    fit = max(1, budget // row_tokens)
    rows = max(d for d in range(1, batch_size + 1) if batch_size % d == 0 and d <= fit)
    return rows, grad_accum * (batch_size // rows)
