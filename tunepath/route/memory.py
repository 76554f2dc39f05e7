"""Memory per GPU for one way of training (method + knobs), calibrated against the GPU benchmark's peaks.

Per GPU, in GB (1e9 bytes), for P parameters, n GPUs, T tokens per micro-batch (rows × max_length), hidden h,
L layers, MLP width f, vocabulary V:

    full  = P·(w + g + o)/n + A + overhead            weights, gradients, AdamW state (ZeRO-3 / FSDP sharding)
    lora  = P·w + 16·P_lora + A + overhead            frozen bf16 weights on every GPU
    qlora = (P − E)·0.516 + E·e + 16·P_lora + A + overhead

    w, g, o   bytes per weight, gradient, optimizer state (route.weight_bytes ...): 2 + 2 + 12 = 16 by default,
              the train stage's fp32 weights and gradients and two fp32 moments under bf16 autocast (ZeRO §3.1).
    P_lora    r·L·(11·h + 3·f): LoRA on every linear layer of a decoder layer (Hu et al. 2021); 16 bytes each
              (fp32 weight, gradient, two AdamW moments).
    0.516     bytes per NF4 weight with double-quantised constants (Dettmers et al. 2023). E: embedding and
              LM head (V·h, twice when untied), not quantised, bf16: e = 2 (4 for the benchmark's runs before
              2026-12-01, made through peft's `prepare_model_for_kbit_training`, which casts them to fp32).
    A         activations kept for backward, per micro-batch:
                no checkpointing:  L·T·c + loss
                checkpointing:     L·T·s·h + max(loss, T·c)     each layer keeps its s-byte input; one layer
                                                                is recomputed at a time, after the loss is done
                unsloth's checkpointing and train.checkpoint_offload keep the layer inputs in CPU memory:
                4·h·T (two in flight) instead of L·T·s·h; the recomputed layer then measured 2× (OFFLOAD_SCALE);
                train.checkpoint_offload's prefetch adds the input of the next layer of backward, copied back
                ahead: + s·h·T (PREFETCHED_INPUTS, 59 MB at 7B and 8,192 tokens)
              c = k·(a·h) bytes per token and layer, a·h = 20·h + 5.7·f (route.activation_factor sets a) for
              the hf backend with compiled layers (fitted to its LoRA peaks at the 0.5B, 1.5B and 7B shapes);
              k = LAYER_SCALE of the path: eager layers keep 1.42×, the hf QLoRA path 1.47× (the dequantised
              weights; s = 2, or 4 with peft's fp32 upcast), unsloth 0.92× for LoRA and 0.80× for QLoRA.
              loss (train.chunked_loss, `tunepath.train.loss`): fp32 logits of at most `chunk` rows per step;
              when the next chunk's logits are made the previous chunk's logits, softmax and bf16 gradient are
              still alive: 10·min(T, chunk)·V + 6·min(chunk, T − chunk)·V bytes (1 GB at V 152k and the
              default 256 MiB chunks, 4.3 GB with the 1 GiB chunks of the runs before 2026-12-01;
              full training adds the fp32 LM-head gradient, 4·V·h). Without the chunked loss: T·V·12 (bf16
              logits, their fp32 copy and its gradient). unsloth's fused loss is inside its per-token figure (with
              checkpointing too: 7B QLoRA measured 8.31 GB against 10.65 estimated with the chunked loss).
    overhead  route.overhead_gb: CUDA context and workspaces, which torch's allocated-memory peak does not count.

tests/test_route_calibration.py holds every measured peak (benchmarks/results/train_*.json and the 7B rows of
the benchmark issue) against this estimate: within 15% of each. Paths nobody has measured yet (full fine-
tuning with the speed paths, QLoRA with checkpointing, unsloth with checkpointing) use the constants above,
and the plan says which figures are measured. Shapes not given are derived from P: P ≈ 12·L·h², L ≈ h/128,
f = 8/3·h, V = 32,000 (a LLaMA-like decoder).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from tunepath.route.config import RouteConfig
from tunepath.route.profile import Profile

GB = 1e9
ADAPTER_BYTES = 16.0
NF4_BYTES = (4 + 0.127) / 8
LOGIT_BYTES = 12.0
ACT_H, ACT_F = 20.0, 5.7  # bytes per token and layer, per hidden unit and per MLP unit, compiled hf layers
LAYER_SCALE = {("hf", True): 1.0, ("hf", False): 1.42}  # (backend, compiled)
HF_QLORA_SCALE = 1.47
UNSLOTH_SCALE = {"lora": 0.92, "full": 0.92, "qlora": 0.80}
OFFLOAD_SCALE = 2.0  # the recomputed layer under train.checkpoint_offload (7B QLoRA at 4,096 and 8,192 tokens)
PREFETCHED_INPUTS = 1  # tunepath.train.offload.MAX_PREFETCHED: inputs back on the GPU before their backward (a test keeps them equal)
LAYERS_PER_HIDDEN = 1 / 128
DEFAULT_VOCAB = 32_000
METHODS = ("full", "lora", "qlora")
CHUNK_BYTES = 256 << 20  # tunepath.train.loss.CHUNK_BYTES: fp32 logits per chunk (a test keeps the two equal)

FORMULA = (
    "full = P·(w+g+o)/n + A + overhead; lora = P·w + 16·P_lora + A + overhead; "
    "qlora = (P−E)·0.516 + E·e + 16·P_lora + A + overhead (e = 2: bf16 embeddings and head); "
    "P_lora = r·L·(11h+3f); A = L·T·c + loss, or L·T·s·h + max(loss, T·c) with checkpointing (4·h·T + s·h·T + max(loss, 2·T·c) offloaded, s·h·T: the prefetched input); "
    "c = k·(20h + 5.7f) per token and layer (k: 1 compiled hf, 1.42 eager, ×1.47 hf QLoRA, 0.92/0.80 unsloth); "
    "loss = chunked fp32 logits, 10·min(T,chunk)·V + 6·min(chunk,T−chunk)·V. Fitted to the GPU benchmark's "
    "peaks (tests/test_route_calibration.py). GB = 1e9 bytes."
)


@dataclass(frozen=True)
class ModelShape:
    params: float
    hidden_size: int
    num_layers: int
    intermediate_size: int
    vocab_size: int
    tied_embeddings: bool
    derived: tuple[str, ...]


@dataclass(frozen=True)
class Knobs:
    """One way of running the train stage, as far as memory and speed care."""

    method: str
    gradient_checkpointing: bool
    rows: int  # rows per micro-batch
    max_length: int
    backend: str = "hf"  # hf or unsloth: the backend the train stage will pick for this method
    compile: bool = True
    chunked_loss: bool = True
    lora_rank: int = 16
    offload: bool = False  # train.checkpoint_offload (hf backend, with checkpointing)
    prefetch: bool = False  # offload brings the next input back ahead (off in the train stage until measured on a GPU)
    loss_chunk_bytes: int = CHUNK_BYTES  # the chunked loss's fp32 logits per chunk
    fp32_embeddings: bool = False  # hf QLoRA through peft's prepare_model_for_kbit_training (benchmark runs before 2026-12-01)

    @property
    def tokens(self) -> int:
        return self.rows * self.max_length


def model_shape(profile: Profile) -> ModelShape:
    """The model's dimensions: as given in the profile, else derived from its size (see the module doc)."""
    m = profile.model
    params = m.params_b * 1e9
    derived = []
    h = m.hidden_size
    if h is None:
        h = max(1, round((params / (12 * LAYERS_PER_HIDDEN)) ** (1 / 3)))
        derived.append("hidden_size")
    layers = m.num_layers
    if layers is None:
        layers = max(1, round(params / (12 * h * h)))
        derived.append("num_layers")
    f = m.intermediate_size
    if f is None:
        f = max(1, round(8 * h / 3))
        derived.append("intermediate_size")
    vocab = m.vocab_size
    if vocab is None:
        vocab = DEFAULT_VOCAB
        derived.append("vocab_size")
    return ModelShape(params, h, layers, f, vocab, bool(m.tied_embeddings), tuple(derived))


