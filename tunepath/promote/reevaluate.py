"""Measure two registered versions on the same held-out data: the candidate's, logged with it under `heldout/`."""

from __future__ import annotations

import json
import logging
import tempfile
from pathlib import Path

from tunepath.evaluate import EvaluateConfig
from tunepath.evaluate.heldout import Heldout
from tunepath.evaluate.measure import measure, prepare_prompts
from tunepath.evaluate.models import load_folder, pick_runtime
from tunepath.promote.decide import Scores
from tunepath.promote.registry import Registry, model_folders

log = logging.getLogger(__name__)


def evaluation_settings(params: dict) -> EvaluateConfig:
    """The candidate's evaluate section as it was logged (keys a newer tunepath dropped are ignored)."""
    section = {k: v for k, v in (params.get("evaluate") or {}).items() if k in EvaluateConfig.model_fields}
    return EvaluateConfig.model_validate({**section, "precision": "auto"})


def reevaluate(registry: Registry, candidate, champion) -> tuple[Scores, Scores, dict]:
    """Both versions scored on the candidate's held-out split with the candidate's evaluation settings."""
    from transformers import AutoTokenizer

    runtime = pick_runtime("auto")
    with tempfile.TemporaryDirectory(prefix="tunepath-promote-") as tmp:
        scratch = Path(tmp)
        heldout_dir = registry.run_artifact(candidate.run_id, "heldout", scratch / "data")
        params = json.loads(registry.run_artifact(candidate.run_id, "params.json", scratch / "params").read_text(encoding="utf-8"))
        cfg = evaluation_settings(params)
        split = candidate.tags.get("eval.split")
        heldout = Heldout.load(heldout_dir, heldout_dir / "records.jsonl", [split] if split else None)
        scores = []
        for version in (candidate, champion):
            weights, tokenizer_dir = model_folders(registry.model_root(version.version, scratch / "models"))
            tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
            prompts, eot = prepare_prompts(heldout, tokenizer, cfg)
            model = load_folder(weights, runtime)
            m = measure(model, tokenizer, heldout, cfg, runtime, prompts, eot)
            del model
            scores.append(Scores(m["perplexity"], m["degenerate_share"], m["stopped_at_eot_share"], m["samples"]))
            log.info("re-evaluated version %s on %s eval: perplexity %.4f", version.version, heldout.kind, m["perplexity"])
    info = {"split": heldout.kind, "rows": len(heldout.rows), "precision": runtime.precision, "samples": cfg.samples}
    return scores[0], scores[1], info
