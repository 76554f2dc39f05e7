"""The planner's knobs: for each method, the fastest gradient checkpointing and micro-batch that fit the GPU.

    settings = TrainSettings(max_length=2048, batch_size=8)           # train.* values the user set are not None
    best = choose_knobs(profile, cfg, settings)                         # {"full": Option, "lora": ..., "qlora": ...}

Knobs the user set (train.gradient_checkpointing, train.checkpoint_offload, train.micro_batch_tokens other
than `auto`) are kept as they are; the others are searched: checkpointing off, on, and on with the layer
inputs offloaded to CPU (hf backend), micro-batches of every divisor of train.batch_size rows. The planner
takes the fastest option whose memory estimate fits the GPU with route.headroom kept free (and
route.overhead_gb counted); with none fitting, the one that needs the least memory (and the plan says it does
not fit). That is the lean mode: when memory is short the planner walks down to checkpointing, offload and
one-row micro-batches by itself. unsloth's checkpointing offloads by itself, and the estimate counts that.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from tunepath.route.config import RouteConfig
from tunepath.route.memory import METHODS, Knobs, available_gb, breakdown, total_gb
from tunepath.route.profile import Profile
from tunepath.route.speed import measured, tokens_per_second

DEFAULT_MICRO_BATCH_TOKENS = 8192  # what train.micro_batch_tokens `auto` means when there is nothing to fit (CPU)


@dataclass(frozen=True)
class TrainSettings:
    """What the route knows of how the train stage will run. None: the planner chooses (train.* `auto`)."""

    max_length: int = 2048
    batch_size: int = 8  # train.batch_size: rows per GPU per optimizer step, split into micro-batches
    lora_rank: int = 16
    gradient_checkpointing: bool | None = None
    checkpoint_offload: bool | None = None
    micro_batch_tokens: int | None = None
    compile: bool = True  # whether the train stage will compile the layers (train.compile, resolved)
    chunked_loss: bool = True
    backend: str = "auto"  # train.backend
    unsloth: bool = False  # unsloth is installed where training runs (used only with train.backend unsloth)
    processes: int | None = None  # train.num_processes; None: one per GPU

    def backend_for(self, method: str, gpus: int) -> str:
        """The backend the train stage picks for this method (`tunepath.train.stage.pick_backend`, on CUDA)."""
        if self.backend != "auto":
            return self.backend
        return "hf"  # `tunepath.train.stage.pick_backend`: auto trains every method on hf, the fastest measured

    def explicit(self) -> dict:
        return {k: v for k, v in (("gradient_checkpointing", self.gradient_checkpointing),
                                  ("checkpoint_offload", self.checkpoint_offload),
                                  ("micro_batch_tokens", self.micro_batch_tokens)) if v is not None}


@dataclass(frozen=True)
class Option:
    """One method with its knobs, its memory estimate and its expected speed."""

    knobs: Knobs
    micro_batch_tokens: int  # the train.micro_batch_tokens value that gives knobs.rows
    parts: dict
    per_gpu_gb: float
    fits: bool | None
    tokens_per_second: float | None
    measured: bool
    tried: int = 0
    set_by: dict = field(default_factory=dict)  # knob -> "params" (the user's) or "route" (chosen here)


def micro_rows(batch_size: int, max_length: int, budget: int) -> int:
    """Rows per micro-batch that train.micro_batch_tokens `budget` gives (`tunepath.train.speed.micro_batches`)."""
    from tunepath.train.speed import micro_batches

    return micro_batches(batch_size, 1, max_length, budget)[0]


def candidates(settings: TrainSettings, method: str, gpus: int, *, free: bool = False) -> list[tuple[Knobs, int]]:
    """Every (knobs, micro_batch_tokens) the planner may pick for `method`; free=True ignores the user's knobs."""
    gc, off = settings.gradient_checkpointing, settings.checkpoint_offload
    checkpointing = (False, True) if free or gc is None else (gc,)
    backend = settings.backend_for(method, gpus)
    # (checkpointing, offload): offload only means something with checkpointing, on the hf backend
    ways = [(g, o) for g in checkpointing
            for o in ((False, True) if g and backend == "hf" and (free or off is None) else (bool(off) and g and backend == "hf",))]
    b, length = settings.batch_size, settings.max_length
    if free or settings.micro_batch_tokens is None:
        rows = [(r, r * length) for r in range(1, b + 1) if b % r == 0]
    else:
        rows = [(micro_rows(b, length, settings.micro_batch_tokens), settings.micro_batch_tokens)]
    base = Knobs(method=method, gradient_checkpointing=False, rows=1, max_length=length, backend=backend,
                 compile=settings.compile, chunked_loss=settings.chunked_loss, lora_rank=settings.lora_rank)
    return [(replace(base, gradient_checkpointing=g, offload=o, rows=r), tokens) for g, o in ways for r, tokens in rows]


