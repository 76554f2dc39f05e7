"""Where a model came from: git commit, data version, params hash, library versions, hardware."""

from __future__ import annotations

import hashlib
import json
import platform
import subprocess
from pathlib import Path


def git_commit(root: Path) -> str:
    """HEAD's commit, with '-dirty' when tracked files differ from it; 'unknown' outside a git checkout."""
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root, capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + ("-dirty" if dirty else "")


def data_hash(root: Path, raw_dir: str) -> str:
    """The DVC md5 of the data folder as recorded in its .dvc file; else a hash of the files' bytes."""
    dvc_file = root / f"{raw_dir.rstrip('/')}.dvc"
    if dvc_file.exists():
        import yaml

        outs = yaml.safe_load(dvc_file.read_text(encoding="utf-8")).get("outs") or []
        if outs and outs[0].get("md5"):
            return outs[0]["md5"]
    return "sha256:" + tree_hash(root / raw_dir)


def tree_hash(folder: Path) -> str:
    """sha256 over the relative paths and bytes of every file in a folder (sorted)."""
    h = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        h.update(str(path.relative_to(folder)).encode())
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def params_hash(params: dict) -> str:
    return hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()[:16]


def library_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in ("torch", "transformers", "peft", "trl", "datasets", "accelerate", "unsloth"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            continue
    return out


def hardware() -> str:
    import torch

    if torch.cuda.is_available():
        return f"{torch.cuda.device_count()}x {torch.cuda.get_device_name(0)}"
    return f"cpu {platform.machine()} ({torch.get_num_threads()} threads)"
