"""The peers a user would pick instead of tunepath, set up as their documentation shows, for benchmarks/train_gpu.py.

  trl          TRL 1.15 SFTTrainer, its defaults: packing (best-fit decreasing, padding-free), gradient
               checkpointing on, LoRA through `peft_config`
  trl_nogc     the same with gradient checkpointing off (the fastest plain TRL setting)
  trl_liger    trl_nogc with Liger kernels (`use_liger_kernel`: fused RMSNorm, SwiGLU, RoPE, linear + cross-entropy)
  u            unsloth as its notebooks show: FastLanguageModel, get_peft_model with use_gradient_checkpointing
               "unsloth", trl's SFTTrainer (patched by unsloth) with packing
  u_nogc       u with gradient checkpointing off
  uq           u on a 4-bit base (load_in_4bit=True): unsloth's QLoRA

Every peer gets the same pre-tokenized samples (input_ids, labels with the prompt masked) as the baseline, LoRA
r=16 / alpha 32 on every linear layer of the decoder, batch 8 packed rows of max_length tokens per optimizer step
(the same ~16k real tokens as tunepath's rows), learning rate 2e-4, bf16. unsloth variants must run in a process of
their own, with unsloth imported before transformers (train_gpu.run_variant does that).
"""

from __future__ import annotations

from pathlib import Path

TRL = {"trl": dict(gradient_checkpointing=True), "trl_nogc": dict(gradient_checkpointing=False),
       "trl_liger": dict(gradient_checkpointing=False, use_liger_kernel=True)}
UNSLOTH = {"u": dict(gc="unsloth", four_bit=False), "u_nogc": dict(gc=False, four_bit=False), "uq": dict(gc="unsloth", four_bit=True)}
PEERS = (*TRL, *UNSLOTH)
LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def sft_config(out: Path, steps: int, batch: int, max_length: int, cuda: bool, **extra):
    from trl import SFTConfig

    return SFTConfig(
        output_dir=str(out), max_steps=steps, per_device_train_batch_size=batch, learning_rate=2e-4, bf16=cuda,
        use_cpu=not cuda, logging_steps=1, save_strategy="no", report_to=[], seed=0, max_length=max_length,
        packing=True, dataloader_num_workers=0, **extra,
    )


def build_trainer(variant: str, model_dir: str, samples, out: Path, steps: int, batch: int, max_length: int, cuda: bool):
    """The peer's trainer for `variant`, ready to `.train()`."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    if variant in UNSLOTH:
        return _unsloth(UNSLOTH[variant], model_dir, tokenizer, samples, out, steps, batch, max_length, cuda)
    import torch
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM
    from trl import SFTTrainer

    spec = TRL[variant]
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16 if cuda else torch.float32)
    lora = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")
    args = sft_config(out, steps, batch, max_length, cuda, **spec)
    return SFTTrainer(model=model, args=args, train_dataset=samples, processing_class=tokenizer, peft_config=lora)


def _unsloth(spec: dict, model_dir: str, tokenizer, samples, out: Path, steps: int, batch: int, max_length: int, cuda: bool):
    import torch
    from unsloth import FastLanguageModel  # noqa: I001  (imported first by the caller's preload)
    from trl import SFTTrainer

    model, _ = FastLanguageModel.from_pretrained(model_name=model_dir, max_seq_length=max_length, dtype=torch.bfloat16,
                                                 load_in_4bit=spec["four_bit"], fix_tokenizer=False)
    model = FastLanguageModel.get_peft_model(model, r=16, lora_alpha=32, lora_dropout=0, target_modules=LINEAR, bias="none",
                                             use_gradient_checkpointing=spec["gc"], random_state=3407)
    args = sft_config(out, steps, batch, max_length, cuda)
    return SFTTrainer(model=model, args=args, train_dataset=samples, processing_class=tokenizer)
