"""The `validate` section of params.yaml and the stage's error type."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from tunepath.strict import Strict

FormatName = Literal["auto", "text", "alpaca", "sharegpt", "openai", "preference", "feedback"]

# Canonical field names that `field_map` may rename (keys: our name, values: the name in the user's data).
MAPPABLE_FIELDS = (
    "text", "instruction", "input", "output", "system", "history", "conversations", "messages",
    "role", "content", "from", "value", "prompt", "chosen", "rejected", "label", "kto_tag", "tools",
)

DEFAULT_CONTROL_TOKENS = [
    "<|im_start|>", "<|im_end|>", "<|endoftext|>", "[INST]", "[/INST]", "<<SYS>>", "<</SYS>>", "<s>", "</s>",
]


class DataValidationError(ValueError):
    """The input data cannot be used: missing, unreadable, or too many rows rejected."""


class LengthBounds(Strict):
    """Accepted length of one record in characters (all message contents together for chats and pairs)."""

    min: int = Field(1, ge=0, description="Records shorter than this are rejected as too_short (near-empty).")
    max: int = Field(200_000, ge=1, description="Records longer than this are rejected as too_long.")

    @model_validator(mode="after")
    def _min_below_max(self) -> LengthBounds:
        if self.min > self.max:
            raise ValueError(f"min ({self.min}) must not exceed max ({self.max})")
        return self


class ValidateConfig(Strict):
    """Validate stage: read raw files, normalise them to canonical records, check contracts, split train/eval."""

    format: FormatName = Field(
        "auto", description="Input format of every row; 'auto' detects it per row from its keys (mixed files work)."
    )
    file_formats: dict[str, FormatName] = Field(
        default_factory=dict,
        description="Per-file format override: glob pattern relative to the raw folder -> format (first match wins).",
    )
    field_map: dict[str, str] = Field(
        default_factory=dict,
        description="Rename fields: canonical name (e.g. 'instruction', 'messages', 'content') -> name in your data.",
    )
    role_map: dict[str, Literal["system", "user", "assistant", "tool", "function_call"]] = Field(
        default_factory=dict,
        description="Extra role names -> canonical role (human/gpt/bot/observation/function_call/... are built in).",
    )
    text_split: Literal["blank_line", "line", "file"] = Field(
        "blank_line", description="Plain-text files: one document per blank-line-separated block, per line, or per file."
    )
    long_text: Literal["chunk", "reject"] = Field(
        "chunk",
        description="Documents over text_chars.max: cut into pieces of at most that many characters (at a blank line, "
        "line break or space) for CPT, or reject them as too_long.",
    )
    placeholders: dict[str, str] = Field(
        default_factory=dict,
        description="Template placeholders to fill in every content, e.g. {name: Ada} turns '{{name}}' into 'Ada'.",
    )
    placeholder_policy: Literal["warn", "reject"] = Field(
        "warn", description="Content still holding a {{...}} placeholder after filling: accept and report it, or reject the row."
    )
    read_dataset_info: bool = Field(
        True,
        description="Use a LLaMA-Factory dataset_info.json in the raw folder (formatting, ranking, columns, tags per "
        "file) instead of detecting those files' formats.",
    )
    eval_share: float = Field(
        0.05, ge=0.0, le=0.5, description="Share of records held out for evaluation (by record-id hash, stable)."
    )
    seed: int = Field(42, description="Seed of the train/eval split hash; changing it reshuffles the split.")
    max_reject_share: float = Field(
        0.1, ge=0.0, le=1.0, description="Fail the stage when more than this share of read rows is rejected."
    )
    text_chars: LengthBounds = Field(
        default_factory=lambda: LengthBounds(min=20, max=1_000_000),
        description="Length bounds of raw-text documents in characters.",
    )
    conversation_chars: LengthBounds = Field(
        default_factory=lambda: LengthBounds(min=2, max=200_000),
        description="Length bounds of a conversation (all turns together) in characters.",
    )
    preference_chars: LengthBounds = Field(
        default_factory=lambda: LengthBounds(min=2, max=200_000),
        description="Length bounds of a preference pair (prompt, chosen and rejected together) in characters.",
    )
    require_final_assistant: bool = Field(
        True, description="Reject conversations whose last turn is not the assistant's (SFT learns that turn)."
    )
    control_tokens: list[str] | None = Field(
        None,
        description="Chat-template control strings to look for inside content; null: every added token of model.base's "
        "tokenizer (special or not), or a fixed ChatML/Llama-2 list when the model folder has no tokenizer files.",
    )
    control_token_policy: Literal["reject", "warn"] = Field(
        "warn", description="Content containing a control token: reject the row, or accept it and report it."
    )

    @field_validator("field_map")
    @classmethod
    def _known_fields(cls, v: dict[str, str]) -> dict[str, str]:
        unknown = sorted(set(v) - set(MAPPABLE_FIELDS))
        if unknown:
            raise ValueError(f"field_map keys {unknown} are not canonical field names; use some of {list(MAPPABLE_FIELDS)}")
        return v

    @field_validator("control_tokens")
    @classmethod
    def _non_empty_tokens(cls, v: list[str] | None) -> list[str] | None:
        if v is not None and any(not t for t in v):
            raise ValueError("control_tokens must not contain an empty string (it would match every row)")
        return v