def lora_param_count(shape: ModelShape, rank: int) -> float:
    return rank * shape.num_layers * (11 * shape.hidden_size + 3 * shape.intermediate_size)


def embedding_params(shape: ModelShape) -> float:
    return min(shape.params, shape.vocab_size * shape.hidden_size * (1 if shape.tied_embeddings else 2))


def layer_bytes(shape: ModelShape, cfg: RouteConfig, k: Knobs) -> float:
    """Bytes per token that one decoder layer keeps for backward on this path (c in the module doc)."""
    h, f = shape.hidden_size, shape.intermediate_size
    base = cfg.activation_factor * h if cfg.activation_factor is not None else ACT_H * h + ACT_F * f
    if k.backend == "unsloth":
        return base * UNSLOTH_SCALE[k.method]
    scale = LAYER_SCALE[("hf", k.compile)] * (OFFLOAD_SCALE if k.offload and k.gradient_checkpointing else 1.0)
    return base * scale * (HF_QLORA_SCALE if k.method == "qlora" else 1.0)


def loss_bytes(shape: ModelShape, k: Knobs) -> float:
    """The loss's transient memory at the end of the forward pass (see the module doc)."""
    v, t = shape.vocab_size, k.tokens
    if k.backend == "unsloth":
        return 0.0  # unsloth's fused, chunked loss: inside its measured per-token figure, checkpointing or not
    if not k.chunked_loss and k.backend == "hf":
        return t * v * LOGIT_BYTES
    chunk = max(64, k.loss_chunk_bytes // (4 * v))
    total = 10 * min(t, chunk) * v + 6 * min(chunk, max(0, t - chunk)) * v
    return total + (4 * v * shape.hidden_size if k.method == "full" else 0)


def activation_bytes(shape: ModelShape, cfg: RouteConfig, k: Knobs) -> float:
    per_token = layer_bytes(shape, cfg, k)
    loss = loss_bytes(shape, k)
    t, h, layers = k.tokens, shape.hidden_size, shape.num_layers
    if not k.gradient_checkpointing:
        return layers * t * per_token + loss
    s = 4 if k.fp32_embeddings else 2
    if k.backend == "unsloth":
        kept = 4 * h * t
    elif k.offload:
        # the input in use and the one being copied out, plus those copied back ahead of their backward
        kept = 4 * h * t + (PREFETCHED_INPUTS * s * h * t if k.prefetch else 0)
    else:
        kept = layers * t * h * s
    return kept + max(loss, t * per_token)


def breakdown(profile: Profile, cfg: RouteConfig, k: Knobs) -> dict:
    """Per-GPU GB by part for one way of training (weights, gradients, optimizer, activations, overhead)."""
    shape = model_shape(profile)
    n = max(profile.resources.gpus, 1)
    p = shape.params
    p_lora = lora_param_count(shape, k.lora_rank)
    adapter = {"weights": 4 * p_lora, "gradients": 4 * p_lora, "optimizer": (ADAPTER_BYTES - 8) * p_lora}
    if k.method == "full":
        part = {"weights": p * cfg.weight_bytes / n, "gradients": p * cfg.grad_bytes / n,
                "optimizer": p * cfg.optimizer_bytes_per_param / n}
    elif k.method == "lora":
        part = {**adapter, "weights": p * cfg.weight_bytes + adapter["weights"]}
    else:
        embed = embedding_params(shape)
        kept = 4.0 if k.fp32_embeddings else cfg.weight_bytes
        part = {**adapter, "weights": (p - embed) * NF4_BYTES + embed * kept + adapter["weights"]}
    part["activations"] = activation_bytes(shape, cfg, k)
    part["overhead"] = cfg.overhead_gb * GB
    return {name: round(v / GB, 3) for name, v in part.items()}


def total_gb(parts: dict) -> float:
    return round(sum(parts.values()), 3)


def available_gb(profile: Profile, cfg: RouteConfig) -> float | None:
    if profile.resources.gpus == 0:
        return None
    return round(profile.resources.gpu_memory_gb * (1 - cfg.headroom), 3)


def estimate_memory(profile: Profile, cfg: RouteConfig, knobs: dict[str, Knobs]) -> dict:
    """Per-GPU GB of each method run with its knobs, what is available, and what fits (None on CPU)."""
    shape = model_shape(profile)
    parts = {m: breakdown(profile, cfg, k) for m, k in knobs.items()}
    per_gpu = {m: total_gb(p) for m, p in parts.items()}
    available = available_gb(profile, cfg)
    any_knobs = next(iter(knobs.values()))
    return {
        "per_gpu_gb": per_gpu,
        "available_gb": available,
        "gpus": profile.resources.gpus,
        "fits": {m: (per_gpu[m] <= available if available is not None else None) for m in knobs},
        "breakdown_gb": parts,
        "inputs": {
            **{key: v for key, v in asdict(shape).items() if key != "derived"},
            "derived": list(shape.derived),
            "lora_params": round(lora_param_count(shape, any_knobs.lora_rank)),
            "max_length": any_knobs.max_length,
            "lora_rank": any_knobs.lora_rank,
            "headroom": cfg.headroom,
        },
        "formula": FORMULA,
    }


def training_tokens(profile: Profile, cfg: RouteConfig, stage: str) -> float:
    d = profile.data
    if stage in ("pretrain", "cpt"):
        return float(d.unlabeled_tokens)
    if stage == "sft":
        return float(labeled_tokens(profile, cfg))
    if stage == "kto":
        return 2.0 * d.feedback_examples * cfg.tokens_per_example  # the answer and a mismatched one
    return 2.0 * d.preference_pairs * cfg.tokens_per_example  # dpo: chosen and rejected answers


def labeled_tokens(profile: Profile, cfg: RouteConfig) -> int:
    d = profile.data
    return d.labeled_tokens if d.labeled_tokens is not None else d.labeled_examples * cfg.tokens_per_example
