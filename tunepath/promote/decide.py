"""The promotion rule, as a pure function of the comparison (the evaluate stage's `compare`, champion on the
reference side, candidate on the other): easy to read, easy to test."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from tunepath.promote import PromoteConfig


@dataclass
class Verdict:
    promote: bool
    reason: str
    checks: list[dict] = field(default_factory=list)

    def as_dict(self) -> dict:
        return asdict(self)


def _ci(c: dict) -> str:
    return f"{c['value']:.4f} [{c['low']:.4f}, {c['high']:.4f}]"


def compare(cfg: PromoteConfig, comparison: dict, primary: str) -> Verdict:
    """The candidate wins when the interval of its gain over the champion on the primary metric lies above
    `min_improvement`, and its answers do not loop or run on more often beyond the slack."""
    p = comparison[primary]
    gain = "relative perplexity reduction" if primary == "perplexity" else f"{primary} candidate - champion"
    checks = [{"check": primary, "passed": p["diff"]["low"] > cfg.min_improvement,
               "detail": f"{primary}: candidate {_ci(p['tuned'])} vs champion {_ci(p['base'])}; {gain} {_ci(p['diff'])}, "
                         f"needs lower end > {cfg.min_improvement}"}]
    if "degenerate_share" in comparison:
        d = comparison["degenerate_share"]
        checks.append({"check": "degenerate", "passed": d["tuned"]["value"] <= d["base"]["value"] + cfg.generation_slack,
                       "detail": f"degenerate share {d['tuned']['value']:.2f} vs champion {d['base']['value']:.2f} (slack {cfg.generation_slack})"})
        s = comparison["stopped_at_eot_share"]
        checks.append({"check": "stop_at_eot", "passed": s["tuned"]["value"] >= s["base"]["value"] - cfg.generation_slack,
                       "detail": f"stop-at-end-of-turn share {s['tuned']['value']:.2f} vs champion {s['base']['value']:.2f} "
                                 f"(slack {cfg.generation_slack})"})
    failed = [c for c in checks if not c["passed"]]
    if failed:
        return Verdict(False, "candidate is not better: " + "; ".join(c["detail"] for c in failed), checks)
    return Verdict(True, "candidate is better: " + "; ".join(c["detail"] for c in checks), checks)
