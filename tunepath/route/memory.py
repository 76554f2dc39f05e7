"""Memory and time estimates that decide full fine-tuning vs LoRA vs QLoRA.

Per GPU, in GB (1e9 bytes), for P parameters, micro-batch b, sequence length s, n GPUs:

    full  = P·(w + g + o)/n                   weights, gradients, optimizer state, sharded over n GPUs
          + A + overhead                      (ZeRO-3 / FSDP full sharding; activations are per GPU)
    lora  = P·w + 16·P_lora + A + overhead    frozen weights replicated on each GPU (data parallel)
    qlora = (P − E)·0.516 + E·w + 16·P_lora + A + overhead

    w, g, o   bytes per weight, gradient, optimizer state: 2, 2, 12 by default. Mixed-precision AdamW keeps
              bf16 weights and gradients plus an fp32 master copy and two fp32 moments: 2 + 2 + 12 = 16
              bytes per parameter (Rajbhandari et al. 2020, "ZeRO", §3.1); ZeRO stage 3 divides all of it by n.
    P_lora    r · L · (11·h + 3·f): LoRA on every linear layer of a decoder layer (q, o: h→h; k, v: h→h at
              most; gate, up: h→f; down: f→h), each adding r·(d_in + d_out) (Hu et al. 2021, "LoRA").
    16        bytes per adapter parameter: peft keeps adapters in fp32 (autocast_adapter_dtype) with an fp32
              gradient and two fp32 AdamW moments: 4 + 4 + 8.
    0.516     bytes per 4-bit weight: NF4 (4 bits) plus double-quantised block constants, 0.127 bits per
              parameter (Dettmers et al. 2023, "QLoRA", §3). E = 2·V·h parameters of the input embedding
              and the LM head stay in 16-bit (bitsandbytes quantises nn.Linear layers only and skips lm_head).
    A         activations: s·b·h·L·a without checkpointing; s·b·h·(2·L + a) with it (each layer keeps its
              2-byte input and one layer is recomputed at a time); plus the logits, s·b·V·12 bytes (bf16
              logits, the fp32 copy the loss makes, and its fp32 gradient, with the log-softmax output).
              LoRA and QLoRA add s·b·(16·h + 2·f) per layer (per recomputed layer with checkpointing): peft
              casts each adapted layer's input to the adapters' fp32 and keeps it for their gradients
              (constants fitted to the measurements below).
    a         activation bytes per token, layer and hidden unit (route.activation_factor), by default
              20 + 8·f/h. Korthikanti et al. 2022 ("Reducing Activation Recomputation", §4.1) count 34 for a
              GPT layer with a 4h GeLU MLP: 11 attention (without the s² score terms, which SDPA/flash
              attention do not store), 19 MLP, 4 layer norms. A SwiGLU MLP stores its 2h input and four
              f-wide tensors (gate, up, activation, product): 2·h + 8·f. Attention and two RMSNorms that
              upcast to fp32 give the other 18·h, with no dropout masks.
    overhead  route.overhead_gb per GPU: CUDA context, cuBLAS workspace, allocator slack.

Checked on one H200 (torch 2.11, transformers 5.17, peft 0.21, bitsandbytes 0.50; random-init Qwen2.5-1.5B
and TinyLlama-1.1B shapes, sequence 2048, batch 1 and 4, checkpointing off and on, 17 runs): the estimate
without overhead was 1.01-1.21× the peak allocated memory for full training and 0.99-1.16× for LoRA and QLoRA,
and 0.83-1.08× the peak reserved memory, a gap that route.overhead_gb and route.headroom cover. Full training
there kept AdamW's moments in bf16 (optimizer_bytes_per_param 4) or trained fp32 weights under bf16 autocast
(weights 4, gradients 4, optimizer 8). docs/routing.md has the table.

Unknown shapes are derived from P for a standard decoder: P ≈ 12·L·h² and L ≈ h/128 (LLaMA-7B: h 4096,
L 32), so h ≈ (128·P/12)^(1/3); f = 8/3·h (LLaMA's SwiGLU width); V = 32,000.

Time (hours) = epochs · tokens · k·P / (n · route.gpu_tflops·1e12) / 3600, with k = 6 for full training
(Kaplan et al. 2020: forward 2, backward 4 FLOPs per parameter and token), 4 for LoRA/QLoRA (no weight
gradients for frozen weights), +2 with gradient checkpointing (the forward runs twice), +2 for DPO (the
reference model's forward).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from tunepath.route.config import RouteConfig
from tunepath.route.profile import Profile

GB = 1e9
ADAPTER_BYTES = 16.0
NF4_BYTES = (4 + 0.127) / 8
LOGIT_BYTES = 12.0
LORA_ACT_H, LORA_ACT_F = 16.0, 2.0
LAYERS_PER_HIDDEN = 1 / 128
DEFAULT_VOCAB = 32_000
METHODS = ("full", "lora", "qlora")

FORMULA = (
    "full = P·(w+g+o)/n + A + overhead; lora = P·w + 16·P_lora + A + overhead; "
    "qlora = (P−E)·0.516 + E·w + 16·P_lora + A + overhead; "
    "P_lora = r·L·(11h+3f); E = 2·V·h; A = s·b·h·L·a (+ s·b·V·12 logits), or s·b·h·(2L+a) with checkpointing, "
    "+ s·b·L·(16h+2f) for adapters; a = 20 + 8f/h unless set. Sources: ZeRO (Rajbhandari 2020) for 16 bytes/param, LoRA (Hu 2021), "
    "QLoRA (Dettmers 2023) for 4.127 bits/param, Korthikanti 2022 for activations. GB = 1e9 bytes."
)


@dataclass(frozen=True)
class ModelShape:
    params: float
    hidden_size: int
    num_layers: int
    intermediate_size: int
    vocab_size: int
    derived: tuple[str, ...]


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
    return ModelShape(params, h, layers, f, vocab, tuple(derived))


def lora_param_count(shape: ModelShape, rank: int) -> float:
    return rank * shape.num_layers * (11 * shape.hidden_size + 3 * shape.intermediate_size)


def activation_bytes(shape: ModelShape, cfg: RouteConfig, max_length: int, batch_size: int, *, adapters: bool,
                     gradient_checkpointing: bool = False) -> float:
    h, f, layers = shape.hidden_size, shape.intermediate_size, shape.num_layers
    a = cfg.activation_factor if cfg.activation_factor is not None else 20 + 8 * f / h
    tokens = max_length * batch_size
    stored = 1 if gradient_checkpointing else layers  # layers whose full activations are alive at once
    total = tokens * h * a * stored + tokens * shape.vocab_size * LOGIT_BYTES
    if gradient_checkpointing:
        total += tokens * h * 2 * layers
    if adapters:
        total += tokens * (LORA_ACT_H * h + LORA_ACT_F * f) * stored
    return total


def estimate_memory(profile: Profile, cfg: RouteConfig, *, max_length: int, batch_size: int, lora_rank: int,
                    gradient_checkpointing: bool = False) -> dict:
    """Per-GPU GB for each method, what is available, and what fits (None on CPU, where there is no GPU to fit).

    max_length, batch_size (rows per micro-batch), lora_rank and gradient_checkpointing describe how the train
    stage will run (the pipeline passes tokenize.max_length and the train section's values)."""
    shape = model_shape(profile)
    gpus = profile.resources.gpus
    n = max(gpus, 1)
    p = shape.params
    p_lora = lora_param_count(shape, lora_rank)
    embed = min(p, 2 * shape.vocab_size * shape.hidden_size)
    act = {
        "full": activation_bytes(shape, cfg, max_length, batch_size, adapters=False, gradient_checkpointing=gradient_checkpointing),
        "lora": activation_bytes(shape, cfg, max_length, batch_size, adapters=True, gradient_checkpointing=gradient_checkpointing),
    }
    act["qlora"] = act["lora"]
    over = cfg.overhead_gb * GB
    adapter = {"weights": 4 * p_lora, "gradients": 4 * p_lora, "optimizer": (ADAPTER_BYTES - 8) * p_lora}
    parts = {
        "full": {"weights": p * cfg.weight_bytes / n, "gradients": p * cfg.grad_bytes / n,
                 "optimizer": p * cfg.optimizer_bytes_per_param / n},
        "lora": {**adapter, "weights": p * cfg.weight_bytes + adapter["weights"]},
        "qlora": {**adapter, "weights": (p - embed) * NF4_BYTES + embed * cfg.weight_bytes + adapter["weights"]},
    }
    breakdown, per_gpu = {}, {}
    for method, part in parts.items():
        part = {**part, "activations": act[method], "overhead": over}
        breakdown[method] = {k: round(v / GB, 3) for k, v in part.items()}
        per_gpu[method] = round(sum(part.values()) / GB, 3)
    available = round(profile.resources.gpu_memory_gb * (1 - cfg.headroom), 3) if gpus > 0 else None
    fits = {m: (per_gpu[m] <= available if available is not None else None) for m in METHODS}
    return {
        "per_gpu_gb": per_gpu,
        "available_gb": available,
        "gpus": gpus,
        "fits": fits,
        "breakdown_gb": breakdown,
        "inputs": {
            **{k: v for k, v in asdict(shape).items() if k != "derived"},
            "derived": list(shape.derived),
            "lora_params": round(p_lora),
            "max_length": max_length,
            "batch_size": batch_size,
            "lora_rank": lora_rank,
            "gradient_checkpointing": gradient_checkpointing,
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


def estimate_hours(profile: Profile, cfg: RouteConfig, stages: list[str], method: str, gradient_checkpointing: bool = False) -> float | None:
    """Wall-clock hours to train `stages` with `method` on the profile's GPUs; None on CPU."""
    gpus = profile.resources.gpus
    if gpus == 0:
        return None
    p = profile.model.params_b * 1e9
    flops = sum(_flops_per_token(method, stage, gradient_checkpointing) * p * training_tokens(profile, cfg, stage) for stage in stages)
    return flops * cfg.epochs / (gpus * cfg.gpu_tflops * 1e12) / 3600


def _flops_per_token(method: str, stage: str, gradient_checkpointing: bool) -> float:
    """Training FLOPs per parameter and token: 6 for full fine-tuning, 4 with frozen base weights; +2 for
    recomputed activations, +2 for the reference model's forward pass of DPO/KTO."""
    k = 6.0 if method == "full" else 4.0
    k += 2.0 if gradient_checkpointing else 0.0
    return k + (2.0 if stage in ("dpo", "kto") else 0.0)


def estimate_step_hours(profile: Profile, cfg: RouteConfig, stages: list[str], method: str, max_steps: int,
                        tokens_per_step: int, gradient_checkpointing: bool = False) -> float | None:
    """Wall-clock hours when every stage runs train.max_steps optimizer steps of `tokens_per_step` tokens (all
    GPUs together): the time the configured step count asks for, whatever the data size; None on CPU."""
    gpus = profile.resources.gpus
    if gpus == 0:
        return None
    p = profile.model.params_b * 1e9
    flops = sum(_flops_per_token(method, stage, gradient_checkpointing) * p * max_steps * tokens_per_step for stage in stages)
    return flops / (gpus * cfg.gpu_tflops * 1e12) / 3600
