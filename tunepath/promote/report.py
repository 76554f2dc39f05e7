"""A promotion decision as markdown (the Prefect artifact of the `promote` flow, and the CLI's summary)."""

from __future__ import annotations


def render_decision(record: dict) -> str:
    name = record["model"]
    lines = [f"# Promotion of `{name}`: {record['decision']}", "", record["reason"], ""]
    if record.get("forced"):
        lines += ["**Forced** with `--force`: the comparison was skipped.", ""]
    rows = [("candidate", record.get("candidate")), ("champion before", record.get("champion"))]
    lines += ["| role | version | perplexity | data hash | git commit |", "|---|---|---|---|---|"]
    for role, v in rows:
        if v:
            lines.append(f"| {role} | {v['version']} | {_num(v.get('perplexity'))} | `{(v.get('data_hash') or '')[:16]}` "
                         f"| `{(v.get('git_commit') or '')[:12]}` |")
    if record.get("comparison"):
        lines += ["", comparison_markdown(record)]
    if record.get("checks"):
        lines += ["", f"Compared on: {record['compared_on']}.", "", "| check | passed | detail |", "|---|---|---|"]
        lines += [f"| {c['check']} | {'yes' if c['passed'] else '**no**'} | {c['detail']} |" for c in record["checks"]]
    lines += ["", f"`models:/{name}@champion` is version **{record.get('champion_after') or 'none'}**; "
                  f"`@previous` is {record.get('previous_after') or 'none'}.", ""]
    return "\n".join(lines)


def _num(value) -> str:
    try:
        return f"{float(value):.4f}"
    except (TypeError, ValueError):
        return "n/a"


def comparison_markdown(record: dict) -> str:
    """Champion and candidate side by side: each metric with its interval and the paired difference."""
    from tunepath.evaluate.report import comparison_table

    champ, cand = (record.get(k) or {} for k in ("champion", "candidate"))
    labels = (f"champion v{champ.get('version', '?')}", f"candidate v{cand.get('version', '?')}")
    return "\n".join(comparison_table(record["comparison"], record.get("primary_metric", ""), labels))
