"""Configuration sections shared by several stages (`data`, `model`); each stage owns its own section."""

from __future__ import annotations

from pydantic import Field

from tunepath.strict import Strict


class DataConfig(Strict):
    """Where the user's data lives."""

    raw_dir: str = Field("data/raw", description="Folder of input files (jsonl, json, parquet, csv, txt), read recursively.")


class ModelConfig(Strict):
    """The base model: a local Hugging Face folder or a hub id (hub ids need network access)."""

    base: str = Field("models/demo", description="Base model: local folder or hub id.")
    chat_variant: str | None = Field(
        None, description="Optional instruct/chat variant of the base (the route may start from it when labelled data is scarce)."
    )
    trust_remote_code: bool = Field(False, description="Run code shipped with the model folder. Off unless you trust it.")
