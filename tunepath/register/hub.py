"""Nothing a registered model needs may live on a model hub: machines that serve it may have no network."""

from __future__ import annotations

import json
import re
from pathlib import Path

from tunepath.errors import StageError

# "org/name" or "name" as a hub id; a local path is absolute, or starts with ./ ../ or ~.
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


class HubReference(StageError):
    """The logged model points at a hub id: loading it would need network access."""


def looks_like_hub_id(value: str) -> bool:
    return bool(value) and not value.startswith(("/", ".", "~")) and not re.match(r"^[A-Za-z]:[\\/]", value) and bool(_HUB_ID.match(value))


def hub_references(flavor: dict, model_dir: Path) -> list[str]:
    """What in a logged flavour's configuration (the transformers flavour's keys; {} for tunepath's pyfunc) or
    the model folder would send a loader to a hub."""
    problems = []
    source = flavor.get("source_model_name")
    if source and looks_like_hub_id(str(source)):
        problems.append(f"MLmodel source_model_name {source!r} is a hub id")
    if flavor.get("source_model_revision"):
        problems.append(f"MLmodel pins hub revision {flavor['source_model_revision']!r}")
    if flavor.get("peft_adaptor"):
        problems.append("MLmodel holds a PEFT adapter whose base is loaded by name; register the merged weights")
    if (model_dir / "adapter_config.json").exists():
        problems.append(f"{model_dir} holds an adapter, not merged weights")
    config = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    name = config.get("_name_or_path")
    if name and looks_like_hub_id(str(name)):
        problems.append(f"config.json _name_or_path {name!r} is a hub id")
    for key, ref in (config.get("auto_map") or {}).items():
        refs = ref if isinstance(ref, list) else [ref]
        problems += [f"config.json auto_map {key} loads code from hub repo {r.split('--')[0]!r}" for r in refs if isinstance(r, str) and "--" in r]
    return problems
