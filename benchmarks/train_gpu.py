"""Training speed on a GPU: a hand-written transformers+peft baseline against tunepath's hf and unsloth backends.

Usage:

    python -m benchmarks.train_gpu                         # GPU: Qwen2.5-0.5B and -1.5B shapes, every variant
    python -m benchmarks.train_gpu --shapes 1.5b --variants a,b,b_compile
    python -m benchmarks.train_gpu --cpu --tiny            # the same code end to end on CPU, tiny model
    python -m benchmarks.train_gpu --shapes 1.5b --variants b,b_compile --compile-cache   # time to first step: eager,
                                                           # compiled from an empty compile cache, then from the filled one
    python -m benchmarks.train_gpu --shapes 7b --variants "b_gc+checkpoint_offload=true,b_gc+checkpoint_offload=true+offload_prefetch=1"

Models are randomly initialised Qwen2 models of the real shapes (configs below, nothing downloaded); LoRA r=16
on all linear layers; a synthetic chat data set with Alpaca-like lengths (mean ~150 tokens, long tail to
1,300; the prompt part of each sample is masked out of the loss); max length 2048. Each variant runs in its
own process (unsloth patches transformers process-wide), one after another:

  a          baseline a user writes: Trainer + peft, batch 8 samples, dynamic padding, no packing, bf16
  b_plain    tunepath hf backend with packing only: rows packed to 2048 by the tokenize stage's best-fit
             decreasing, position ids restart per sample (no cross-attention), batch 8 rows in one micro-batch,
             SDPA attention, transformers' loss, no compile (the defaults before the speed paths)
  b          tunepath hf backend, defaults but compile off: batch 8 rows run as micro-batches of 8,192 tokens
             (4 rows x 2), varlen attention, chunked loss (tunepath/train/speed.py)
  b_compile  tunepath hf backend, defaults of a run of 200+ steps: b with each decoder layer through torch.compile
  b_fast     b_compile with micro-batches of 16,384 tokens (8 rows x 1): more memory, fewer launches
  b_gc       b_compile with gradient checkpointing (train.gradient_checkpointing)
  c          tunepath unsloth backend (micro-batch rows flattened into one, unsloth's varlen path)
  bq, cq     QLoRA (4-bit NF4 base) on the hf backend (with compile) and on unsloth
  bq_gc, cq_gc  the same with gradient checkpointing (unsloth's offloads the layer inputs to CPU)
  b_full, b_full_gc  full fine-tuning (fp32 weights under bf16 autocast, compiled), without and with checkpointing
  trl, trl_nogc, trl_liger, u, u_nogc, uq
             the peers as their documentation shows them (TRL's SFTTrainer, unsloth): see train_peers.py

A variant takes `+key=value` changes: TrainConfig fields, and engine switches (tunepath.train.options, no
params.yaml key): upcast=true (peft's fp32 upcast on hf QLoRA), loss_chunk_mb=N (the chunked loss's chunk),
offload_prefetch=1 (checkpoint offload brings the next input back one layer ahead; the train stage's default
is on demand until the prefetch is measured on a GPU),
compile_cache=cold|warm (torch.compile's caches in a folder of the variant's own: emptied first, or kept from
the cold run; --compile-cache adds both runs for every compiling variant).

Shapes: tiny, 0.5b, 1.5b, 7b and 14b (Qwen2.5's configs; the 7B and 14B heads are untied).

Reported per variant: real (non-padding) tokens/s (counted from the micro-batches handed to training_step, the
same way for every trainer), peak GPU memory of the timed steps and with the worst batch of an epoch added,
model FLOPs utilisation against the bf16 matrix rate measured in the same run, time from process start to the
end of the first optimizer step. FLOPs per real token (LoRA, frozen base): 4*N (forward, and backward to the
activations only) + 6*N_lora + 6*L*H*D*E[s+1] (causal attention over each sample of length s, forward and
backward), N = weights of every matmul; the LM head counts only for tokens that have a label (the JSON also
gives the MFU with the LM head counted for every token). Writes JSON (card, date, versions, every figure)
to benchmarks/results/ unless --out says otherwise, and prints a markdown table last.
"""

from __future__ import annotations

import sys
from pathlib import Path

# benchmarks/ holds a tokenize.py: run as a script, this folder must not shadow the standard library's tokenize.
if sys.path and Path(sys.path[0]).resolve() == Path(__file__).resolve().parent:
    sys.path.pop(0)

import argparse  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import os  # noqa: E402
import subprocess  # noqa: E402
import time  # noqa: E402
from datetime import datetime, timezone  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks.train_peers import PEERS, UNSLOTH  # noqa: E402

log = logging.getLogger("train_gpu")

