"""The model card: the registered version's description in MLflow (markdown, which the MLflow UI renders).

It says what a person deciding about the version asks first: what it was tuned from and how (the route and
why), on which data (version and counts), how it scored against its base (with intervals), and how to talk to it.
"""

from __future__ import annotations

SHOWN = ("rouge_l", "token_f1", "chrf", "exact_match", "perplexity", "preference_accuracy")


def _interval(c: dict, digits: int = 3) -> str:
    return f"{c['value']:.{digits}f} [{c['low']:.{digits}f}, {c['high']:.{digits}f}]"


def _count(n) -> str:
    return f"{n:,}" if isinstance(n, int) else str(n)


def model_card(name: str, version: str, alias: str, *, base_model: str, plan: dict, train: dict, evaluation: dict,
               validate: dict, tokenize: dict, tags: dict, run: dict) -> str:
    """Markdown for `name` version `version`. `run`: {"run_id", "url", "flow_run", "flow_run_url"} where known.
    Differences are tuned - base, except perplexity's: its relative drop, as the evaluate stage reports it."""
    lines = [f"# {name} version {version}", ""]
    stages = " then ".join(s.upper() for s in plan.get("stages", [])) or "no training"
    lines += [f"Fine-tuned from **`{base_model}`** with {plan.get('method', '?')} {stages} "
              f"(started from the {plan.get('start_from', 'base')} model{', route forced' if plan.get('forced') else ''}).", ""]

    lines += ["## Route and why", ""]
    for rule in plan.get("rules", []):
        if isinstance(rule, dict):
            lines.append(f"- {rule.get('reason', rule)}")
    for warning in plan.get("warnings", []):
        lines.append(f"- warning: {warning}")
    if plan.get("retrieval") and plan["retrieval"] != "none":
        lines.append(f"- retrieval: {plan['retrieval']}")
    lines.append("")

    totals, splits = validate.get("totals", {}), validate.get("splits", {})
    lines += ["## Data", "",
              f"- version: `{tags.get('data_hash', '?')}` (DVC md5 of the data folder), git `{tags.get('git_commit', '?')[:12]}`",
              f"- validate: {_count(totals.get('accepted', '?'))} of {_count(totals.get('read', '?'))} rows accepted "
              f"({_count(splits.get('train', '?'))} train, {_count(splits.get('eval', '?'))} held out); "
              f"{_count(totals.get('rejected', 0))} quarantined with their reason"]
    sft = (tokenize.get("sft") or {}).get("train") or {}
    dropped = sum(v for k, v in sft.items() if k.startswith("dropped_") and k != "dropped_tokens" and isinstance(v, int))
    lines.append(f"- tokenize (max_length {tokenize.get('max_length', '?')}): {_count(tokenize.get('labeled_examples', 0))} SFT "
                 f"conversations ({_count(sft.get('truncated', 0))} truncated, {_count(dropped)} dropped), "
                 f"{_count(tokenize.get('unlabeled_tokens', 0))} CPT tokens, {_count(tokenize.get('preference_pairs', 0))} "
                 f"preference pairs, {_count(tokenize.get('feedback_examples', 0))} feedback examples")
    lines.append("")

    comparison = evaluation.get("comparison") or {}
    primary = evaluation.get("primary_metric")
    lines += [f"## Evaluation ({evaluation.get('split_kind', '?')} held-out set, {_count(evaluation.get('eval_rows', '?'))} rows; "
              "95% bootstrap intervals)", "",
              "| metric | base | tuned | difference |", "|---|---|---|---|"]
    for metric in SHOWN:
        c = comparison.get(metric)
        if not c or not all(k in c for k in ("base", "tuned", "diff")):
            continue
        label = f"**{metric}** (primary)" if metric == primary else metric
        if metric == "perplexity":
            label += " (difference: relative drop)"  # as compare() defines it: (base - tuned) / base
        lines.append(f"| {label} | {_interval(c['base'])} | {_interval(c['tuned'])} | {_interval(c['diff'])} |")
    gates = evaluation.get("gates") or {}
    if gates:
        lines += ["", "Gates: " + ", ".join(f"{k} {'passed' if g.get('passed') else 'FAILED'}" for k, g in gates.items())]
    lines.append("")

    stage_lines = [f"{s['stage']} {s['steps']} steps" for s in train.get("stages", []) if isinstance(s, dict) and "stage" in s]
    lines += ["## Training", "",
              f"- {', '.join(stage_lines) or 'no steps'}; loss {_num(train.get('first_loss'))} -> {_num(train.get('final_loss'))}",
              f"- backend {train.get('backend', '?')} ({train.get('backend_reason', '')}), precision {train.get('precision', '?')}, "
              f"{_count(train.get('trainable_params', '?'))} of {_count(train.get('total_params', '?'))} parameters trained", ""]

    uri = f"models:/{name}@{alias}"
    lines += ["## Chat with it", "", "```", f"tunepath chat {uri}", "```", "",
              f"Or serve it: `mlflow models serve -m {uri} --env-manager local` (OpenAI-style chat requests); "
              f"as GGUF for llama.cpp / Ollama: `tunepath export {uri}`.", ""]

    where = [f"MLflow run `{run.get('run_id', '?')}`" + (f" ({run['url']})" if run.get("url") else "")]
    if run.get("flow_run"):
        where.append(f"Prefect flow run `{run['flow_run']}`" + (f" ({run['flow_run_url']})" if run.get("flow_run_url") else ""))
    lines += ["## Lineage", "", "- " + "; ".join(where), f"- params hash `{tags.get('params_hash', '?')}`, "
              f"weights `{tags.get('artifact_hash', '?')}`, hardware {tags.get('hardware', '?')}", ""]
    return "\n".join(lines)


def _num(x) -> str:
    return f"{x:.4f}" if isinstance(x, (int, float)) else "?"
