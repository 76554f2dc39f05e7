"""The recipe: a linear script over transformers.Trainer and peft, shared by the hf and unsloth backends.

trl's SFTTrainer is not used for pretraining, CPT or SFT: the tokenize stage already rendered, masked and
packed the data, and trl 1.15's SFTTrainer cannot train on a CPU-only torch (its fused loss needs Triton).
Plain Trainer on pre-tokenized rows behaves the same on CPU and GPU, and under unsloth. DPO is a Trainer
with DPO's loss (`tunepath.train.dpo`, which says why trl's DPOTrainer is not used either); KTO likewise
(`tunepath.train.kto`).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from tunepath.errors import StageError
from tunepath.train import TrainConfig
from tunepath.train import checkpoints, tracking

log = logging.getLogger(__name__)

# plan stage -> tokenized data folder; pretraining from scratch learns from the same raw-text blocks as CPT
DATA_FOLDERS = {"pretrain": "cpt", "cpt": "cpt", "sft": "sft", "dpo": "dpo", "kto": "kto"}
METHODS = ("full", "lora", "qlora")
ADAPTER_METHODS = ("lora", "qlora")


class TrainingOOM(StageError):
    """The GPU ran out of memory; the message names the settings that reduce memory and their current values."""


def check_plan(stages: list[str], method: str, start_from: str) -> None:
    """Fail before any work when the plan asks for something this train stage cannot do."""
    if not stages:
        raise ValueError(
            "route plan has no training stages (training is not advised for this profile; see artifacts/route/plan.md). "
            "Force a route with route.force_stages if you want to train anyway."
        )
    unknown = [s for s in stages if s not in DATA_FOLDERS]
    if unknown:
        raise ValueError(f"route plan asks for stage(s) {unknown}; the train stage runs {list(DATA_FOLDERS)}")
    if method not in METHODS:
        raise ValueError(f"route plan asks for method {method!r}; the train stage runs {list(METHODS)}")
    if start_from == "scratch" and method != "full":
        raise ValueError(
            f"route plan starts from scratch (random weights) with method {method!r}: an adapter on random weights "
            "learns almost nothing. Use route.force_method: full, or start from the base model (drop 'pretrain' from route.force_stages)."
        )


def pick_precision(cfg: TrainConfig) -> str:
    import torch

    if cfg.precision != "auto":
        if cfg.precision == "bf16" and not (torch.cuda.is_available() and torch.cuda.is_bf16_supported()):
            raise ValueError("train.precision: bf16 needs a GPU that supports it; use fp32 or auto on this machine")
        return cfg.precision
    if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return "bf16"
    return "fp32"


def load_dtype(method: str, precision: str):
    """Weights dtype: adapters train on a bf16 base; full fine-tuning keeps fp32 master weights under bf16 autocast
    (pure-bf16 AdamW updates round away small steps; the route's memory estimate counts the fp32 copy)."""
    import torch

    return torch.bfloat16 if precision == "bf16" and method != "full" else torch.float32


def load_pretrained(base: str, cfg: TrainConfig, method: str, precision: str, trust_remote_code: bool):
    """The start model as transformers loads it (hf backend, full or LoRA)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        base, dtype=load_dtype(method, precision), trust_remote_code=trust_remote_code, use_safetensors=True
    )
    # With the KV cache on, the forward pass skips packed-sequence detection and packed samples attend to
    # each other (measured: logits off by 0.27 on a tiny Qwen2). Training never needs the cache.
    model.config.use_cache = False
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


def init_from_config(base: str, out: Path, tokenizer, seed: int, trust_remote_code: bool) -> Path:
    """Random weights in `base`'s architecture (pretraining from scratch), seeded, saved as the run's start model."""
    from transformers import AutoConfig, AutoModelForCausalLM, set_seed

    config = AutoConfig.from_pretrained(base, trust_remote_code=trust_remote_code)
    set_seed(seed)
    model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    model.save_pretrained(str(out), safe_serialization=True)
    tokenizer.save_pretrained(str(out))
    log.info("pretraining from scratch: %s random parameters in %s's architecture (seed %d), saved to %s",
             f"{sum(p.numel() for p in model.parameters()):,}", base, seed, out)
    return out


def adaptable_modules(model) -> dict[str, str]:
    """Full name -> leaf name of every layer peft's LoRA can wrap (linear, embedding, convolution)."""
    import torch

    kinds = (torch.nn.Linear, torch.nn.Embedding, torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d)
    try:
        from transformers.pytorch_utils import Conv1D  # GPT-2's linear layers

        kinds += (Conv1D,)
    except ImportError:
        pass
    return {name: name.rsplit(".", 1)[-1] for name, module in model.named_modules() if isinstance(module, kinds)}


def check_target_modules(model, target_modules: str | list[str]) -> None:
    """train.target_modules must name layers of this model (peft's own error names neither the key nor the layers).

    peft matches a list entry against a module's full name or its dotted suffix, and a string other than
    'all-linear' as a regular expression over the full name; the same rules here."""
    import re

    from tunepath.params import ConfigError

    if target_modules == "all-linear":
        return
    layers = adaptable_modules(model)
    if isinstance(target_modules, str):
        if not any(re.fullmatch(target_modules, name) for name in layers):
            missing = [target_modules]
        else:
            return
    else:
        missing = [t for t in target_modules if not any(n == t or n.endswith("." + t) for n in layers)]
    if missing:
        valid = sorted(set(layers.values()))
        raise ConfigError(
            f"train.target_modules: {', '.join(repr(m) for m in missing)} match{'es' if len(missing) == 1 else ''} no "
            f"layer of {type(model).__name__}; layers that can take adapters: {', '.join(valid) or 'none'} "
            "(or use 'all-linear')")


def add_lora(model, cfg: TrainConfig):
    """Fresh LoRA (or DoRA) adapters; with lora_train_embeddings the embeddings and LM head train in full too."""
    from peft import LoraConfig, get_peft_model

    check_target_modules(model, cfg.target_modules)

    extra = {}
    if cfg.lora_train_embeddings:
        extra["modules_to_save"] = ["embed_tokens", "lm_head"]
        # a tied LM head is the embedding matrix: keep the two trained copies one tensor, or they drift apart
        extra["ensure_weight_tying"] = bool(getattr(model.config, "tie_word_embeddings", False))
    lora = LoraConfig(
        r=cfg.lora_r,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout,
        target_modules=cfg.target_modules,
        use_dora=cfg.use_dora,
        task_type="CAUSAL_LM",
        **extra,
    )
    if cfg.gradient_checkpointing:
        model.enable_input_require_grads()
    return get_peft_model(model, lora)


SPECIAL_IDS = ("bos_token_id", "eos_token_id", "pad_token_id")


def align_special_tokens(model, tokenizer) -> dict:
    """The model's special token ids set to the tokenizer's, as transformers' Trainer does before training, but
    said once in one line: the Trainer warns on every stage of every run where they differ (a tokenizer without a
    BOS token, a pad token added for training). Returns what changed."""
    from transformers import trainer_utils

    before = {k: getattr(model.config, k, None) for k in SPECIAL_IDS}
    quiet = logging.getLogger(trainer_utils.__name__)
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        trainer_utils.align_special_tokens(model, tokenizer)
    finally:
        quiet.setLevel(level)
    changed = {k: getattr(model.config, k, None) for k in SPECIAL_IDS if getattr(model.config, k, None) != before[k]}
    if changed:
        log.info("model config's special tokens set to the tokenizer's: %s", ", ".join(f"{k} {before[k]} -> {v}" for k, v in changed.items()))
    return changed


def build_args(cfg: TrainConfig, output_dir: Path, precision: str, row_tokens: int = 0):
    """TrainingArguments for one plan stage; rows of up to `row_tokens` tokens are split into micro-batches."""
    import torch
    from transformers import TrainingArguments

    from tunepath.train.speed import micro_batches

    cfg = cfg.resolved()  # callers outside the train stage (the benchmark) may pass `auto` knobs
    save = cfg.save_steps > 0
    rows, accum = micro_batches(cfg.batch_size, cfg.grad_accum, row_tokens, cfg.micro_batch_tokens)
    args = TrainingArguments(
        output_dir=str(output_dir),
        max_steps=cfg.max_steps,
        num_train_epochs=cfg.epochs,
        per_device_train_batch_size=rows,
        gradient_accumulation_steps=accum,
        learning_rate=cfg.learning_rate,
        lr_scheduler_type=cfg.lr_scheduler,
        warmup_steps=cfg.warmup_steps,
        weight_decay=cfg.weight_decay,
        max_grad_norm=cfg.max_grad_norm,
        logging_steps=cfg.logging_steps,
        save_strategy="steps" if save else "no",
        save_steps=cfg.save_steps if save else 500,
        seed=cfg.seed,
        data_seed=cfg.seed,
        bf16=precision == "bf16",
        use_cpu=not torch.cuda.is_available(),
        report_to=[],
        remove_unused_columns=False,
        dataloader_num_workers=0,
        include_num_input_tokens_seen="non_padding",
        # tunepath's own bar (tracking.step_callback) shows ETA and tokens/s; the Trainer's would print every log dict
        disable_tqdm=True,
    )
    if args.n_gpu > 1:
        # one process seeing several GPUs: transformers would wrap the model in nn.DataParallel (slow, and it
        # cannot gather the chunked loss's outputs); several GPUs are used through accelerate launch instead
        log.info("%d GPUs visible to one process (train.num_processes 1): training on %s only", args.n_gpu, args.device)
        args._n_gpu = 1
    return args


def oom_message(stage: str, method: str, cfg: TrainConfig, max_length: int) -> str:
    cfg = cfg.resolved()
    b, acc, tokens = cfg.batch_size, cfg.grad_accum, cfg.micro_batch_tokens
    knobs = []
    if max_length and (tokens == 0 or tokens > max_length):
        now = tokens or b * max_length
        knobs.append(f"train.micro_batch_tokens {tokens} -> {max(max_length, now // 2)} (the same optimizer steps in smaller pieces)")
    knobs += [
        f"train.batch_size {b} -> {max(1, b // 2)}" + (f" (and train.grad_accum {acc} -> {acc * 2} to keep the effective batch)" if b > 1 else ""),
        f"tokenize.max_length {max_length} -> {max(64, max_length // 2)} (rerun tokenize)",
    ]
    if not cfg.gradient_checkpointing:
        knobs.append("train.gradient_checkpointing false -> true (about 30% slower)")
    if method == "full":
        knobs.append("method full -> lora (route.force_method: lora)")
    elif method == "lora":
        knobs.append("method lora -> qlora (route.force_method: qlora; 4-bit base)")
    return (f"CUDA ran out of memory in plan stage {stage!r} (method {method}). Turn one of these knobs: " + "; ".join(knobs) + ".")


def train_stage(model, stage: str, position: tuple[int, int], tokenize_dir: Path, tokenizer, collator, cfg: TrainConfig,
                ckpt_root: Path, precision: str, method: str, max_length: int, step_offset: int,
                sink=None, on_progress=None) -> dict:
    """Train one plan stage in place on `model`, resuming from its last complete checkpoint if there is one."""
    import torch
    from datasets import load_from_disk
    from transformers import Trainer

    train_path = tokenize_dir / DATA_FOLDERS[stage] / "train"
    if not train_path.exists():
        raise FileNotFoundError(
            f"{train_path}: no tokenized {DATA_FOLDERS[stage]} data. The route plan asks for {stage!r} but the tokenize "
            "stage found no records of that kind; add data or force another route (route.force_stages)."
        )
    train_set = load_from_disk(str(train_path))
    stage_dir = ckpt_root / stage
    callbacks = [tracking.step_callback(stage, position[0], position[1], step_offset, sink, on_progress)]
    resume = None
    if cfg.save_steps > 0:
        from accelerate import PartialState

        callbacks.append(checkpoints.marker_callback(cfg.checkpoint_limit))
        dist = PartialState()
        if dist.is_main_process and stage_dir.is_dir():
            checkpoints.prune(stage_dir, cfg.checkpoint_limit)
        dist.wait_for_everyone()
        resume = checkpoints.last_complete(stage_dir)
    # a DPO row is a pair: prompt + chosen and prompt + rejected; a KTO row is prompt + answer and + a mismatched answer
    args = build_args(cfg, stage_dir, precision, row_tokens=max_length * (2 if stage in ("dpo", "kto") else 1))
    if args.per_device_train_batch_size != cfg.batch_size:
        log.info("%s: batches of %d rows run as %d micro-batches of %d rows (train.micro_batch_tokens %d)", stage,
                 cfg.batch_size, args.gradient_accumulation_steps // cfg.grad_accum, args.per_device_train_batch_size,
                 cfg.micro_batch_tokens)
    align_special_tokens(model, tokenizer)
    if stage == "dpo":
        from tunepath.train import dpo

        trainer = dpo.build_trainer(model, args, train_set, tokenizer, cfg.dpo_beta, precision, callbacks)
    elif stage == "kto":
        from tunepath.train import kto

        trainer = kto.build_trainer(model, args, train_set, tokenizer, cfg.kto_beta, cfg.kto_desirable_weight,
                                    cfg.kto_undesirable_weight, precision, callbacks)
    else:
        trainer = Trainer(model=model, args=args, train_dataset=train_set, data_collator=collator,
                          processing_class=tokenizer, callbacks=callbacks)
    saved = _saved_state(resume) if resume is not None else {}
    finished = bool(saved) and saved.get("global_step", 0) >= saved.get("max_steps", float("inf"))
    from transformers import PrinterCallback

    trainer.remove_callback(PrinterCallback)  # it prints every log dict to stdout; the step callback reports progress
    if resume is not None:
        log.info("%s: %s %s (step %d)", stage, "finished earlier, loading" if finished else "resuming from", resume, saved.get("global_step", -1))
    started = time.perf_counter()
    try:
        if finished:
            # Trainer.train from a checkpoint at max_steps would still run one more step: load it instead
            from transformers import TrainerState

            trainer._load_from_checkpoint(str(resume))
            trainer.state = TrainerState.load_from_json(str(resume / "trainer_state.json"))
        else:
            trainer.train(resume_from_checkpoint=str(resume) if resume is not None else None)
    except torch.OutOfMemoryError as e:
        raise TrainingOOM(oom_message(stage, method, cfg, max_length)) from e
    seconds = time.perf_counter() - started
    state = trainer.state
    session_tokens = state.num_input_tokens_seen - int(saved.get("num_input_tokens_seen", 0))
    steps = tracking.logged_steps(state.log_history, stage)
    metrics = {
        "stage": stage,
        "steps": state.global_step,
        "resumed_from_step": checkpoints.step_of(resume) if resume is not None else None,
        "train_loss": sum(s["loss"] for s in steps) / len(steps) if steps else None,
        "final_loss": steps[-1]["loss"] if steps else None,
        "seconds": round(seconds, 2),
        "tokens": state.num_input_tokens_seen,
        "tokens_per_second": round(session_tokens / seconds, 1) if seconds and session_tokens else None,
        "rows": len(train_set),
        "micro_batch_rows": args.per_device_train_batch_size,
        "grad_accum_steps": args.gradient_accumulation_steps,
    }
    final = f"{metrics['final_loss']:.4f}" if metrics["final_loss"] is not None else "none"
    log.info("%s: %d steps in %.1f s, final loss %s, %s tokens/s", stage, state.global_step, seconds, final,
             f"{metrics['tokens_per_second']:,.0f}" if metrics["tokens_per_second"] else "?")
    return {"metrics": metrics, "steps": steps, "trainer": trainer}


def _saved_state(checkpoint: Path) -> dict:
    import json

    return json.loads((checkpoint / "trainer_state.json").read_text(encoding="utf-8"))


def save_outputs(trainer, tokenizer, method: str, out_dir: Path) -> str:
    """Adapter or full weights, the tokenizer with the training chat template; returns the weights folder name.

    Through `Trainer.save_model`, which gathers sharded (FSDP) weights and writes on the main process only.
    """
    trainer.model.config.use_cache = True  # inference wants the cache back
    weights = "adapter" if method in ADAPTER_METHODS else "model"
    trainer.save_model(str(out_dir / weights))
    if trainer.args.should_save:
        # a pickle of TrainingArguments: unsafe to load and redundant with metrics.json and params.yaml
        (out_dir / weights / "training_args.bin").unlink(missing_ok=True)
        tokenizer.save_pretrained(str(out_dir / "tokenizer"))
    return weights
