"""Expected tokens/s and hours for one way of training, from the GPU benchmark's measured speeds.

The benchmark (benchmarks/train_gpu.py, one H200) measured real tokens/s per training path and model size.
Each measurement becomes a utilisation, u = tokens/s · k·P / R, with R the card's dense bf16 matmul rate
measured in the same run; on the user's card

    tokens/s = u(path, P, T) · route.gpu_tflops · 1e12 / (k·P)

with k = 4 FLOPs per parameter and token for LoRA and QLoRA (forward, and backward to the activations), 6 for
full training, +2 for DPO and KTO (the reference model's forward). u is interpolated in log P between the
measured sizes and held at the ends; T, the tokens per micro-batch, scales it by (T / 8,192)^γ, γ from the
compiled path measured at 8,192 and 16,384 tokens. A path measured without checkpointing uses the compiled
path's checkpointing slowdown at that size. A path not measured yet takes the rate of the path in STAND_INS
(offload with its prefetch at 1.5B: offload on demand's rate, a lower bound) and the plan says it is derived.
A path that adds a setting to a measured one (checkpointing, offload, full training over LoRA) is its base's
u times the ratio measured between them (see `utilisation`); full training without compile uses the LoRA
path's utilisation over its 6 FLOPs.
tests/test_route_calibration.py keeps MEASURED equal to the result files.

Hours = epochs · tokens / (n · tokens/s) / 3600, n GPUs (data parallel, linear).
"""

from __future__ import annotations

import math

from tunepath.route.config import RouteConfig
from tunepath.route.memory import Knobs
from tunepath.route.profile import Profile

# path -> [(parameters, tokens per micro-batch, real tokens/s, matmul TFLOP/s of the card in that run)]
# benchmarks/results/train_*.json: the mean over every run of a path at a shape of its steady rate, real tokens per
# step over the median step time (a recompile inside a short timed window, as in the 7B hf-QLoRA checkpointing run
# of 2026-12-01, would otherwise count: 2,616 tokens/s over 3 steps against 10,136 steady; compile time is the
# plan's time to first step, not its rate). Runs on different days differ by up to 20%: 1.5B checkpointing 33,097
# on 2026-11-28, 26,480 on 2026-12-01. The 7B compiled and hf-QLoRA rows are from the benchmark issue's tables
# (2026-12-01, same H200, no result file), at the matmul rate of the other runs. Runs a result file marks
# `speed_excluded` (a window the benchmark itself could not time) are left out, with the reason in the file.
H200_RATE = 790.0
MEASURED: dict[str, list[tuple[float, int, float, float]]] = {
    "compiled": [(494_032_768, 8192, 44652.8, 804.8), (494_032_768, 16384, 81930.4, 804.8),
                 (1_543_714_304, 8192, 40976.1, 788.0), (1_543_714_304, 16384, 50727.3, 786.2),
                 (7_615_616_512, 8192, 16439.8, 789.8)],
    "eager": [(494_032_768, 8192, 32376.8, 804.8), (1_543_714_304, 8192, 28392.8, 788.0),
              (1_543_714_304, 16384, 28957.5, 786.2), (7_615_616_512, 8192, 11978.9, 789.8)],
    "compiled+checkpointing": [(1_543_714_304, 8192, 29788.5, 790.2), (7_615_616_512, 8192, 11679.6, 796.3)],
    "hf-qlora": [(1_543_714_304, 8192, 25935.3, 791.2), (7_615_616_512, 8192, 15300.0, H200_RATE)],
    "hf-qlora+checkpointing": [(7_615_616_512, 8192, 10305.0, 794.3), (14_770_033_664, 8192, 5389.2, 802.6)],
    # offload with its prefetch (2026-12-02): the next layer's input brought back one layer ahead
    "hf-qlora+checkpointing+offload": [(7_615_616_512, 8192, 9007.0, 787.9)],
    # offload on demand: each layer input brought back when its backward starts
    "hf-qlora+checkpointing+offload-on-demand": [(7_615_616_512, 8192, 8930.5, 794.3), (7_615_616_512, 4096, 7658.6, 795.7),
                                                 (14_770_033_664, 4096, 4510.3, 802.4)],
    # 1.5B lean: 12,182 and 11,825 with the attention between compiled halves (2026-12-01), 20,897 with it inside
    # the layer's graph (2026-12-02, the train stage's way since): the mean of the three, as for every path
    "compiled+checkpointing+offload-on-demand": [(1_543_714_304, 4096, 14967.6, 790.3)],
    "unsloth": [(494_032_768, 8192, 16452.0, 804.8), (1_543_714_304, 8192, 11394.8, 786.2)],
    "unsloth-qlora": [(1_543_714_304, 8192, 9219.7, 791.2), (7_615_616_512, 8192, 8468.5, 796.3)],
    "unsloth-qlora+checkpointing": [(7_615_616_512, 8192, 3495.7, 789.1)],
    # full fine-tuning, compiled (fp32 weights under bf16 autocast, 2026-12-02). Without checkpointing: the run's
    # log line (33,718 steady, 801.4 TFLOP/s card); its result file was lost to the GPU machine's full disk.
    "full-compiled": [(1_543_714_304, 8192, 33718.0, 801.4)],
    "full-compiled+checkpointing": [(1_543_714_304, 8192, 24936.2, 801.4)],
}
REFERENCE_TOKENS = 8192
# a path not measured yet -> the measured path that stands in for it
STAND_INS = {"compiled+checkpointing+offload": "compiled+checkpointing+offload-on-demand"}


