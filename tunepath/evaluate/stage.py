"""run_evaluate: score the base and the tuned model on the same held-out rows, generate samples, apply the gates.

    tunepath stage evaluate        # what dvc repro runs; reads artifacts/{validate,tokenize,train}
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

from tunepath.evaluate import EvaluateConfig
from tunepath.evaluate.gates import GateFailed, apply_gates, failure_message
from tunepath.evaluate.heldout import Heldout, fingerprint
from tunepath.evaluate.measure import measure, prepare_prompts, settings_of
from tunepath.evaluate.models import load_folder, load_tuned, pick_runtime
from tunepath.evaluate.report import render_report
from tunepath.evaluate.scoring import preference_summary
from tunepath.sections import ModelConfig

log = logging.getLogger(__name__)

__all__ = ["GateFailed", "run_evaluate"]


def trained_stages(train: dict) -> list[str]:
    return [s["stage"] for s in train.get("stages", []) if isinstance(s, dict) and "stage" in s]


def run_evaluate(cfg: EvaluateConfig, model: ModelConfig, validate_dir: Path, tokenize_dir: Path, train_dir: Path, out_dir: Path) -> dict:
    """Writes metrics.json, samples.jsonl, row_scores.json and report.md; raises GateFailed after writing them."""
    from transformers import AutoTokenizer

    if out_dir.exists():
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True)
    train = json.loads((train_dir / "metrics.json").read_text(encoding="utf-8"))
    tokenizer = AutoTokenizer.from_pretrained(str(tokenize_dir / "tokenizer"))
    heldout = Heldout.load(tokenize_dir, validate_dir / "records.jsonl", trained_stages(train))
    runtime = pick_runtime(cfg.precision)
    prompts, eot = prepare_prompts(heldout, tokenizer, cfg)

    base_model = load_folder(train["start_model"], runtime, model.trust_remote_code)
    base = measure(base_model, tokenizer, heldout, cfg, runtime, prompts, eot)
    tuned_model = load_tuned(train, train_dir, runtime, base=base_model, trust_remote_code=model.trust_remote_code)
    tuned = measure(tuned_model, tokenizer, heldout, cfg, runtime, prompts, eot, untemplated=True)
    del base_model, tuned_model

    preference = preference_summary(base["preference"], tuned["preference"])
    gates = apply_gates(cfg, base, tuned, heldout.kind, preference)
    metrics = build_metrics(heldout, base, tuned, preference, gates, runtime.precision,
                            fingerprint(heldout.digest(), settings_of(cfg, runtime)), train["method"])
    samples = [{"id": p.id, "prompt": p.prompt, "reference": p.reference, "tuned": t["text"],
                "tuned_without_template": t.get("untemplated", ""), "base": b["text"],
                "stopped_at_eot": t["stopped_at_eot"], "degenerate": t["degenerate"]}
               for p, t, b in zip(prompts, tuned["answers"], base["answers"])]

    (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n", encoding="utf-8")
    with open(out_dir / "samples.jsonl", "w", encoding="utf-8") as f:
        for s in samples:
            f.write(json.dumps(s, ensure_ascii=False) + "\n")
    row_scores = {"split": heldout.kind, "precision": runtime.precision,
                  "rows": [{"logprob": s, "tokens": c} for s, c in tuned["row_scores"]]}
    (out_dir / "row_scores.json").write_text(json.dumps(row_scores) + "\n", encoding="utf-8")
    (out_dir / "report.md").write_text(render_report(metrics, samples), encoding="utf-8")
    log.info("base ppl %.3f, tuned ppl %.3f (%s eval); gates %s", base["perplexity"], tuned["perplexity"], heldout.kind,
             ", ".join(f"{k} {'ok' if g['passed'] else 'FAILED'}" for k, g in gates.items()))
    if not metrics["passed"]:
        raise GateFailed(failure_message(gates, str(out_dir / "metrics.json")))
    return metrics


def build_metrics(heldout: Heldout, base: dict, tuned: dict, preference: dict, gates: dict, precision: str, fp: str, method: str) -> dict:
    """metrics.json: flat numbers first (DVC and MLflow read top-level numbers), details after."""
    pref = {f"{who}_preference_accuracy": preference[f"{who}_accuracy"] for who in ("base", "tuned")} if preference.get("pairs") else {}
    return {
        "split_kind": heldout.kind,
        "eval_rows": len(heldout.rows),
        "eval_tokens": tuned["tokens"],
        "base_loss": base["loss"],
        "base_perplexity": base["perplexity"],
        "tuned_loss": tuned["loss"],
        "tuned_perplexity": tuned["perplexity"],
        "perplexity_improvement": 1 - tuned["perplexity"] / base["perplexity"],
        "degenerate_share": tuned["degenerate_share"],
        "stopped_at_eot_share": tuned["stopped_at_eot_share"],
        "base_degenerate_share": base["degenerate_share"],
        "base_stopped_at_eot_share": base["stopped_at_eot_share"],
        "samples": tuned["samples"],
        **pref,
        "preference": preference,
        "splits": {k: {"rows": s["rows"], "tokens": s["tokens"], "base_loss": base["splits"][k]["loss"],
                       "tuned_loss": s["loss"], "base_perplexity": base["splits"][k]["perplexity"],
                       "tuned_perplexity": s["perplexity"]} for k, s in tuned["splits"].items()},
        "method": method,
        "precision": precision,
        "fingerprint": fp,
        "gates": gates,
        "passed": all(g["passed"] for g in gates.values()),
    }
