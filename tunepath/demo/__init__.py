"""Demo assets for running the pipeline with no hub access: synthetic customer-service data and a tiny
random-init Qwen2-architecture model with a locally trained tokenizer.

Usage (Python):

    from pathlib import Path
    from tunepath.demo import DemoConfig, generate_demo_data, build_demo_model

    cfg = DemoConfig()
    generate_demo_data(Path("data/raw"), cfg)
    build_demo_model(Path("models/demo"), cfg, sorted(Path("data/raw").glob("*")))
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from pydantic import Field, model_validator

from tunepath.strict import Strict

if TYPE_CHECKING:
    from tunepath.demo.data import generate_demo_data
    from tunepath.demo.model import build_demo_model

__all__ = ["DemoConfig", "generate_demo_data", "build_demo_model"]


class DemoConfig(Strict):
    """The demo data set and the tiny demo model (used when no real base model or data is given)."""

    seed: int = Field(0, ge=0, description="Seed for the data generator, tokenizer training order and weight init; same seed, same bytes.")
    conversations: int = Field(400, ge=10, le=1_000_000, description="Number of valid SFT chats written to chat.jsonl (a few bad rows are added on top).")
    documents: int = Field(300, ge=1, le=1_000_000, description="Number of raw-text domain documents written to corpus.txt.")
    preference_pairs: int = Field(200, ge=1, le=1_000_000, description="Number of prompt/chosen/rejected rows written to preferences.jsonl.")
    vocab_size: int = Field(4096, ge=300, le=200_000, description="Upper bound on the BPE vocabulary (3 special tokens + 256 bytes + merges); the BPE stops earlier when the text has no pairs left (about 2.8k on the default demo data).")
    hidden_size: int = Field(96, ge=8, le=8192, description="Model width; must be divisible by num_heads.")
    num_layers: int = Field(3, ge=1, le=64, description="Number of transformer decoder layers.")
    num_heads: int = Field(4, ge=1, le=128, description="Attention heads per layer.")
    num_kv_heads: int = Field(2, ge=1, le=128, description="Key/value heads (grouped-query attention); must divide num_heads.")
    intermediate_size: int = Field(384, ge=8, le=65536, description="Width of the MLP inside each layer.")
    pretrain_steps: int = Field(
        300, ge=0, le=100_000, description="Steps of plain-text pretraining on the demo text so the demo base knows the domain's words; 0 keeps random weights."
    )
    pretrain_dialogues: int = Field(
        2000, ge=0, le=1_000_000,
        description="Plain-text support dialogues (not the chats in chat.jsonl) added to that pretraining, so the base links questions to answers as a real base model does.",
    )
    pretrain_lr: float = Field(3e-3, gt=0, description="Learning rate of that pretraining.")
    max_position_embeddings: int = Field(1024, ge=64, le=131072, description="Longest sequence the model accepts (also the tokenizer's model_max_length).")

    @model_validator(mode="after")
    def _check_heads(self) -> DemoConfig:
        if self.hidden_size % self.num_heads:
            raise ValueError(f"demo.hidden_size ({self.hidden_size}) must be divisible by demo.num_heads ({self.num_heads})")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"demo.num_kv_heads ({self.num_kv_heads}) must divide demo.num_heads ({self.num_heads})")
        if (self.hidden_size // self.num_heads) % 2:
            raise ValueError(
                f"demo head size hidden_size/num_heads = {self.hidden_size // self.num_heads} must be even (rotary embeddings)"
            )
        return self


def __getattr__(name: str) -> Any:
    # Lazy so that importing the config class stays cheap.
    if name == "generate_demo_data":
        from tunepath.demo.data import generate_demo_data

        return generate_demo_data
    if name == "build_demo_model":
        from tunepath.demo.model import build_demo_model

        return build_demo_model
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
