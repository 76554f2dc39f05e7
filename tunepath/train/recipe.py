"""The hf backend's recipe: a linear script over transformers.Trainer and peft.

trl's SFTTrainer is not used for CPT/SFT: the tokenize stage already rendered, masked and packed the data, and
trl 1.15's SFTTrainer cannot train on a CPU-only torch (its fused loss needs Triton). Plain Trainer on
pre-tokenized rows behaves the same on CPU and GPU, and under unsloth.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

from tunepath.collate import PadCollator
from tunepath.train import TrainConfig

log = logging.getLogger(__name__)

SUPPORTED_STAGES = ("cpt", "sft")
SUPPORTED_METHODS = ("lora", "full")


def check_plan(stages: list[str], method: str) -> None:
    """Fail before any work when the plan asks for something this train stage cannot do yet."""
    if not stages:
        raise ValueError(
            "route plan has no training stages (training is not advised for this profile; see artifacts/route/plan.md). "
            "Force a route with route.force_stages if you want to train anyway."
        )
    unsupported = [s for s in stages if s not in SUPPORTED_STAGES]
    if unsupported:
        raise NotImplementedError(
            f"route plan asks for stage(s) {unsupported}; this train stage runs {list(SUPPORTED_STAGES)} so far. "
            "Force a supported route with route.force_stages."
        )
    if method not in SUPPORTED_METHODS:
        raise NotImplementedError(
            f"route plan asks for method {method!r}; this train stage runs {list(SUPPORTED_METHODS)} so far. "
            "Force one with route.force_method."
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


def build_model(base: str, cfg: TrainConfig, method: str, precision: str, trust_remote_code: bool):
    """Load the start model and, for LoRA, wrap it with fresh adapters."""
    import torch
    from transformers import AutoModelForCausalLM

    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    model = AutoModelForCausalLM.from_pretrained(
        base, dtype=dtype, trust_remote_code=trust_remote_code, use_safetensors=True
    )
    # With the KV cache on, the forward pass skips packed-sequence detection and packed samples attend to
    # each other (measured: logits off by 0.27 on a tiny Qwen2). Training never needs the cache.
    model.config.use_cache = False
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if method == "lora":
        from peft import LoraConfig, get_peft_model

        lora = LoraConfig(
            r=cfg.lora_r,
            lora_alpha=cfg.lora_alpha,
            lora_dropout=cfg.lora_dropout,
            target_modules=cfg.target_modules,
            use_dora=cfg.use_dora,
            task_type="CAUSAL_LM",
        )
        if cfg.gradient_checkpointing:
            model.enable_input_require_grads()
        model = get_peft_model(model, lora)
    return model


def build_args(cfg: TrainConfig, out_dir: Path, precision: str):
    import torch
    from transformers import TrainingArguments

    save = cfg.save_steps > 0
    return TrainingArguments(
        output_dir=str(out_dir / "checkpoints"),
        max_steps=cfg.max_steps,
        num_train_epochs=cfg.epochs,
        per_device_train_batch_size=cfg.batch_size,
        gradient_accumulation_steps=cfg.grad_accum,
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
    )


def train_stage(model, stage: str, data_dir: Path, tokenizer, cfg: TrainConfig, out_dir: Path, precision: str) -> dict:
    """Train one plan stage in place on `model`; returns its metrics and per-step log."""
    from datasets import load_from_disk
    from transformers import Trainer, TrainerCallback

    train_path = data_dir / stage / "train"
    if not train_path.exists():
        raise FileNotFoundError(
            f"{train_path}: no tokenized {stage} data. The route plan asks for {stage!r} but the tokenize stage "
            f"found no records of that kind; add data or force another route."
        )
    train_set = load_from_disk(str(train_path))
    steps: list[dict] = []

    class StepLog(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                steps.append({"stage": stage, "step": state.global_step, **{k: float(v) for k, v in logs.items()}})

    trainer = Trainer(
        model=model,
        args=build_args(cfg, out_dir / stage, precision),
        train_dataset=train_set,
        data_collator=PadCollator(tokenizer.pad_token_id),
        processing_class=tokenizer,
        callbacks=[StepLog()],
    )
    started = time.perf_counter()
    result = trainer.train()
    seconds = time.perf_counter() - started
    tokens = sum(len(r) for r in train_set["input_ids"])
    epochs_seen = result.metrics.get("epoch", 1.0)
    metrics = {
        "stage": stage,
        "steps": result.global_step,
        "train_loss": float(result.training_loss),
        "seconds": round(seconds, 2),
        "tokens_per_second": round(tokens * epochs_seen / seconds, 1) if seconds else None,
        "rows": len(train_set),
    }
    (out_dir / stage).mkdir(parents=True, exist_ok=True)
    trainer.state.save_to_json(str(out_dir / stage / "trainer_state.json"))
    log.info("%s: %d steps, final loss %.4f, %.1f s", stage, result.global_step, steps[-1]["loss"] if steps else float("nan"), seconds)
    return {"metrics": metrics, "steps": steps}


def write_loss_curve(steps: list[dict], path: Path) -> None:
    """A CSV that `dvc plots` reads: one row per logged step, a global step across plan stages."""
    lines = ["step,stage,loss,learning_rate,grad_norm"]
    offset, last_stage, last_step = 0, None, 0
    for s in steps:
        if s["stage"] != last_stage and last_stage is not None:
            offset += last_step
        last_stage, last_step = s["stage"], s["step"]
        lines.append(f"{offset + s['step']},{s['stage']},{s['loss']:.6f},{s.get('learning_rate', 0):.6g},{s.get('grad_norm', 0):.6g}")
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def save_outputs(model, tokenizer, method: str, out_dir: Path, summary: dict) -> None:
    model.config.use_cache = True  # inference wants the cache back
    if method == "lora":
        model.save_pretrained(str(out_dir / "adapter"), safe_serialization=True)
    else:
        model.save_pretrained(str(out_dir / "model"), safe_serialization=True)
        tokenizer.save_pretrained(str(out_dir / "model"))
    tokenizer.save_pretrained(str(out_dir / "tokenizer"))
    (out_dir / "metrics.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