def evaluate(profile: Profile, cfg: RouteConfig, knobs: Knobs, budget: int) -> Option:
    parts = breakdown(profile, cfg, knobs)
    per_gpu = total_gb(parts)
    avail = available_gb(profile, cfg)
    speed = tokens_per_second(profile, cfg, knobs) if profile.resources.gpus > 0 else None
    return Option(knobs, budget, parts, per_gpu, per_gpu <= avail if avail is not None else None, speed, measured(knobs))


def best_option(profile: Profile, cfg: RouteConfig, settings: TrainSettings, method: str, *, free: bool = False) -> Option:
    """The fastest option that fits; with none fitting, the smallest; on CPU, the user's knobs or the defaults."""
    if profile.resources.gpus == 0:
        gc = bool(settings.gradient_checkpointing)
        budget = settings.micro_batch_tokens if settings.micro_batch_tokens is not None else DEFAULT_MICRO_BATCH_TOKENS
        rows = micro_rows(settings.batch_size, settings.max_length, budget)
        knobs = replace(candidates(settings, method, 0)[0][0], gradient_checkpointing=gc, rows=rows,
                        offload=gc and bool(settings.checkpoint_offload))
        return replace(evaluate(profile, cfg, knobs, budget), set_by=_set_by(settings, free, gpu=False))
    options = [evaluate(profile, cfg, k, budget) for k, budget in candidates(settings, method, profile.resources.gpus, free=free)]
    fitting = [o for o in options if o.fits]
    # ties (same speed) go to less memory
    pick = max(fitting, key=lambda o: (o.tokens_per_second, -o.per_gpu_gb)) if fitting else min(options, key=lambda o: o.per_gpu_gb)
    return replace(pick, tried=len(options), set_by=_set_by(settings, free, gpu=True))


def _set_by(settings: TrainSettings, free: bool, gpu: bool) -> dict:
    explicit = {} if free else settings.explicit()
    return {k: ("params" if k in explicit else ("route" if gpu else "default"))
            for k in ("gradient_checkpointing", "checkpoint_offload", "micro_batch_tokens")}


def choose_knobs(profile: Profile, cfg: RouteConfig, settings: TrainSettings) -> dict[str, Option]:
    return {m: best_option(profile, cfg, settings, m) for m in METHODS}


def describe(o: Option) -> str:
    """`lora with checkpointing, micro-batches of 2,048 tokens: 20.23 GB, ≈ 7,100 tokens/s`."""
    k = o.knobs
    gc = ("checkpointing on, offloaded" if k.offload else "checkpointing on") if k.gradient_checkpointing else "checkpointing off"
    speed = f", ≈ {o.tokens_per_second:,.0f} tokens/s" if o.tokens_per_second is not None else ""
    backend = f" on {k.backend}" if k.backend != "hf" else ""
    return f"{k.method}{backend} ({gc}, micro-batches of {k.tokens:,} tokens): {o.per_gpu_gb:,.2f} GB{speed}"
