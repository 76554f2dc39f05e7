"""report.md: the evaluation as a person reads it (also the Prefect artifact of the stage)."""

from __future__ import annotations

LABELS = {"exact_match": "exact match", "token_f1": "token F1", "rouge_l": "ROUGE-L", "chrf": "chrF",
          "perplexity": "perplexity (answer tokens)", "preference_accuracy": "preference accuracy (per token)",
          "preference_margin": "preference margin (nats per token)",
          "feedback_auc": "feedback AUC (desirable above undesirable, per token)",
          "feedback_margin": "feedback margin (nats per token)",
          "degenerate_share": "degenerate answers", "stopped_at_eot_share": "stopped at end of turn",
          "prompt_dependence": "prompt dependence (nats per answer token)"}


def cell(text) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")[:160]


def ci(c: dict) -> str:
    return f"{c['value']:.3f} [{c['low']:.3f}, {c['high']:.3f}]"


def comparison_table(comparison: dict, primary: str, labels: tuple[str, str] = ("base", "tuned")) -> list[str]:
    """Markdown rows: metric, each side with its interval, the paired difference with its interval."""
    ref, new = labels
    lines = [f"| metric | {ref} | {new} | difference ({new} - {ref}) |", "|---|---|---|---|"]
    for name, label in LABELS.items():
        if name not in comparison:
            continue
        c = comparison[name]
        diff = ci(c["diff"]) + (" (relative reduction)" if name == "perplexity" else "")
        mark = " **(primary)**" if name == primary else ""
        lines.append(f"| {label}{mark} | {ci(c['base'])} | {ci(c['tuned'])} | {diff} |")
    return lines


def render_report(metrics: dict, samples: list[dict]) -> str:
    verdict = "passed every gate" if metrics["passed"] else "**failed** a gate: not registered"
    comparison = metrics["comparison"]
    lines = [f"# Evaluation: {verdict}", "",
             f"Held-out split `{metrics['split_kind']}`: {metrics['eval_rows']} rows, {metrics['eval_tokens']} scored tokens, "
             f"{metrics['samples']} generated answers per model; scored in {metrics['precision']}. Intervals: bootstrap over "
             "held-out rows; differences are paired (both models on the same resampled rows).", ""]
    lines += comparison_table(comparison, metrics["primary_metric"])
    if "relevance" in comparison:
        r = comparison["relevance"]
        lines += ["", f"Answers fit their prompts: tuned {r['metric']} against the own reference {ci(r['own'])}, against other "
                      f"prompts' references {ci(r['other'])}, difference {ci(r['diff'])}."]
    bench = (metrics.get("benchmarks") or {}).get("tasks") or {}
    if bench:
        lines += ["", "Benchmarks (lm-evaluation-harness, offline task folders):", "",
                  "| task | metric | base | tuned | change |", "|---|---|---|---|---|"]
        for name, b in bench.items():
            change = f"{b['change']:+.3f}" if b["higher_is_better"] else f"{b['change']:+.1%}"
            se = lambda v: f" ± {v:.3f}" if v else ""  # noqa: E731
            lines.append(f"| {name} | {b['metric']} | {b['base']:.3f}{se(b['base_stderr'])} | {b['tuned']:.3f}{se(b['tuned_stderr'])} | {change} |")
    judge = metrics.get("judge")
    if judge:
        w = judge["win_rate"]
        lines += ["", f"Judge `{judge['model']}` at {judge['base_url']}: tuned preferred over base in {ci(w)} of "
                      f"{len(judge['scores'])} prompts (asked twice, positions swapped; {judge['unreadable']} unreadable verdicts count as ties)."]
    lines += ["", "| gate | passed | rule | detail |", "|---|---|---|---|"]
    lines += [f"| {name} | {'yes' if g['passed'] else '**no**'} | {cell(g.get('rule', ''))} | {cell(g['detail'])} |"
              for name, g in metrics["gates"].items()]
    lines += ["", "## Samples", "", "Greedy answers; *without template* is the tuned model given the user message as plain text.", ""]
    for i, s in enumerate(samples, 1):
        t, b = s.get("tuned_scores") or {}, s.get("base_scores") or {}
        lines += [f"### {i}. {cell(s['prompt'])}", "", "| | answer | ROUGE-L | chrF |", "|---|---|---|---|",
                  f"| reference | {cell(s['reference'])} | | |",
                  f"| base | {cell(s['base'])} | {b.get('rouge_l', 0):.2f} | {b.get('chrf', 0):.2f} |",
                  f"| tuned | {cell(s['tuned'])} | {t.get('rouge_l', 0):.2f} | {t.get('chrf', 0):.2f} |",
                  f"| tuned, without template | {cell(s.get('tuned_without_template', ''))} | | |", ""]
    return "\n".join(lines) + "\n"


def sample_table(samples: list[dict]) -> list[dict]:
    """Rows for a Prefect table artifact: short strings, one column per variant."""
    keys = ("prompt", "reference", "base", "tuned", "tuned_without_template")
    rows = []
    for s in samples:
        row = {k: str(s.get(k, ""))[:300] for k in keys}
        row.update({f"{who}_rouge_l": round((s.get(f"{who}_scores") or {}).get("rouge_l", 0.0), 3) for who in ("base", "tuned")})
        rows.append(row)
    return rows