QWEN2 = dict(max_position_embeddings=32768, rope_theta=1_000_000.0, rms_norm_eps=1e-6, tie_word_embeddings=True, hidden_act="silu")
SHAPES = {
    "tiny": dict(hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, vocab_size=4096),
    # Qwen2.5-0.5B and Qwen2.5-1.5B, as in their config.json
    "0.5b": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2, vocab_size=151936),
    "1.5b": dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2, vocab_size=151936),
    # Qwen2.5-7B and Qwen2.5-14B: untied LM heads
    "7b": dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4, vocab_size=152064,
               tie_word_embeddings=False),
    "14b": dict(hidden_size=5120, intermediate_size=13824, num_hidden_layers=48, num_attention_heads=40, num_key_value_heads=8, vocab_size=152064,
                tie_word_embeddings=False),
}
VARIANTS = ("a", "b_plain", "b", "b_compile", "b_fast", "b_gc", "c", "bq", "cq", "bq_gc", "cq_gc", "bq_gc_upcast", "b_full", "b_full_gc",
            *PEERS)
UNSLOTH_PROCESS = ("c", "cq", "cq_gc", *UNSLOTH)  # variants whose process imports unsloth first
# TrainConfig settings per tunepath variant; everything else is the default: batch 8 rows, micro-batches of
# 8,192 tokens, varlen attention on CUDA, chunked loss. compile is set explicitly: its default (auto) compiles
# runs of 200 steps or more, and a benchmark run is shorter.
TUNEPATH_VARIANTS = {
    "b_plain": dict(micro_batch_tokens=0, attention="sdpa", chunked_loss=False, compile=False),  # packing only
    "b": dict(compile=False),
    "b_compile": dict(compile=True),  # the defaults of a run of 200 steps or more
    "b_fast": dict(compile=True, micro_batch_tokens=16384),
    "b_gc": dict(compile=True, gradient_checkpointing=True),
    "c": dict(backend="unsloth"),
    "bq": dict(method="qlora", compile=True),  # QLoRA (4-bit NF4 base) on the hf backend
    "cq": dict(method="qlora", backend="unsloth"),  # QLoRA on unsloth: what `auto` picks for QLoRA
    # the paths the route's planner chooses that no run has measured yet (tests/test_route_calibration.py reads them)
    "bq_gc": dict(method="qlora", compile=True, gradient_checkpointing=True),
    "cq_gc": dict(method="qlora", backend="unsloth", gradient_checkpointing=True),
    "bq_gc_upcast": dict(method="qlora", compile=True, gradient_checkpointing=True, upcast=True),  # peft's fp32 upcast
    "b_full": dict(method="full", compile=True),
    "b_full_gc": dict(method="full", compile=True, gradient_checkpointing=True),
}

MAX_LENGTH = 2048
LORA_R, LORA_ALPHA = 16, 32
SETTINGS_SHOWN = ("method", "gradient_checkpointing", "checkpoint_offload", "micro_batch_tokens", "compile", "chunked_loss", "attention")
BASE_BATCH = 8  # samples per step in the baseline; rows per optimizer step in the tunepath variants


# ---------------------------------------------------------------------------------------------------------
# data


def make_samples(n: int, vocab: int, longest: int = 1300, seed: int = 0) -> tuple[list[list[int]], list[list[int]]]:
    """Token ids and labels of `n` chat-like samples: lognormal lengths (mean ~150, clipped to [24, longest])."""
    import numpy as np

    rng = np.random.default_rng(seed)
    lengths = np.clip(np.rint(rng.lognormal(mean=4.69, sigma=0.8, size=n)), 24, longest).astype(int)
    lengths[0] = longest  # the tail is there in every run, not only in lucky ones
    ids, labels = [], []
    for length in lengths:
        row = rng.integers(10, vocab - 10, size=length)
        prompt = max(8, int(length * rng.uniform(0.2, 0.5)))
        lab = row.copy()
        lab[:prompt] = -100
        ids.append(row.tolist())
        labels.append(lab.tolist())
    return ids, labels


def write_data(work: Path, vocab: int, n: int, max_length: int) -> dict:
    """The unpacked samples (baseline) and the packed rows (tunepath's tokenize layout) on disk."""
    import numpy as np
    import pyarrow as pa
    from datasets import Dataset

    from tunepath.tokenize.packing import best_fit_decreasing, build_rows, padding_share

    ids, labels = make_samples(n, vocab, min(1300, max_length))
    lengths = [len(x) for x in ids]
    Dataset.from_dict({"input_ids": ids, "labels": labels}).save_to_disk(str(work / f"data-{vocab}" / "samples"))
    bins = best_fit_decreasing(lengths, max_length)
    table = pa.table({"input_ids": pa.array(ids, pa.list_(pa.int32())), "labels": pa.array(labels, pa.list_(pa.int32()))})
    rows = build_rows(table, bins)
    Dataset(rows).shuffle(seed=0).flatten_indices().save_to_disk(str(work / f"data-{vocab}" / "sft" / "train"))
    arr = np.array(lengths, dtype=np.float64)
    return {
        "samples": n,
        "tokens": int(arr.sum()),
        "mean_length": round(float(arr.mean()), 1),
        "p50": int(np.percentile(arr, 50)),
        "p99": int(np.percentile(arr, 99)),
        "max_length_seen": int(arr.max()),
        "token_weighted_mean_length": round(float((arr * arr).sum() / arr.sum()), 1),
        "packed_rows": len(bins),
        "padding_share_packed": padding_share(int(arr.sum()), len(bins), max_length),
    }


