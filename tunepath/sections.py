"""Configuration sections shared by several stages (`data`, `model`); each stage owns its own section."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from tunepath.strict import Strict


class DataConfig(Strict):
    """Where the user's data lives."""

    raw_dir: str = Field("data/raw", description="Folder of input files (jsonl, json, parquet, csv, txt), read recursively.")
    num_proc: int | None = Field(
        None, ge=1, le=256,
        description="Worker processes of the data stages (validate, tokenize); null: every core this process may run on (on "
        "a Ray cluster, data.ray_address: every CPU of the cluster). Each worker runs one thread (one tokenizer thread), "
        "so workers x threads never exceed the cores; validate runs fewer when data.memory_gb holds fewer of its chunks.",
    )
    memory_gb: float = Field(
        4.0, ge=0.25, le=4096,
        description="Memory the data stages aim to stay under: sets how much is read, tokenized and cut into blocks at a "
        "time. Does not change the outputs.",
    )
    engine: Literal["local", "ray"] = Field(
        "local",
        description="Where validate and tokenize run their per-chunk and per-shard work: local (process pools on this "
        "machine) or ray (Ray actors, past one machine; needs the ray extra). Same outputs either way.",
    )
    ray_address: str | None = Field(
        None,
        description="The Ray cluster of data.engine ray: 'auto', 'host:port' (a head's GCS) or 'ray://host:10001' (Ray "
        "Client); null: a local Ray instance with data.num_proc CPUs, stopped after the stage. A cluster's nodes need "
        "this package and the same data, output and cache paths (a shared volume).",
    )

    def workers(self) -> int:
        """`num_proc`, or the cores this process may run on (its CPU affinity, which containers and taskset narrow)."""
        import os

        if self.num_proc:
            return self.num_proc
        return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


class ModelConfig(Strict):
    """The base model: a local Hugging Face folder or a hub id (hub ids need network access)."""

    base: str = Field("models/demo", description="Base model: local folder or hub id.")
    chat_variant: str | None = Field(
        None, description="Optional instruct/chat variant of the base (the route may start from it when labelled data is scarce)."
    )
    trust_remote_code: bool = Field(False, description="Run code shipped with the model folder. Off unless you trust it.")
