"""report.md: the tokenize stats as a table for a person (published as a Prefect artifact)."""

from __future__ import annotations

from pathlib import Path

COLUMNS = [
    ("samples_in", "in"), ("samples_out", "out"), ("rows", "rows"), ("tokens", "tokens"), ("label_tokens", "learnt"),
    ("truncated", "truncated"), ("dropped", "left out"), ("turn_samples", "turn samples"),
    ("padding_share_unpacked", "padding unpacked"), ("padding_share_packed", "padding packed"),
]


def write_report(path: Path, summary: dict, stats: dict) -> None:
    lines = [
        "# Tokenize",
        "",
        f"- SFT samples (train): **{summary['labeled_examples']}**; CPT tokens (train): "
        f"**{summary['unlabeled_tokens']}**; preference pairs (train): **{summary['preference_pairs']}**",
        f"- Chat template: `{summary['template_source']}`, sha256 `{summary['template_hash'][:16]}…` "
        "(saved in `tokenizer/chat_template.jinja`)",
        f"- max_length {summary['max_length']}; {summary['seconds']} s" + (" (from cache)" if summary["cached"] else ""),
        "",
        "| data | " + " | ".join(title for _, title in COLUMNS) + " |",
        "|---|" + "---:|" * len(COLUMNS),
    ]
    notes, left_out = [], []
    for folder, splits in stats.items():
        for split, row in splits.items():
            if not row["samples_in"]:
                continue
            dropped = {k: v for k, v in row.items() if k.startswith("dropped_") and k != "dropped_tokens" and isinstance(v, int) and v}
            cells = {**row, "dropped": sum(dropped.values()), "turn_samples": row.get("turn_samples", "")}
            lines.append(f"| {folder}/{split} | " + " | ".join(_cell(key, cells[key]) for key, _ in COLUMNS) + " |")
            examples = row.get("drop_examples", {})
            for reason, count in dropped.items():
                example = examples.get(reason)
                where = f" — e.g. `{example['file']}` line {example['line']}: {example['detail']}" if example else ""
                left_out.append(f"- {folder}/{split}: **{reason[len('dropped_'):]}** {count}{where}")
            if row.get("turn_samples"):
                notes.append(f"- {folder}/{split}: the template renders history differently from the last turn, so "
                             f"{row['turn_samples']} extra samples teach later turns, each as the model sees it then")
            if row.get("reasoning_rebuilt"):
                notes.append(f"- {folder}/{split}: {row['reasoning_rebuilt']} samples teach reasoning the template strips "
                             "from its own render; the turn was rebuilt in the form the model generates it")
            if row.get("control_text_as_text"):
                notes.append(f"- {folder}/{split}: {row['control_text_as_text']} samples hold control-token text in their "
                             "messages; it was tokenized as text, never as control tokens")
            if row.get("truncated") and row["truncated"] > 0.1 * row["samples_in"]:
                notes.append(f"- {folder}/{split}: {row['truncated']} of {row['samples_in']} samples were cut at "
                             f"max_length {summary['max_length']}: raise tokenize.max_length if answers lose their ends")
    if left_out:
        lines += ["", "## Left out (no sample)", "", *left_out]
    if notes:
        lines += ["", "## Notes", "", *notes]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def _cell(key: str, value) -> str:
    return f"{value:.1%}" if key.startswith("padding") else str(value)