# ---------------------------------------------------------------------------------------------------------
# one variant, in its own process


class SamplePadCollator:
    """What a user writes by hand (DataCollatorForSeq2Seq's behaviour): pad to the longest sample, attention mask."""

    def __init__(self, pad_id: int) -> None:
        self.pad_id = pad_id

    def __call__(self, rows):
        import torch

        width = max(len(r["input_ids"]) for r in rows)
        ids = [list(r["input_ids"]) + [self.pad_id] * (width - len(r["input_ids"])) for r in rows]
        labels = [list(r["labels"]) + [-100] * (width - len(r["labels"])) for r in rows]
        mask = [[1] * len(r["input_ids"]) + [0] * (width - len(r["input_ids"])) for r in rows]
        return {"input_ids": torch.tensor(ids), "labels": torch.tensor(labels), "attention_mask": torch.tensor(mask)}


def flops_per_token(shape: dict, lora_params: int, e_s1: float, labelled: float) -> dict:
    """Model FLOPs per real token. `per_token` counts the LM head only for tokens that have a label (the logits
    a loss needs; prompt tokens' logits are wasted work, not model work); `per_token_all_head` counts it for all."""
    d, i, layers = shape["hidden_size"], shape["intermediate_size"], shape["num_hidden_layers"]
    heads, kv = shape["num_attention_heads"], shape["num_key_value_heads"]
    hd = d // heads
    per_layer = d * d * 2 + d * kv * hd * 2 + d * i * 3
    body, head = per_layer * layers, d * shape["vocab_size"]  # the head's matmul counts once, tied or not
    attention = 6 * layers * heads * hd * e_s1
    common = 4 * body + 6 * lora_params + attention
    return {"matmul_params": body + head, "lora_params": lora_params, "labelled_share": round(labelled, 4),
            "per_token": common + 4 * head * labelled, "per_token_all_head": common + 4 * head}


def variant_spec(name: str) -> tuple[str, dict]:
    """`b_gc+micro_batch_tokens=4096+checkpoint_offload=true`: a tunepath variant with TrainConfig values changed."""
    import yaml

    base, *changes = name.split("+")
    if base not in VARIANTS:
        raise SystemExit(f"unknown variant {base!r} in {name!r}: one of {', '.join(VARIANTS)}")
    if changes and base not in TUNEPATH_VARIANTS:
        raise SystemExit(f"{name!r}: only tunepath's variants take +key=value changes")
    spec = dict(TUNEPATH_VARIANTS.get(base, {}))
    for change in changes:
        key, sep, value = change.partition("=")
        if not sep:
            raise SystemExit(f"{name!r}: {change!r} is not key=value")
        spec[key] = yaml.safe_load(value)
    return base, spec


