"""report.md: the evaluation as a person reads it (also the Prefect artifact of the stage)."""

from __future__ import annotations


def cell(text) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")[:160]


def render_report(metrics: dict, samples: list[dict]) -> str:
    verdict = "passed every gate" if metrics["passed"] else "**failed** a gate: not registered"
    lines = [f"# Evaluation: {verdict}", "", f"Held-out split `{metrics['split_kind']}`: {metrics['eval_rows']} rows, "
             f"{metrics['eval_tokens']} scored tokens; scored in {metrics['precision']}.", "",
             "| metric | base | tuned |", "|---|---|---|"]
    for kind, s in metrics["splits"].items():
        lines.append(f"| {kind} held-out loss | {s['base_loss']:.4f} | {s['tuned_loss']:.4f} |")
        lines.append(f"| {kind} perplexity | {s['base_perplexity']:.3f} | {s['tuned_perplexity']:.3f} |")
    lines += [f"| degenerate samples | {metrics['base_degenerate_share']:.0%} | {metrics['degenerate_share']:.0%} |",
              f"| stopped at end of turn | {metrics['base_stopped_at_eot_share']:.0%} | {metrics['stopped_at_eot_share']:.0%} |"]
    pref = metrics.get("preference") or {}
    if pref.get("pairs"):
        lines += [f"| preference accuracy ({pref['pairs']} pairs) | {pref['base_accuracy']:.0%} | {pref['tuned_accuracy']:.0%} |",
                  f"| preference accuracy per token | {pref['base_accuracy_per_token']:.0%} | {pref['tuned_accuracy_per_token']:.0%} |",
                  f"| mean log-prob margin chosen - rejected | {pref['base_margin']:.3f} | {pref['tuned_margin']:.3f} |",
                  f"| reward accuracy (tuned over base) | | {pref['reward_accuracy']:.0%} |"]
    lines += ["", "| gate | passed | detail |", "|---|---|---|"]
    lines += [f"| {name} | {'yes' if g['passed'] else '**no**'} | {cell(g['detail'])} |" for name, g in metrics["gates"].items()]
    lines += ["", "## Samples", "", "Greedy answers; *without template* is the tuned model given the user message as plain text.", "",
              "| prompt | tuned | tuned, without template | base | reference |", "|---|---|---|---|---|"]
    lines += [f"| {cell(s['prompt'])} | {cell(s['tuned'])} | {cell(s.get('tuned_without_template', ''))} | {cell(s['base'])} "
              f"| {cell(s['reference'])} |" for s in samples]
    return "\n".join(lines) + "\n"


def sample_table(samples: list[dict]) -> list[dict]:
    """Rows for a Prefect table artifact: short strings, one column per variant."""
    keys = ("prompt", "tuned", "tuned_without_template", "base", "reference", "stopped_at_eot", "degenerate")
    return [{k: (str(s.get(k, ""))[:300]) for k in keys} for s in samples]