def rows_of(path: str) -> list[tuple[float, int, float, float]]:
    return MEASURED.get(path) or MEASURED[STAND_INS[path]]


def path_of(k: Knobs) -> tuple[str, bool]:
    """The measured path that stands for these knobs, and whether its checkpointing was measured on it."""
    if k.method == "full" and k.compile and k.backend == "hf" and not k.offload:
        return ("full-compiled+checkpointing", True) if k.gradient_checkpointing else ("full-compiled", False)
    offload = ""
    if k.offload and k.gradient_checkpointing and k.backend == "hf":
        offload = "+offload" if k.prefetch else "+offload-on-demand"
    if k.method == "qlora":
        path = "unsloth-qlora" if k.backend == "unsloth" else "hf-qlora"
        return (f"{path}+checkpointing{offload}", True) if k.gradient_checkpointing else (path, False)
    if k.backend == "unsloth":
        return "unsloth", False
    if not k.compile:
        return "eager", False
    return (f"compiled+checkpointing{offload}", True) if k.gradient_checkpointing else ("compiled", False)


def utilisation(path: str, params: float, tokens: int = REFERENCE_TOKENS) -> float:
    """u at `tokens` per micro-batch. A path that adds one setting to another measured path (its base:
    checkpointing to the compiled path, offload to checkpointing, full training to LoRA) is that base's u times
    the ratio measured between the two, interpolated in log P over the sizes where the path was measured; so a
    path measured only at 7B and 14B follows its base's measured trend down to 1.5B instead of keeping 7B's u.
    A path with no base is interpolated in log P over its own sizes. At each size the measurement nearest in
    tokens stands, scaled by (tokens / its tokens)^γ (exact where the benchmark ran that micro-batch)."""
    base = base_path(path)
    if base is not None:
        ratios = sorted((p, u / utilisation(base, p, t)) for p, (t, u) in _nearest(path, tokens).items())
        return _interpolate(ratios, params) * utilisation(base, params, tokens)
    points = sorted((p, u * (tokens / t) ** tokens_exponent(p)) for p, (t, u) in _nearest(path, tokens).items())
    return _interpolate(points, params)


def base_path(path: str) -> str | None:
    """The measured path this one adds a setting to, or None."""
    if path.startswith("full-"):
        return path.removeprefix("full-")
    head, plus, _ = path.rpartition("+")
    return head if plus and head in MEASURED else None


