"""Loading the models that are compared: the start model, the tuned model (base + adapter or full weights), a
saved model folder; and where they run (device, dtype).

A QLoRA adapter is evaluated on the base loaded unquantized, in the evaluation dtype: that is the model the
merge stage ships (it merges into an unquantized copy of the base), so the gates judge what is registered.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from tunepath.errors import StageError

log = logging.getLogger(__name__)

ADAPTER_METHODS = ("lora", "qlora")


class AdapterMismatch(StageError):
    """The adapter cannot be applied to the base it names (shapes, rank or target modules differ)."""


@dataclass(frozen=True)
class Runtime:
    """Where models run while they are scored: 'cuda' or 'cpu', and 'fp32' or 'bf16'."""

    device: str
    precision: str

    @property
    def dtype(self):
        import torch

        return torch.bfloat16 if self.precision == "bf16" else torch.float32


def pick_runtime(precision: str) -> Runtime:
    """auto: bf16 on a GPU that supports it, else fp32; bf16 asked for on a machine without one is an error."""
    import torch

    cuda = torch.cuda.is_available()
    bf16_ok = cuda and torch.cuda.is_bf16_supported()
    if precision == "auto":
        precision = "bf16" if bf16_ok else "fp32"
    elif precision == "bf16" and not bf16_ok:
        raise ValueError("precision bf16 needs a GPU that supports it; use fp32 or auto on this machine")
    return Runtime("cuda" if cuda else "cpu", precision)


def load_folder(path: str | Path, runtime: Runtime, trust_remote_code: bool = False):
    """A causal LM from a local folder (or hub id given by the user as model.base), in eval mode on the runtime."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=runtime.dtype, trust_remote_code=trust_remote_code)
    return model.to(runtime.device).eval()


def load_tuned(train: dict, train_dir: Path, runtime: Runtime, base=None, trust_remote_code: bool = False):
    """The tuned model described by the train stage's metrics.json: base + adapter, or the full weights.

    `base` (already loaded from train['start_model']) is wrapped in place when given; peft changes its modules.
    """
    method = train["method"]
    if method in ADAPTER_METHODS:
        base = base if base is not None else load_folder(train["start_model"], runtime, trust_remote_code)
        return apply_adapter(base, train_dir / "adapter")
    if method == "full":
        return load_folder(train_dir / "model", runtime, trust_remote_code)
    raise ValueError(f"{train_dir / 'metrics.json'}: unknown training method {method!r}; expected lora, qlora or full")


def apply_adapter(base, adapter_dir: Path):
    """PeftModel over `base`; an adapter that does not fit the base raises AdapterMismatch saying so."""
    from peft import PeftModel

    if not (adapter_dir / "adapter_config.json").exists():
        raise FileNotFoundError(f"{adapter_dir}: no adapter_config.json; the train stage writes the LoRA adapter there")
    try:
        model = PeftModel.from_pretrained(base, str(adapter_dir))
    except (RuntimeError, ValueError, KeyError) as e:
        raise AdapterMismatch(
            f"{adapter_dir}: the adapter does not fit the base model ({str(e).splitlines()[0][:300]}). "
            "Was it trained on another base, or edited after training? Re-run the train stage."
        ) from e
    return model.eval()


def load_quantized_base(path: str, quantization: dict | None, trust_remote_code: bool = False):
    """The base in 4 bits as QLoRA trained it (GPU and bitsandbytes only)."""
    import torch
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    q = {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4", "bnb_4bit_use_double_quant": True,
         "bnb_4bit_compute_dtype": "bfloat16", **(quantization or {})}
    q["bnb_4bit_compute_dtype"] = getattr(torch, str(q["bnb_4bit_compute_dtype"]).replace("torch.", ""))
    model = AutoModelForCausalLM.from_pretrained(
        path, quantization_config=BitsAndBytesConfig(**q), device_map={"": 0}, trust_remote_code=trust_remote_code
    )
    return model.eval()
