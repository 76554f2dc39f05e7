"""run_evaluate: score the base and the tuned model on the same held-out rows, generate samples, apply the gates.

    tunepath stage evaluate        # what dvc repro runs; reads artifacts/{validate,tokenize,train}
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from pathlib import Path

from tunepath.evaluate import EvaluateConfig
from tunepath.evaluate.benchmarks import benchmark_gates, check_folders, compare_benchmarks, run_tasks
from tunepath.evaluate.compare import compare, per_sample_scores
from tunepath.evaluate.gates import GateFailed, apply_gates, failure_message, primary_metric
from tunepath.evaluate.heldout import Heldout, fingerprint
from tunepath.evaluate.judge import judge_gate, judge_pairs
from tunepath.evaluate.measure import measure, prepare_prompts, settings_of
from tunepath.evaluate.models import load_folder, load_tuned, pick_runtime
from tunepath.evaluate.report import render_report
from tunepath.evaluate.scoring import preference_summary
from tunepath.evaluate.stats import Bootstrap, mean_ci
from tunepath.evaluate.textmetrics import METRICS
from tunepath.sections import ModelConfig

log = logging.getLogger(__name__)

__all__ = ["GateFailed", "run_evaluate"]


def trained_stages(train: dict) -> list[str]:
    return [s["stage"] for s in train.get("stages", []) if isinstance(s, dict) and "stage" in s]


def run_evaluate(cfg: EvaluateConfig, model: ModelConfig, validate_dir: Path, tokenize_dir: Path, train_dir: Path, out_dir: Path,
                 root: Path | None = None) -> dict:
    """Writes metrics.json, samples.jsonl, row_scores.json and report.md; raises GateFailed after writing them.
    Benchmark folders are resolved against `root` (the project; default: the working directory)."""
    from transformers import AutoTokenizer

    tasks = check_folders(cfg.benchmarks, Path(root or Path.cwd())) if cfg.benchmarks else []

    if out_dir.exists():
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True)
    train = json.loads((train_dir / "metrics.json").read_text(encoding="utf-8"))
    tokenizer = AutoTokenizer.from_pretrained(str(tokenize_dir / "tokenizer"))
    trained = trained_stages(train)
    heldout = Heldout.load(tokenize_dir, validate_dir, trained)
    runtime = pick_runtime(cfg.precision)
    prompts, eot = prepare_prompts(heldout, tokenizer, cfg)

    started = time.perf_counter()
    base_model = load_folder(train["start_model"], runtime, model.trust_remote_code)
    base = measure(base_model, tokenizer, heldout, cfg, runtime, prompts, eot, untemplated=0, label="base")
    limit = cfg.benchmark_limit or None
    bench_started = time.perf_counter()
    base_bench = run_tasks(base_model, tokenizer, tasks, cfg.batch_size, limit, label="base") if tasks else {}
    bench_s = time.perf_counter() - bench_started
    tuned_model = load_tuned(train, train_dir, runtime, base=base_model, trust_remote_code=model.trust_remote_code)
    tuned = measure(tuned_model, tokenizer, heldout, cfg, runtime, prompts, eot, untemplated=cfg.report_samples, label="tuned")
    # lm-eval takes a transformers model; a PeftModel's inner model carries the adapter layers in place
    inner = getattr(getattr(tuned_model, "base_model", None), "model", tuned_model) if hasattr(tuned_model, "peft_config") else tuned_model
    bench_started = time.perf_counter()
    tuned_bench = run_tasks(inner, tokenizer, tasks, cfg.batch_size, limit, label="tuned") if tasks else {}
    bench_s += time.perf_counter() - bench_started
    del base_model, tuned_model, inner
    seconds = time.perf_counter() - started

    references = [p.reference for p in prompts]
    boot = Bootstrap(cfg.bootstrap_resamples, cfg.confidence, cfg.bootstrap_seed)
    relevance = cfg.primary_metric if cfg.primary_metric in METRICS else "rouge_l"
    comparison = compare(base, tuned, references, boot, relevance_metric=relevance if heldout.kind == "sft" else None)
    primary = primary_metric(cfg, trained, comparison)
    gates = apply_gates(cfg, comparison, primary, heldout.kind)
    bench = compare_benchmarks(base_bench, tuned_bench) if tasks else {}
    gates.update(benchmark_gates(bench, cfg.max_benchmark_drop, cfg.confidence))
    preference = preference_summary(base["preference"], tuned["preference"])
    metrics = build_metrics(heldout, base, tuned, comparison, primary, preference, gates, runtime.precision,
                            fingerprint(heldout.digest(), settings_of(cfg, runtime)), train["method"])
    metrics["seconds"] = seconds
    metrics["timings"] = {**{f"{part}_s": base["seconds"][part] + tuned["seconds"][part] for part in ("scoring", "generation")},
                          "benchmarks_s": bench_s}
    metrics["benchmarks"] = {"folders": [str(f) for f, _ in tasks], "tasks": bench}
    metrics.update({f"{who}_bench_{name}": b[who] for name, b in bench.items() for who in ("base", "tuned")})
    samples = sample_rows(prompts, base["answers"], tuned["answers"])
    if cfg.judge.base_url and samples:
        judged = judge_pairs(cfg.judge, samples)
        win = mean_ci(judged["scores"], boot)
        metrics["judge"] = {**judged, "win_rate": win}
        metrics["judge_win_rate"] = win["value"]
        gates["judge"] = judge_gate(cfg.judge, win, judged["unreadable"], len(judged["scores"]))
        metrics["passed"] = all(g["passed"] for g in gates.values())

    (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n", encoding="utf-8")
    with open(out_dir / "samples.jsonl", "w", encoding="utf-8") as f:
        for s in samples:
            f.write(json.dumps(s, ensure_ascii=False) + "\n")
    row_scores = {"split": heldout.kind, "precision": runtime.precision,
                  "rows": [{"logprob": s, "tokens": c} for s, c in tuned["row_scores"]]}
    (out_dir / "row_scores.json").write_text(json.dumps(row_scores) + "\n", encoding="utf-8")
    (out_dir / "report.md").write_text(render_report(metrics, samples[: cfg.report_samples]), encoding="utf-8")
    log.info("%s: base %.3f, tuned %.3f; perplexity base %.3f, tuned %.3f (%s eval, %d answers, %.1f s); gates %s", primary,
             comparison[primary]["base"]["value"], comparison[primary]["tuned"]["value"], base["perplexity"], tuned["perplexity"],
             heldout.kind, len(prompts), seconds, ", ".join(f"{k} {'ok' if g['passed'] else 'FAILED'}" for k, g in gates.items()))
    if not metrics["passed"]:
        raise GateFailed(failure_message(gates, str(out_dir / "metrics.json")))
    return metrics


def sample_rows(prompts, base_answers: list[dict], tuned_answers: list[dict]) -> list[dict]:
    """samples.jsonl: per prompt the reference, both answers and each answer's task metrics."""
    references = [p.reference for p in prompts]
    base_scores, tuned_scores = per_sample_scores(base_answers, references), per_sample_scores(tuned_answers, references)
    return [{"id": p.id, "prompt": p.prompt, "reference": p.reference, "base": b["text"], "tuned": t["text"],
             "tuned_without_template": t.get("untemplated", ""), "stopped_at_eot": t["stopped_at_eot"], "degenerate": t["degenerate"],
             "base_scores": bs, "tuned_scores": ts}
            for p, b, t, bs, ts in zip(prompts, base_answers, tuned_answers, base_scores, tuned_scores)]


