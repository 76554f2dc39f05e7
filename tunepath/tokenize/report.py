"""report.md: the tokenize stats as a table for a person (published as a Prefect artifact)."""

from __future__ import annotations

from pathlib import Path

COLUMNS = [
    ("samples_in", "in"), ("samples_out", "out"), ("rows", "rows"), ("tokens", "tokens"), ("label_tokens", "learnt"),
    ("truncated", "truncated"), ("dropped_too_long", "dropped long"), ("dropped_no_labels", "dropped no labels"),
    ("dropped_unrenderable", "dropped unrenderable"), ("padding_share_unpacked", "padding unpacked"),
    ("padding_share_packed", "padding packed"),
]


def write_report(path: Path, summary: dict, stats: dict) -> None:
    lines = [
        "# Tokenize",
        "",
        f"- SFT conversations (train): **{summary['labeled_examples']}**; CPT tokens (train): "
        f"**{summary['unlabeled_tokens']}**; preference pairs (train): **{summary['preference_pairs']}**",
        f"- Chat template: `{summary['template_source']}`, sha256 `{summary['template_hash'][:16]}…` "
        "(saved in `tokenizer/chat_template.jinja`)",
        f"- max_length {summary['max_length']}; {summary['seconds']} s" + (" (from cache)" if summary["cached"] else ""),
        "",
        "| data | " + " | ".join(title for _, title in COLUMNS) + " |",
        "|---|" + "---:|" * len(COLUMNS),
    ]
    for folder, splits in stats.items():
        for split, row in splits.items():
            if not row["samples_in"]:
                continue
            cells = [f"{row[key]:.1%}" if key.startswith("padding") else str(row[key]) for key, _ in COLUMNS]
            lines.append(f"| {folder}/{split} | " + " | ".join(cells) + " |")
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
