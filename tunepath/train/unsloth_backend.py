"""The unsloth backend: the start model loaded and wrapped by unsloth, trained by the same plain
`transformers.Trainer` recipe as the hf backend (same rows, same artifacts).

Usage (GPU with the `gpu` extra; run it in its own process, see below):

    from tunepath.train import TrainConfig
    from tunepath.train.unsloth_backend import build_model, make_collator
    model = build_model("models/demo", TrainConfig(), "lora", "bf16", max_length=2048)
    collator = make_collator(tokenizer.pad_token_id)   # use this, not PadCollator, with unsloth

unsloth is imported inside `build_model` only: importing it patches transformers, trl and peft for the whole
process (it replaces trl's trainers and attention code), so a process that imported it is an unsloth process.
Never import this module's functions in the CPU test process, and compare backends in separate processes.

Packed rows: unsloth isolates packed samples only in a batch of ONE row whose position ids restart at each
sample (it then derives the sample lengths and runs varlen attention). Rows of a [B, L] batch would attend
across sample boundaries, so `make_collator` flattens a batch into one row.
"""

from __future__ import annotations

import logging
import os

from tunepath.collate import IGNORE_INDEX
from tunepath.train import TrainConfig

log = logging.getLogger(__name__)

METHODS = ("lora", "qlora", "full")


class UnslothUnavailable(ValueError):
    """The unsloth backend cannot run here (no CUDA, unsloth missing, or an unsupported setting)."""


def check_settings(cfg: TrainConfig, method: str, precision: str) -> None:
    """Reject what unsloth cannot do, before the (slow) import."""
    import importlib.util

    import torch

    if not torch.cuda.is_available():
        raise UnslothUnavailable("train.backend unsloth needs a CUDA GPU; use backend hf (or auto) on this machine")
    if importlib.util.find_spec("unsloth") is None:
        raise UnslothUnavailable("train.backend unsloth: unsloth is not installed; pip install 'tunepath[gpu]' or use backend hf")
    if method not in METHODS:
        raise UnslothUnavailable(f"unsloth backend: method {method!r} is not one of {list(METHODS)}")
    if cfg.use_dora:
        raise UnslothUnavailable("train.use_dora: unsloth's fast LoRA kernels do not run DoRA; use backend hf for DoRA")
    if precision == "fp32" and method != "full":
        log.warning("unsloth backend with precision fp32: unsloth trains LoRA in bf16/fp16 kernels; fp32 is slower and unusual")


def preload() -> None:
    """Import unsloth now: it patches transformers best when imported before transformers' models are built.

    unsloth fetches a statistics file from the hub at import unless told not to; the machines may be offline.
    """
    os.environ.setdefault("UNSLOTH_DISABLE_STATISTICS", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import unsloth  # noqa: F401


def build_model(base: str, cfg: TrainConfig, method: str, precision: str, max_length: int, trust_remote_code: bool = False):
    """Load `base` through unsloth and, for lora/qlora, add unsloth's LoRA adapters; returns the model.

    The model is trained by plain `transformers.Trainer` on the tokenize stage's rows (input_ids, labels,
    position_ids) batched by `make_collator`.
    """
    check_settings(cfg, method, precision)
    preload()
    import torch
    from unsloth import FastLanguageModel  # noqa: I001  (patches transformers: keep it inside this function)

    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    gc = "unsloth" if cfg.gradient_checkpointing else False
    model, _tokenizer = FastLanguageModel.from_pretrained(
        model_name=base,
        max_seq_length=max_length,
        dtype=dtype,
        load_in_4bit=method == "qlora",
        full_finetuning=method == "full",
        trust_remote_code=trust_remote_code,
        use_gradient_checkpointing=gc,
        random_state=cfg.seed,
        fix_tokenizer=False,  # the tokenize stage's tokenizer is the one used; unsloth's copy is dropped
    )
    model.config.use_cache = False
    if method == "full":
        if cfg.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        return model
    from tunepath.train.recipe import check_target_modules

    check_target_modules(model, cfg.target_modules)
    model = FastLanguageModel.get_peft_model(
        model,
        r=cfg.lora_r,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout,
        target_modules=linear_targets(model) if cfg.target_modules == "all-linear" else list(cfg.target_modules),
        bias="none",
        use_gradient_checkpointing=gc,
        random_state=cfg.seed,
    )
    log.info("unsloth %s model from %s (max_length %d, gradient checkpointing %s)", method, base, max_length, gc or "off")
    return model


def linear_targets(model) -> list[str]:
    """Leaf names of the linear layers inside the decoder (what peft's 'all-linear' means: lm_head excluded)."""
    import torch

    names = {name.rsplit(".", 1)[-1] for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)}
    names.discard("lm_head")
    if not names:
        raise UnslothUnavailable("unsloth backend: the model has no linear layers to adapt; set train.target_modules explicitly")
    return sorted(names)


class FlatCollator:
    """Concatenates the rows of a batch into one row (no padding at all); position ids keep their restarts.

    unsloth reads sample boundaries from those restarts only when the batch holds one row, so this is what
    keeps packed samples from attending to each other under unsloth. The token count per step is the same as
    with `PadCollator`, minus its padding.
    """

    def __init__(self, pad_token_id: int) -> None:
        self.pad_token_id = pad_token_id  # kept for interface parity with PadCollator; nothing is padded

    def __call__(self, rows: list[dict]) -> dict:
        import torch

        input_ids: list[int] = []
        labels: list[int] = []
        position_ids: list[int] = []
        for r in rows:
            n = len(r["input_ids"])
            input_ids += list(r["input_ids"])
            row_labels = list(r["labels"])
            # The first token of each row must not be predicted from the previous row's last token.
            if row_labels:
                row_labels[0] = IGNORE_INDEX
            labels += row_labels
            position_ids += list(r.get("position_ids") or range(n))
        return {
            "input_ids": torch.tensor([input_ids], dtype=torch.long),
            "labels": torch.tensor([labels], dtype=torch.long),
            "position_ids": torch.tensor([position_ids], dtype=torch.long),
        }


def make_collator(pad_token_id: int) -> FlatCollator:
    return FlatCollator(pad_token_id)
