"""What each stage's outputs were made from, written beside them and checked before anything is registered.

Each stage leaves `artifacts/<stage>/lineage.json`: the values of the params dvc.yaml lists for it, the digest
of each upstream stage's record it read (from its `artifacts/<stage>` deps), and for the stages that write
weights (train, merge) a hash of what they wrote. Register then checks the chain against the params it is about
to record: a version can only be registered when every stage's outputs came from those params, and each stage
from the outputs now beside it. That catches a mix-up of two runs even where the run lock did not prevent it (a
folder copied in by hand, a stage run with other params.yaml). Records are deterministic, so DVC still reuses a
stage whose inputs did not change.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from tunepath.errors import StageError

RECORD = "lineage.json"
HASHED = {"train", "merge"}  # the stages that write weights; the others' outputs follow from params and inputs


class LineageMismatch(StageError):
    """A stage's outputs were made from other params or inputs than the ones beside them."""


def stage_specs(root: Path) -> dict[str, dict]:
    """dvc.yaml's stages: {stage: {"params": [dotted keys], "upstream": [stages whose artifacts/ it reads]}}."""
    import yaml

    path = Path(root) / "dvc.yaml"
    if not path.exists():
        return {}
    stages = (yaml.safe_load(path.read_text(encoding="utf-8")) or {}).get("stages") or {}
    specs = {}
    for name, stage in stages.items():
        params = [p for p in stage.get("params") or [] if isinstance(p, str)]
        upstream = []
        for dep in stage.get("deps") or []:
            parts = Path(str(dep)).parts
            if len(parts) >= 2 and parts[0] == "artifacts" and parts[1] in stages and parts[1] not in upstream:
                upstream.append(parts[1])
        specs[name] = {"params": params, "upstream": upstream}
    return specs


def param_values(params: dict, keys: list[str]) -> dict:
    out = {}
    for key in keys:
        node = params
        for part in key.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        out[key] = node
    return out


def digest(record: dict) -> str:
    return hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()[:32]


def outputs_hash(out_dir: Path) -> str:
    """sha256 over the stage folder's files (paths and bytes) except its own record."""
    h = hashlib.sha256()
    for path in sorted(p for p in out_dir.rglob("*") if p.is_file() and p.relative_to(out_dir).as_posix() != RECORD):
        h.update(path.relative_to(out_dir).as_posix().encode() + b"\0")
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()[:32]


def read(out_dir: Path) -> dict | None:
    try:
        return json.loads((out_dir / RECORD).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def inputs_of(stage: str, params: dict, artifacts: Path, specs: dict) -> dict:
    """The record of what `stage` is about to read: taken before it runs, so it names the inputs it really used."""
    spec = specs[stage]
    upstream = {}
    for name in spec["upstream"]:
        record = read(artifacts / name)
        upstream[name] = digest(record) if record else None
    return {"stage": stage, "params": param_values(params, spec["params"]), "inputs": upstream}


def write(out_dir: Path, record: dict) -> None:
    record = dict(record)
    if record["stage"] in HASHED:
        record["outputs"] = outputs_hash(out_dir)
    (out_dir / RECORD).write_text(json.dumps(record, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def check_chain(params: dict, artifacts: Path, specs: dict, last: str = "merge") -> None:
    """Every stage up to `last` made from `params` and from the upstream outputs now beside it; else LineageMismatch."""
    order = list(specs)
    for stage in order[: order.index(last) + 1]:
        where = artifacts / stage
        record = read(where)
        if record is None:
            raise LineageMismatch(f"{where / RECORD}: missing; these outputs were not written by a run of this version "
                                  f"of tunepath; rerun the pipeline (`tunepath run`) before registering")
        wanted = param_values(params, specs[stage]["params"])
        for key, value in wanted.items():
            if record["params"].get(key) != value:
                raise LineageMismatch(f"{where}: made with {key}={_short(record['params'].get(key))}, but this run's params "
                                      f"say {key}={_short(value)} (another run wrote it?); nothing is registered, rerun")
        for name, seen in record.get("inputs", {}).items():
            now = read(artifacts / name)
            if seen != (digest(now) if now else None):
                raise LineageMismatch(f"{where}: made from other {artifacts / name} outputs than the ones there now "
                                      f"(another run replaced them?); nothing is registered, rerun")
        if stage in HASHED and record.get("outputs") != outputs_hash(where):
            raise LineageMismatch(f"{where}: its files changed after the {stage} stage wrote them (another run?); "
                                  f"nothing is registered, rerun")


def _short(value) -> str:
    text = json.dumps(value)
    return text if len(text) <= 80 else text[:77] + "..."
