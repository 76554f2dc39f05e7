"""The validation report: counts per file, reason, kind and split (report.json) and a page for people (report.md)."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field


@dataclass(slots=True)
class FileTally:
    read: int = 0
    accepted: int = 0
    rejected: int = 0
    reasons: Counter = field(default_factory=Counter)
    formats: Counter = field(default_factory=Counter)
    detection: str = "per row"  # how the format was chosen: per row, a param, or dataset_info.json

    def as_dict(self) -> dict:
        return {"read": self.read, "accepted": self.accepted, "rejected": self.rejected,
                "accepted_share": round(self.accepted / self.read, 4) if self.read else 0.0,
                "detection": self.detection,
                "reasons": by_count(self.reasons), "formats": by_count(self.formats)}


def by_count(counts: Counter) -> dict:
    """Most common first; ties by name, so the order does not depend on which row came first to a worker."""
    return dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))


def reason_code(reason: str) -> str:
    return reason.split(":", 1)[0]


def build_report(*, files: dict[str, FileTally], kinds: dict, splits: dict, control_tokens: dict, gx: dict,
                 warnings: list[str], skipped: list[str], max_reject_share: float, timings: dict) -> dict:
    reasons: Counter = Counter()
    for tally in files.values():
        reasons.update(tally.reasons)
    read = sum(t.read for t in files.values())
    accepted = sum(t.accepted for t in files.values())
    rejected = sum(t.rejected for t in files.values())
    return {
        "totals": {"read": read, "accepted": accepted, "rejected": rejected,
                   "reject_share": round(rejected / read, 6) if read else 0.0, "max_reject_share": max_reject_share},
        "files": {name: tally.as_dict() for name, tally in files.items()},
        "reasons": by_count(reasons),
        "kinds": kinds,
        "splits": splits,
        "control_tokens": control_tokens,
        "gx": gx,
        "skipped_files": skipped,
        "warnings": warnings,
        "timings_s": timings,
    }


def _cell(text: object) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def render_markdown(report: dict) -> str:
    t = report["totals"]
    lines = [
        "# Data validation",
        "",
        f"**{t['accepted']} of {t['read']} rows accepted**, {t['rejected']} rejected ({t['reject_share']:.2%}; "
        f"the stage fails above {t['max_reject_share']:.0%}). Split: {report['splits'].get('train', 0)} train, "
        f"{report['splits'].get('eval', 0)} eval.",
        "",
        "Accepted: " + ", ".join(f"{k['accepted']} {name}" for name, k in report["kinds"].items()) + ".",
        "",
        "Per file: the format detected (by row, a param or dataset_info.json), rows, and the top reasons of rejects.",
        "",
        "| file | format | detected by | read | accepted | rejected | top reasons |",
        "|---|---|---|---:|---:|---:|---|",
    ]
    for name, f in report["files"].items():
        formats = ", ".join(f"{k} {v}" for k, v in f["formats"].items()) or "-"
        reasons = ", ".join(f"{k} {v}" for k, v in list(f["reasons"].items())[:3]) or "-"
        share = f" ({f['accepted'] / f['read']:.0%})" if f["read"] else ""
        lines.append(f"| {_cell(name)} | {_cell(formats)} | {_cell(f.get('detection', '-'))} | {f['read']} | "
                     f"{f['accepted']}{share} | {f['rejected']} | {_cell(reasons)} |")
    if report["reasons"]:
        lines += ["", "| reason | rows |", "|---|---:|"]
        lines += [f"| {code} | {n} |" for code, n in report["reasons"].items()]
    if report["gx"]:
        lines += ["", "Contracts (Great Expectations):"]
        for kind, g in report["gx"].items():
            s = g["statistics"]
            failed = [e["code"] for e in g["expectations"] if not e["success"]]
            lines.append(f"- {kind}: {s['successful_expectations']} of {s['evaluated_expectations']} expectations met"
                         + (f"; unmet: {', '.join(failed)}" if failed else ""))
    ct = report["control_tokens"]
    if ct["rows"]:
        lines += ["", f"Control-token text found in {ct['rows']} rows (policy: {ct['policy']}): "
                  + ", ".join(f"`{k}` {v}" for k, v in ct["by_token"].items())]
    ph = report.get("placeholders") or {}
    if ph.get("rows"):
        lines += ["", f"Template placeholders left in {ph['rows']} rows (policy: {ph['policy']}; fill them with "
                  "validate.placeholders): " + ", ".join(f"`{{{{{k}}}}}` {v}" for k, v in ph["by_name"].items())]
    chunked = report.get("chunked") or {}
    if chunked.get("documents"):
        lines += ["", f"Long documents: {chunked['documents']} cut into {chunked['pieces']} pieces; rule: {chunked['rule']}."]
    if report["warnings"]:
        lines += ["", "Warnings:"] + [f"- {_cell(w)}" for w in report["warnings"]]
    lines += ["", "Every rejected row is in `rejects.jsonl` with its file, line, raw text and all its reasons."]
    return "\n".join(lines) + "\n"
