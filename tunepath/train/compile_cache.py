"""torch.compile's caches kept across runs, so a rerun of the same model shapes compiles from them.

    from tunepath.train import compile_cache
    compile_cache.use(Path(".tunepath/compile-cache"), model)   # before the first compiled step

The first compiled step traces each decoder layer (dynamo), builds its forward and backward graphs (AOT
autograd) and generates and compiles their kernels (inductor): 20-30 s. torch keeps the results of the last two
in its on-disk caches (inductor's FX graph cache, the AOT autograd cache, the autotuning results, and with
`bundle_triton_into_fx_graph_cache` the Triton kernels), all under TORCHINDUCTOR_CACHE_DIR, by default a folder
in /tmp that a reboot or another machine's run does not share. `use` points that variable at the project's
folder, beside the checkpoints, ignored by git and by DVC (`.tunepath/`), so the second run of the same shapes
only traces and looks up. It also names the run for dynamo's profile-guided dynamic shapes
(`torch.compiler.config.job_id`, keyed by the model's shapes): the first run compiles each layer for the
first batch width and recompiles it with a dynamic width at the second; a rerun starts dynamic, one compile.

torch's "mega-cache" (`torch.compiler.save_cache_artifacts` / `load_cache_artifacts`) serialises these same
entries to carry them to another machine; with one folder that persists, nothing needs carrying. The FX graph
cache keys on the graph, the input shapes and the torch version, so models of other shapes share the folder
without clashing, and a changed torch version misses rather than loads stale kernels.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from pathlib import Path

log = logging.getLogger(__name__)

ENV = "TORCHINDUCTOR_CACHE_DIR"  # torch's own setting: every inductor cache lives below it
SHAPE_KEYS = ("model_type", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
              "num_key_value_heads", "head_dim", "vocab_size", "torch_dtype", "dtype")


def job_id(model) -> str:
    """A name for dynamo's dynamic-shape profile: equal for equal layer shapes, dtypes and trainable parts."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = base.config.to_dict()
    trainable = sorted({re.sub(r"\.\d+\.", ".N.", n) for n, p in model.named_parameters() if p.requires_grad})
    key = json.dumps({"config": {k: str(config.get(k)) for k in SHAPE_KEYS}, "trainable": trainable,
                      "checkpointing": bool(getattr(base, "is_gradient_checkpointing", False))}, sort_keys=True)
    return "tunepath-" + hashlib.sha256(key.encode()).hexdigest()[:16]


def use(folder: Path, model) -> dict:
    """Keep torch.compile's caches in `folder` for this process; returns what was set (for metrics.json)."""
    import torch
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    folder = Path(folder).resolve()
    set_by_user = os.environ.get(ENV)
    # torch writes its default into the variable at its first look; any other value came from whoever started
    # this process, and theirs wins
    if set_by_user and Path(set_by_user).resolve() not in (folder, Path(default_cache_dir()).resolve()):
        log.info("compile cache: %s is set (%s); %s not used", ENV, set_by_user, folder)
        folder = Path(set_by_user)
    else:
        folder.mkdir(parents=True, exist_ok=True)
        os.environ[ENV] = str(folder)
    torch.compiler.config.job_id = job_id(model)
    entries = sum(1 for p in folder.rglob("*") if p.is_file()) if folder.is_dir() else 0
    log.info("compile cache: %s (%d files from earlier runs), dynamic-shape profile %s", folder, entries,
             torch.compiler.config.job_id)
    return {"folder": str(folder), "files_before": entries, "job_id": torch.compiler.config.job_id}


def hits() -> dict:
    """This process's cache hits and misses so far (inductor's FX graph cache and the AOT autograd cache)."""
    from torch._dynamo.utils import counters

    found = {}
    for group, names in (("inductor", ("fxgraph_cache_hit", "fxgraph_cache_miss", "fxgraph_cache_bypass")),
                         ("aot_autograd", ("autograd_cache_hit", "autograd_cache_miss", "autograd_cache_bypass"))):
        for name in names:
            found[name] = int(counters[group][name])
    return found
