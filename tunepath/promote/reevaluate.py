"""The evidence behind a promotion: both versions' per-row scores and answers on the same held-out rows, compared
with the evaluate stage's metrics and intervals.

Recorded: both runs logged `evaluate/samples.jsonl` and `evaluate/row_scores.json` from the same held-out data
with the same settings, so the rows pair up. Re-evaluated: both registered models are measured on the candidate's
held-out split (logged with it under `heldout/`) with the candidate's evaluation settings.
"""

from __future__ import annotations

import json
import logging
import tempfile
from pathlib import Path

from tunepath.evaluate import EvaluateConfig
from tunepath.evaluate.compare import compare
from tunepath.evaluate.gates import primary_metric
from tunepath.evaluate.heldout import Heldout
from tunepath.evaluate.measure import measure, prepare_prompts
from tunepath.evaluate.models import load_folder, pick_runtime
from tunepath.evaluate.stats import Bootstrap
from tunepath.promote.registry import Registry, model_folders

log = logging.getLogger(__name__)


def evaluation_settings(params: dict) -> EvaluateConfig:
    """The candidate's evaluate section as it was logged (keys a newer tunepath dropped are ignored)."""
    section = {k: v for k, v in (params.get("evaluate") or {}).items() if k in EvaluateConfig.model_fields}
    return EvaluateConfig.model_validate({**section, "precision": "auto"})


def candidate_settings(registry: Registry, candidate, scratch: Path) -> EvaluateConfig:
    params = json.loads(registry.run_artifact(candidate.run_id, "params.json", scratch / "params").read_text(encoding="utf-8"))
    return evaluation_settings(params)


def _primary(cfg: EvaluateConfig, candidate, comparison: dict) -> str:
    recorded = candidate.tags.get("eval.primary_metric")
    if cfg.primary_metric == "auto" and recorded in comparison:
        return recorded
    return primary_metric(cfg, [candidate.tags.get("route.stages", "sft").split(",")[-1]], comparison)


def recorded(registry: Registry, candidate, champion) -> tuple[dict, str, dict] | None:
    """The comparison from both runs' logged per-row evaluation, or None when the rows do not pair up."""
    with tempfile.TemporaryDirectory(prefix="tunepath-promote-") as tmp:
        scratch = Path(tmp)
        cfg = candidate_settings(registry, candidate, scratch)
        sides = []
        for version in (champion, candidate):
            try:
                samples = registry.run_artifact(version.run_id, "evaluate/samples.jsonl", scratch / str(version.version))
                scores = registry.run_artifact(version.run_id, "evaluate/row_scores.json", scratch / str(version.version))
            except ValueError:
                return None  # registered by an older tunepath: no per-row evaluation logged
            rows = [json.loads(line) for line in samples.read_text(encoding="utf-8").splitlines() if line.strip()]
            row_scores = json.loads(scores.read_text(encoding="utf-8"))
            sides.append((rows, row_scores))
    (champ_rows, champ_scores), (cand_rows, cand_scores) = sides
    references = [r["reference"] for r in cand_rows]
    if references != [r["reference"] for r in champ_rows] or len(cand_scores["rows"]) != len(champ_scores["rows"]):
        return None
    measures = [{"answers": [{"text": r["tuned"], "degenerate": r["degenerate"], "stopped_at_eot": r["stopped_at_eot"]} for r in rows],
                 "row_scores": [(s["logprob"], s["tokens"]) for s in scores["rows"]], "preference": []}
                for rows, scores in sides]
    comparison = compare(measures[0], measures[1], references, Bootstrap(cfg.bootstrap_resamples, cfg.confidence, cfg.bootstrap_seed))
    info = {"split": cand_scores["split"], "rows": len(cand_scores["rows"]), "samples": len(references), "precision": cand_scores["precision"]}
    return comparison, _primary(cfg, candidate, comparison), info


def reevaluate(registry: Registry, candidate, champion) -> tuple[dict, str, dict]:
    """Both versions measured on the candidate's held-out split with the candidate's evaluation settings."""
    from transformers import AutoTokenizer

    runtime = pick_runtime("auto")
    with tempfile.TemporaryDirectory(prefix="tunepath-promote-") as tmp:
        scratch = Path(tmp)
        heldout_dir = registry.run_artifact(candidate.run_id, "heldout", scratch / "data")
        cfg = candidate_settings(registry, candidate, scratch)
        split = candidate.tags.get("eval.split")
        heldout = Heldout.load(heldout_dir, heldout_dir / "records.jsonl", [split] if split else None)
        measured = []
        for version in (champion, candidate):
            weights, tokenizer_dir = model_folders(registry.model_root(version.version, scratch / "models"))
            tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
            prompts, eot = prepare_prompts(heldout, tokenizer, cfg)
            model = load_folder(weights, runtime)
            measured.append(measure(model, tokenizer, heldout, cfg, runtime, prompts, eot))
            del model
            log.info("re-evaluated version %s on %s eval: perplexity %.4f", version.version, heldout.kind, measured[-1]["perplexity"])
    references = [p.reference for p in prompts]
    comparison = compare(measured[0], measured[1], references, Bootstrap(cfg.bootstrap_resamples, cfg.confidence, cfg.bootstrap_seed))
    info = {"split": heldout.kind, "rows": len(heldout.rows), "precision": runtime.precision, "samples": len(references)}
    return comparison, _primary(cfg, candidate, comparison), info
