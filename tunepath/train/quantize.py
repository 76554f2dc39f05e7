"""QLoRA on the hf backend: the base model loaded in 4-bit NF4 through bitsandbytes, ready for LoRA adapters.

Usage (GPU only):

    from tunepath.train import TrainConfig
    from tunepath.train.quantize import load_4bit
    model = load_4bit("models/demo", TrainConfig())   # then wrap with peft.get_peft_model as for LoRA

The adapters train in bf16 on top of frozen 4-bit weights. To merge, reload the base in bf16 and merge the
adapter there (merging into 4-bit weights loses precision).
"""

from __future__ import annotations

import importlib.util
import logging
import os

from tunepath.train import TrainConfig

log = logging.getLogger(__name__)


class QLoRAUnavailable(ValueError):
    """QLoRA cannot run on this machine (no CUDA GPU, or bitsandbytes missing)."""


def check_qlora_support() -> None:
    """Fail early, before any loading, when 4-bit training cannot run here."""
    import torch

    if not torch.cuda.is_available():
        raise QLoRAUnavailable(
            "QLoRA needs a CUDA GPU: bitsandbytes' 4-bit kernels do not run on CPU. "
            "On this machine use method lora (route.force_method: lora), or train on a GPU machine."
        )
    if importlib.util.find_spec("bitsandbytes") is None:
        raise QLoRAUnavailable("QLoRA needs bitsandbytes: pip install 'tunepath[gpu]' (or bitsandbytes), or use method lora")


def load_4bit(base: str, cfg: TrainConfig, trust_remote_code: bool = False, upcast_float_params: bool = False):
    """Load `base` with NF4 4-bit linear weights (double quantisation, bf16 compute), frozen, ready for adapters.

    The embeddings, LM head and norms stay in bf16. `peft.prepare_model_for_kbit_training` casts them to fp32
    (a guard for fp16 training): at 7B that is 2 GiB more for the embedding and head alone, an fp32 residual
    stream (twice the checkpointed activations), and the LM head's matmul in fp32. bf16 training needs none of
    it; upcast_float_params=True restores peft's way (the benchmark measures both).
    """
    check_qlora_support()
    import torch
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    quant = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_compute_dtype=torch.bfloat16,
        bnb_4bit_use_double_quant=True,
    )
    # Each process of a multi-GPU launch puts its copy on its own card; bitsandbytes weights cannot move later.
    device = int(os.environ.get("LOCAL_RANK", torch.cuda.current_device()))
    model = AutoModelForCausalLM.from_pretrained(
        base,
        quantization_config=quant,
        dtype=torch.bfloat16,
        device_map={"": device},
        trust_remote_code=trust_remote_code,
        use_safetensors=True,
    )
    # Training never needs the KV cache, and with it on, packed samples attend to each other.
    model.config.use_cache = False
    if upcast_float_params:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=cfg.gradient_checkpointing, gradient_checkpointing_kwargs={"use_reentrant": False}
        )
    else:
        for param in model.parameters():
            param.requires_grad = False
        if cfg.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            model.enable_input_require_grads()  # the frozen embedding's output must carry gradients into the layers
    log.info("loaded %s in 4-bit NF4 (double quantisation, bf16 compute) on cuda:%d", base, device)
    return model