def flat_numbers(comparison: dict) -> dict:
    """Top-level numbers for DVC and MLflow: base_X, tuned_X, X_diff and the interval ends of each."""
    out = {}
    for name, c in comparison.items():
        if name == "relevance":
            out.update({"relevance_own": c["own"]["value"], "relevance_other": c["other"]["value"],
                        "relevance_diff": c["diff"]["value"], "relevance_diff_low": c["diff"]["low"]})
            continue
        for side in ("base", "tuned", "diff"):
            key = f"{name}_diff" if side == "diff" else f"{side}_{name}"
            out[key], out[f"{key}_low"], out[f"{key}_high"] = c[side]["value"], c[side]["low"], c[side]["high"]
    return out


def build_metrics(heldout: Heldout, base: dict, tuned: dict, comparison: dict, primary: str, preference: dict, gates: dict,
                  precision: str, fp: str, method: str) -> dict:
    """metrics.json: flat numbers first (DVC and MLflow read top-level numbers), details after."""
    pref = {f"{who}_preference_accuracy_sum": preference[f"{who}_accuracy"] for who in ("base", "tuned")} if preference.get("pairs") else {}
    return {
        "split_kind": heldout.kind,
        "eval_rows": len(heldout.rows),
        "eval_tokens": tuned["tokens"],
        "primary_metric": primary,
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
        **flat_numbers(comparison),
        **pref,
        "comparison": comparison,
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