def _nearest(path: str, tokens: int) -> dict[float, tuple[int, float]]:
    """Per measured size: (tokens per micro-batch, u) of the measurement nearest in tokens to `tokens`."""
    nearest: dict[float, tuple[int, float]] = {}
    for p, t, n, rate in rows_of(path):
        if p not in nearest or abs(math.log(t / tokens)) < abs(math.log(nearest[p][0] / tokens)):
            nearest[p] = (t, n * path_flops(path) * p / (rate * 1e12))
    return nearest


def path_flops(path: str) -> float:
    """FLOPs per parameter and token of a measured path's runs (SFT): 6 for full training, 4 on frozen weights."""
    return 6.0 if path.startswith("full-") else 4.0


def tokens_exponent(params: float) -> float:
    """γ: how utilisation grows with the micro-batch, from the compiled path's two micro-batch sizes."""
    by_size: dict[float, dict[int, float]] = {}
    for p, t, n, _rate in MEASURED["compiled"]:
        by_size.setdefault(p, {})[t] = n
    points = sorted((p, math.log2(ts[16384] / ts[8192])) for p, ts in by_size.items() if {8192, 16384} <= set(ts))
    return max(0.0, _interpolate(points, params))


def checkpointing_factor(params: float) -> float:
    """Speed with checkpointing over speed without it, on the compiled path at this size."""
    return utilisation("compiled+checkpointing", params) / utilisation("compiled", params)


def _interpolate(points: list[tuple[float, float]], x: float) -> float:
    if x <= points[0][0]:
        return points[0][1]
    if x >= points[-1][0]:
        return points[-1][1]
    for (x0, y0), (x1, y1) in zip(points, points[1:]):
        if x0 <= x <= x1:
            w = (math.log(x) - math.log(x0)) / (math.log(x1) - math.log(x0))
            return y0 + w * (y1 - y0)
    return points[-1][1]


def flops_per_token(method: str, stage: str) -> float:
    """Training FLOPs per parameter and token: 6 full, 4 with frozen base weights; +2 for DPO/KTO's reference."""
    return (6.0 if method == "full" else 4.0) + (2.0 if stage in ("dpo", "kto") else 0.0)


def tokens_per_second(profile: Profile, cfg: RouteConfig, k: Knobs, stage: str = "sft") -> float:
    """Expected real tokens/s of one GPU."""
    p = profile.model.params_b * 1e9
    path, measured_gc = path_of(k)
    u = utilisation(path, p, k.tokens)
    if k.gradient_checkpointing and not measured_gc:
        u *= checkpointing_factor(p)
    # u is a share of the card's matmul rate: tokens/s is that rate over the method's FLOPs per token
    return u * cfg.gpu_tflops * 1e12 / (flops_per_token(k.method, stage) * p)


def measured(k: Knobs) -> bool:
    """Whether the benchmark measured this path at this micro-batch (else the speed is derived, see the module doc)."""
    path, measured_gc = path_of(k)
    at_size = any(t == k.tokens for _p, t, _n, _r in MEASURED.get(path, []))  # a stand-in is not a measurement
    return (k.method != "full" or path.startswith("full-")) and at_size and (measured_gc or not k.gradient_checkpointing)


def estimate_hours(profile: Profile, cfg: RouteConfig, stages: list[str], k: Knobs, tokens: dict[str, float] | None = None) -> float | None:
    """Wall-clock hours for `stages`, each over its training tokens (× route.epochs) or over `tokens[stage]`; None on CPU."""
    from tunepath.route.memory import training_tokens

    gpus = profile.resources.gpus
    if gpus == 0:
        return None
    seconds = 0.0
    for stage in stages:
        n = tokens[stage] if tokens is not None else training_tokens(profile, cfg, stage) * cfg.epochs
        seconds += n / (gpus * tokens_per_second(profile, cfg, k, stage))
    return seconds / 3600