def run_variant(args) -> dict:
    """Train `args.variant` for warmup + timed steps; returns its figures (printed as JSON by main)."""
    spawned = args.spawned
    work = Path(args.work)
    shape = SHAPES[args.shape]
    base_variant, spec = variant_spec(args.variant)
    if base_variant in UNSLOTH_PROCESS:
        from tunepath.train import unsloth_backend

        unsloth_backend.preload()  # before transformers, so unsloth can patch it
    import torch
    from datasets import load_from_disk
    from transformers import AutoModelForCausalLM, Trainer, TrainerCallback, TrainingArguments

    from tunepath.train import TrainConfig, recipe, speed, stage

    cuda = torch.cuda.is_available() and not args.cpu
    precision = "bf16" if cuda else "fp32"
    model_dir = str(work / f"model-{args.shape}")
    data_dir = work / f"data-{shape['vocab_size']}"
    pad_id = shape["vocab_size"] - 1
    timed_steps = args.timed_a if base_variant == "a" else args.timed
    steps = args.warmup + timed_steps + args.profile  # the profiled steps come after the timed ones
    out = work / f"run-{args.shape}-{args.variant}"
    result: dict = {"variant": args.variant, "shape": args.shape, "device": "cuda" if cuda else "cpu"}

    started = time.perf_counter()
    if base_variant in PEERS:
        from benchmarks.train_peers import build_trainer

        trainer = build_trainer(args.variant, model_dir, load_from_disk(str(data_dir / "samples")), out, steps, BASE_BATCH,
                                args.max_length, cuda)
        model, train, collator = trainer.model, trainer.train_dataset, trainer.data_collator
        result["micro_batch"] = [trainer.args.per_device_train_batch_size, trainer.args.gradient_accumulation_steps]
        result["gradient_checkpointing"] = bool(trainer.args.gradient_checkpointing)
    elif base_variant == "a":
        from peft import LoraConfig, get_peft_model

        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16 if cuda else torch.float32)
        model = get_peft_model(model, LoraConfig(r=LORA_R, lora_alpha=LORA_ALPHA, target_modules="all-linear", task_type="CAUSAL_LM"))
        train = load_from_disk(str(data_dir / "samples"))
        collator = SamplePadCollator(pad_id)
        targs = TrainingArguments(
            output_dir=str(out), max_steps=steps, per_device_train_batch_size=BASE_BATCH, learning_rate=2e-4,
            bf16=cuda, use_cpu=not cuda, logging_steps=1, save_strategy="no", report_to=[], seed=0,
            remove_unused_columns=False, dataloader_num_workers=0,
        )
    else:
        backend, method = spec.get("backend", "hf"), spec.get("method", "lora")
        options = engine_options(spec, work, args.shape, args.variant)
        cfg = TrainConfig(backend=backend, max_steps=steps, learning_rate=2e-4, lora_r=LORA_R, lora_alpha=LORA_ALPHA,
                          **{k: v for k, v in spec.items() if k not in ("backend", "method", *ENGINE_KEYS)}).resolved()  # `auto`: defaults
        # the train stage's own loader, batching and speed paths, exactly as `run_train` calls them
        model = stage.build_model(model_dir, cfg, method, precision, backend, args.max_length, options=options)
        collator = stage.pick_collator(backend, pad_id)
        train = load_from_disk(str(data_dir / "sft" / "train"))
        targs = recipe.build_args(cfg, out, precision, row_tokens=args.max_length)
        if backend == "hf" and cfg.attention != "sdpa":
            if cuda and next(model.parameters()).device.type != "cuda":
                model.to("cuda")  # a 4-bit model is on the GPU already (and refuses .to)
            try:
                result["attention_check"] = check_varlen(model, collator, train, cuda)
            except Exception as e:  # noqa: BLE001  (a benchmark row says why instead of dying)
                result["attention_check"] = {"error": f"{type(e).__name__}: {e}"[:500]}
        result["speed_paths"] = speed.apply(model, cfg, backend, options)
        cache = result["speed_paths"].get("compile_cache")
        if cache:  # the folder's name in the scratch folder, not a path of this machine
            folder = Path(cache["folder"])
            cache["folder"] = str(folder.relative_to(work.resolve())) if folder.is_relative_to(work.resolve()) else "outside the scratch folder"
        result["settings"] = {k: v for k, v in cfg.model_dump(mode="json").items() if k in SETTINGS_SHOWN}
        result["loss_chunk_bytes"] = options.loss_chunk_bytes  # what the route's memory model needs to estimate this run
        if cfg.checkpoint_offload and cfg.gradient_checkpointing:
            result["offload_prefetch"] = options.offload_prefetch
        if method == "qlora" and backend == "hf":
            result["qlora_upcast"] = options.upcast_float_params
        result["micro_batch"] = [targs.per_device_train_batch_size, targs.gradient_accumulation_steps]
    if cuda:  # what the model holds before any step: weights, adapters, quantisation constants
        result["loaded_gib"] = round(torch.cuda.memory_allocated() / 2**30, 2)
    if base_variant not in PEERS:
        trainer = Trainer(model=model, args=targs, train_dataset=train, data_collator=collator)
    result["load_s"] = round(time.perf_counter() - started, 2)
    result["trainable_params"] = sum(p.numel() for p in model.parameters() if p.requires_grad)

    # Real tokens per optimizer step, counted the same way for every trainer: from each micro-batch as the training
    # loop hands it to training_step (once per micro-batch, whatever the model's forward or checkpointing does).
    # The synthetic ids are drawn from [10, vocab - 10): any other id in a batch is padding.
    counts: list = []
    current = {"step": 0}
    vocab = shape["vocab_size"]
    inner_step = trainer.training_step

    def counted_step(model_, inputs, *rest, **kw):
        ids = inputs["input_ids"]
        counts.append((current["step"], int(((ids >= 10) & (ids < vocab - 10)).sum()), ids.numel()))
        return inner_step(model_, inputs, *rest, **kw)

    trainer.training_step = counted_step
    times: list[float] = []
    marks: dict = {}

    def sync():
        if cuda:
            torch.cuda.synchronize()

    class Timer(TrainerCallback):
        def on_step_begin(self, a, state, control, **kw):
            sync()
            marks["t"] = time.perf_counter()

        def on_step_end(self, a, state, control, **kw):
            sync()
            times.append(time.perf_counter() - marks["t"])
            if "first_step" not in marks:
                marks["first_step"] = time.time() - spawned
            current["step"] += 1

    if cuda:
        torch.cuda.reset_peak_memory_stats()
    trainer.add_callback(Timer())
    profiler = None
    if args.profile:
        from benchmarks.step_profile import StepProfiler

        profiler = StepProfiler(first=args.warmup + timed_steps, count=args.profile, lora_r=LORA_R)
        trainer.add_callback(profiler)
    fit = trainer.train()
    sync()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    if cuda:  # the peak of the timed steps alone; peak_gib below adds the epoch's worst batch
        result["train_peak_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    worst = worst_batch(base_variant, train, collator, trainer.args.per_device_train_batch_size)
    probe_peak(trainer, worst, cuda)

    real = [0] * steps
    slots = [0] * steps
    for step, n_real, n_slots in counts:
        if step < steps:
            real[step] += n_real
            slots[step] += n_slots
    timed = slice(args.warmup, args.warmup + timed_steps)
    seconds = sum(times[timed])
    tokens = sum(real[timed])
    lengths = data_lengths(data_dir)
    flops = flops_per_token(shape, count_lora(model), lengths["e_s1"], lengths["labelled"])
    result.update(
        steps=fit.global_step,
        timed_steps=len(times[timed]),
        real_tokens_per_s=round(tokens / seconds, 1) if seconds else None,
        padding_share_seen=round(1 - tokens / max(sum(slots[timed]), 1), 4),
        real_tokens_per_step=round(tokens / max(len(times[timed]), 1), 1),
        median_step_s=round(sorted(times[timed])[len(times[timed]) // 2], 4) if times[timed] else None,
        time_to_first_step_s=round(marks.get("first_step", float("nan")), 2),
        first_loss=losses[0] if losses else None,
        last_loss=losses[-1] if losses else None,
        flops_per_token=round(flops["per_token"]),
        matmul_params=flops["matmul_params"],
        lora_params=flops["lora_params"],
        labelled_share=flops["labelled_share"],
        achieved_tflops=float(f"{flops['per_token'] * tokens / seconds / 1e12:.4g}") if seconds else None,
        achieved_tflops_all_head=float(f"{flops['per_token_all_head'] * tokens / seconds / 1e12:.4g}") if seconds else None,
    )
    if result["median_step_s"]:
        # a recompile inside a short timed window drags the window's rate; the route's speed table takes this one
        result["steady_tokens_per_s"] = round(result["real_tokens_per_step"] / result["median_step_s"], 1)
    if cuda:
        result["peak_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        result["peak_reserved_gib"] = round(torch.cuda.max_memory_reserved() / 2**30, 2)
    if profiler is not None:
        profiled = real[args.warmup + timed_steps:]
        scale = (tokens / max(len(times[timed]), 1)) / (sum(profiled) / len(profiled)) if profiled and sum(profiled) else 1.0
        result["profile"] = profiler.summary(step_s=result["median_step_s"], scale=scale)
    if result.get("speed_paths", {}).get("compiled_layers"):
        from tunepath.train import compile_cache

        result["compile_cache_hits"] = compile_cache.hits()
    return result


# variant keys that are engine switches (tunepath.train.options.EngineOptions), not TrainConfig fields
ENGINE_KEYS = ("upcast", "loss_chunk_mb", "offload_prefetch", "attention_in_graph", "tf32", "compile_cache")


def engine_options(spec: dict, work: Path, shape: str, variant: str):
    """The EngineOptions of a variant's `+key=value` changes. compile_cache=cold starts from an empty cache
    folder of its own, compile_cache=warm reuses the folder the same variant's cold run filled."""
    import shutil

    from tunepath.train.options import EngineOptions

    options = {}
    if spec.get("upcast"):
        options["upcast_float_params"] = True
    if spec.get("loss_chunk_mb"):  # the chunked loss's fp32 logits per chunk
        options["loss_chunk_bytes"] = int(spec["loss_chunk_mb"]) << 20
    if "offload_prefetch" in spec:
        options["offload_prefetch"] = bool(spec["offload_prefetch"])
    for switch in ("attention_in_graph", "tf32"):
        if switch in spec:
            options[switch] = bool(spec[switch])
    state = spec.get("compile_cache")
    if state is not None:
        if state not in ("cold", "warm"):
            raise SystemExit(f"{variant!r}: compile_cache is cold or warm, not {state!r}")
        folder = work / "compile-cache" / f"{shape}-{without_cache(variant)}"
        if state == "cold" and folder.exists():
            shutil.rmtree(folder)
        elif state == "warm" and not folder.is_dir():
            raise SystemExit(f"{variant!r}: no cache folder {folder}: run {without_cache(variant)}+compile_cache=cold first")
        options["compile_cache"] = folder
    return EngineOptions(**options)


def without_cache(variant: str) -> str:
    return "+".join(part for part in variant.split("+") if not part.startswith("compile_cache="))


def with_cache_runs(variants: list[str]) -> list[str]:
    """--compile-cache: each compiling tunepath variant twice, from an empty cache folder, then from the filled one."""
    out = []
    for v in variants:
        base, spec = variant_spec(v)
        if base in TUNEPATH_VARIANTS and spec.get("compile") is True and "compile_cache" not in spec:
            out += [f"{v}+compile_cache=cold", f"{v}+compile_cache=warm"]
        else:
            out.append(v)
    return out


def count_lora(model) -> int:
    return sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)


def data_lengths(data_dir: Path) -> dict:
    from datasets import load_from_disk

    samples = load_from_disk(str(data_dir / "samples"))
    lengths = [len(x) for x in samples["input_ids"]]
    labelled = sum(sum(1 for t in lab[1:] if t != -100) for lab in samples["labels"])
    return {"e_s1": sum(s * (s + 1) for s in lengths) / sum(lengths), "labelled": labelled / sum(lengths)}


def worst_batch(variant: str, train, collator, batch: int):
    """The batch that sets an epoch's memory peak: the longest sample padded with others (a), else full rows."""
    if variant == "a" or variant in PEERS and "input_ids" in train.column_names and "seq_lengths" not in train.column_names:
        longest = max(range(len(train)), key=lambda i: len(train[i]["input_ids"]))
        picks = [longest] + [i for i in range(batch) if i != longest][: batch - 1]
    else:
        picks = sorted(range(len(train)), key=lambda i: -len(train[i]["input_ids"]))[:batch]
    return collator([train[i] for i in picks])


def probe_peak(trainer, batch: dict, cuda: bool) -> None:
    """One more forward and backward on `batch`, through the trainer's own loss (TRL's fused LM head, unsloth's
    patched loss): a plain `model(**batch).loss` would build full logits that these trainers never build."""
    import torch

    model = trainer.model
    device = next(p.device for p in model.parameters())
    batch = {k: v.to(device) for k, v in batch.items()}
    model.train()
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
        loss = trainer.compute_loss(model, batch)
    loss.backward()
    model.zero_grad(set_to_none=True)


def check_varlen(model, collator, train, cuda: bool) -> dict:
    """Logits with the varlen attention against transformers' SDPA with its packed-sequence mask, on one batch.

    bf16 noise on these logits is ~1e-2; a wrong mask or layout moves them by whole units."""
    import torch

    from tunepath.train.attention import use_default_attention, use_varlen_attention

    batch = collator([train[i] for i in range(2)])
    device = next(model.parameters()).device
    batch = {k: v.to(device) for k, v in batch.items() if k != "labels"}
    logits = {}
    with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
        use_default_attention(model)
        logits["sdpa"] = model(**batch).logits.float()
        use_varlen_attention(model)
        logits["varlen"] = model(**batch).logits.float()
    use_default_attention(model)
    diff = (logits["sdpa"] - logits["varlen"]).abs()
    return {"max_abs_diff": float(diff.max()), "mean_abs_diff": float(diff.mean()), "logit_scale": float(logits["sdpa"].abs().mean())}


# ---------------------------------------------------------------------------------------------------------
# set-up children: model folders, matmul rate


def build_models(work: Path, shapes: list[str], cpu: bool) -> dict:
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    device = "cuda" if torch.cuda.is_available() and not cpu else "cpu"
    built = {}
    for name in shapes:
        shape = SHAPES[name]
        config = Qwen2Config(**{**QWEN2, **shape}, bos_token_id=shape["vocab_size"] - 2, eos_token_id=shape["vocab_size"] - 2,
                             pad_token_id=shape["vocab_size"] - 1)
        torch.manual_seed(0)
        with torch.device(device):
            model = Qwen2ForCausalLM(config)
        model = model.to(torch.bfloat16 if device == "cuda" else torch.float32)
        model.save_pretrained(str(work / f"model-{name}"), safe_serialization=True)
        save_tokenizer(work, work / f"model-{name}")
        built[name] = sum(p.numel() for p in model.parameters())
        del model
    return built


def save_tokenizer(work: Path, model_dir: Path) -> None:
    """A small byte-level tokenizer beside the weights: unsloth loads one with the model (the data are ids already)."""
    from tunepath.demo import DemoConfig
    from tunepath.demo.model import _save_tokenizer, train_tokenizer

    corpus = work / "corpus.txt"
    corpus.write_text("\n\n".join(f"Where is my order {i}? It ships in {i % 7} days." for i in range(200)), encoding="utf-8")
    _save_tokenizer(train_tokenizer([corpus], 400), model_dir, DemoConfig())


def matmul_rate(cpu: bool) -> dict:
    """Dense matrix-product rate in TFLOP/s: bf16 8192^3 on GPU, fp32 1024^3 on CPU (the MFU denominator)."""
    import torch

    cuda = torch.cuda.is_available() and not cpu
    n, dtype, device = (8192, torch.bfloat16, "cuda") if cuda else (1024, torch.float32, "cpu")
    a = torch.randn(n, n, dtype=dtype, device=device)
    b = torch.randn(n, n, dtype=dtype, device=device)
    for _ in range(3):
        a @ b
    if cuda:
        torch.cuda.synchronize()
    reps = 20 if cuda else 5
    t = time.perf_counter()
    for _ in range(reps):
        a @ b
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t
    info = {"tflops": float(f"{2 * n**3 * reps / seconds / 1e12:.4g}"), "n": n, "dtype": str(dtype).replace("torch.", "")}
    if cuda:
        info["card"] = torch.cuda.get_device_name(0)
        info["memory_gib"] = round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
    return info


# ---------------------------------------------------------------------------------------------------------
# the parent: plan, spawn, collect, print


def child(args) -> int:
    logging.basicConfig(level=logging.WARNING)
    if args.child == "setup":
        value = {"models": build_models(Path(args.work), args.shapes.split(","), args.cpu), "matmul": matmul_rate(args.cpu)}
    else:
        value = run_variant(args)
    print("RESULT " + json.dumps(value), flush=True)
    return 0


def spawn(argv: list[str], timeout: int) -> dict:
    command = [sys.executable, str(Path(__file__).resolve()), *argv, "--spawned", str(time.time())]
    try:
        proc = subprocess.run(command, capture_output=True, text=True, timeout=timeout, cwd=str(REPO))
    except subprocess.TimeoutExpired as e:
        return {"error": f"timed out after {timeout} s", "tail": (e.stderr or "")[-1500:] if isinstance(e.stderr, str) else ""}
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    tail = proc.stderr[-3000:]
    oom = "OutOfMemoryError" in proc.stderr or "CUDA out of memory" in proc.stderr
    return {"error": "CUDA out of memory" if oom else f"exit {proc.returncode}", "tail": tail}


def versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for name in ("torch", "transformers", "peft", "accelerate", "datasets", "trl", "unsloth", "unsloth_zoo", "bitsandbytes"):
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = None
    return found


def table(report: dict) -> str:
    rate = report["matmul"]["tflops"]
    lines = [
        f"card: {report['card']}, {report['date']}, measured dense {report['matmul']['dtype']} matmul {rate} TFLOP/s",
        "",
        "| shape | variant | real tokens/s | steady | vs a | peak GiB | vs a | timed steps' peak | loaded GiB | MFU | first step s | padding seen |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for shape, runs in report["runs"].items():
        base = runs.get("a", {})
        for variant, r in runs.items():
            if "error" in r:
                lines.append(f"| {shape} | {variant} | {r['error']} | | | | | | | | | |")
                continue
            tps, peak = r.get("real_tokens_per_s"), r.get("peak_gib")
            speedup = f"{tps / base['real_tokens_per_s']:.2f}x" if tps and base.get("real_tokens_per_s") else ""
            mem = f"{peak / base['peak_gib']:.2f}x" if peak and base.get("peak_gib") else ""
            mfu = f"{100 * r['achieved_tflops'] / rate:.1f}%" if r.get("achieved_tflops") else ""
            lines.append(
                f"| {shape} | {variant} | {tps:,.0f} | {r.get('steady_tokens_per_s') or 0:,.0f} | {speedup} | {peak if peak is not None else '-'} | {mem} | "
                f"{r.get('train_peak_gib', '-')} | {r.get('loaded_gib', '-')} | {mfu} | "
                f"{r['time_to_first_step_s']} | {r['padding_share_seen']:.1%} |"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cpu", action="store_true", help="run on CPU even when a GPU is present")
    parser.add_argument("--tiny", action="store_true", help="the tiny model only (shapes=tiny)")
    parser.add_argument("--shapes", default=None, help="comma list of " + ",".join(SHAPES))
    parser.add_argument("--variants", default=None, help="comma list of " + ",".join(VARIANTS))
    parser.add_argument("--samples", type=int, default=None, help="synthetic samples (default: 2400 GPU, 600 CPU)")
    parser.add_argument("--warmup", type=int, default=None)
    parser.add_argument("--timed", type=int, default=None, help="timed optimizer steps for the tunepath variants")
    parser.add_argument("--timed-a", type=int, default=None, help="timed steps for the baseline (its steps are short)")
    parser.add_argument("--work", default=None, help="scratch folder (default: a temporary one)")
    parser.add_argument("--out", default=None, help="JSON path (default: benchmarks/results/train_<card>_<date>.json)")
    parser.add_argument("--timeout", type=int, default=300, help="seconds per variant process")
    parser.add_argument("--max-length", type=int, default=None, help=f"packed row length (default {MAX_LENGTH}; 512 on CPU)")
    parser.add_argument("--profile", type=int, default=0,
                        help="after the timed steps, profile this many more with torch.profiler: kernel time by kind")
    parser.add_argument("--compile-cache", action="store_true",
                        help="run each compiling variant twice, cold (empty compile cache) then warm: time to first step of each")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--variant", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--shape", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--spawned", type=float, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if args.child:
        return child(args)

    import tempfile

    import torch

    cpu = args.cpu or not torch.cuda.is_available()
    shapes = (args.shapes or ("tiny" if args.tiny or cpu else "0.5b,1.5b")).split(",")
    variants = (args.variants or ("a,b_plain,b" if cpu else "a,b_plain,b,b_compile,b_fast,c")).split(",")
    if args.compile_cache:
        variants = with_cache_runs(variants)
    args.warmup = args.warmup if args.warmup is not None else (1 if cpu else 3)
    args.timed = args.timed if args.timed is not None else (6 if cpu else 12)
    args.timed_a = args.timed_a if args.timed_a is not None else (12 if cpu else 30)
    args.samples = args.samples or (200 if cpu else 2400)
    args.max_length = args.max_length or (512 if cpu else MAX_LENGTH)
    if args.work:
        Path(args.work).mkdir(parents=True, exist_ok=True)
        return run_all(args, shapes, variants, cpu, Path(args.work))
    # a temporary folder goes when the run ends: each shape's model folder is its size in bf16 (28 GiB at 14B)
    with tempfile.TemporaryDirectory(prefix="train_gpu-") as work:
        return run_all(args, shapes, variants, cpu, Path(work))


def run_all(args, shapes: list[str], variants: list[str], cpu: bool, work: Path) -> int:
    """Every (shape, variant) in its own process, in order; the report written after each."""
    warmup, timed, timed_a, samples = args.warmup, args.timed, args.timed_a, args.samples
    flags = ["--work", str(work), "--max-length", str(args.max_length)] + (["--cpu"] if cpu else [])
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")

    report: dict = {"date": datetime.now(timezone.utc).strftime("%Y-%m-%d"), "versions": versions(), "runs": {},
                    "settings": {"max_length": args.max_length, "lora_r": LORA_R, "lora_alpha": LORA_ALPHA, "warmup": warmup,
                                 "timed_steps": timed, "timed_steps_a": timed_a, "batch": BASE_BATCH}}
    report["data"] = {v: write_data(work, v, samples, args.max_length) for v in sorted({SHAPES[s]["vocab_size"] for s in shapes})}
    setup = spawn(["--child", "setup", "--shapes", ",".join(shapes), *flags], args.timeout)
    if "error" in setup:
        raise SystemExit(f"set-up failed: {setup}")
    report["params"], report["matmul"] = setup["models"], setup["matmul"]
    report["card"] = setup["matmul"].get("card", "CPU")
    out = Path(args.out) if args.out else REPO / "benchmarks" / "results" / (
        f"train_{'cpu-tiny' if cpu else report['card'].replace(' ', '-')}_{report['date']}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    # unsloth last: its process is the slowest to start and the likeliest to fail
    in_unsloth = [v for v in variants if variant_spec(v)[0] in UNSLOTH_PROCESS]  # also checks every name
    order = [(s, v) for v in variants if v not in in_unsloth for s in shapes] + [(s, v) for v in in_unsloth for s in shapes]
    for shape, variant in order:
        log.info("running %s %s", shape, variant)
        extra = ["--warmup", str(warmup), "--timed", str(timed), "--timed-a", str(timed_a), "--profile", str(args.profile)]
        result = spawn(["--child", "run", "--variant", variant, "--shape", shape, *extra, *flags], args.timeout)
        report["runs"].setdefault(shape, {})[variant] = result
        log.info("%s %s: %s", shape, variant, {k: result.get(k) for k in ("real_tokens_per_s", "peak_gib", "time_to_first_step_s", "error")})
        out.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    for shape in report["runs"]:
        runs = report["runs"][shape]
        report["runs"][shape] = {v: runs[v] for v in sorted(runs, key=lambda v: (VARIANTS.index(variant_spec(v)[0]), v))}
    out.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    print(table(report))
    for shape, runs in report["runs"].items():
        for variant, r in runs.items():
            if "profile" in r and "kernel_ms_per_step" in r["profile"]:
                from benchmarks.step_profile import table as profile_table

                print(f"\n{shape} {variant}, profiled steps:\n" + profile_table(r["profile"]))
    print(f"\nfull figures: {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
