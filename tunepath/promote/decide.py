"""The promotion rule, as a pure function of the numbers: easy to read, easy to test."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from tunepath.promote import PromoteConfig


@dataclass(frozen=True)
class Scores:
    """The gate metrics of one version, as recorded in its tags or re-measured."""

    perplexity: float
    degenerate_share: float
    stop_share: float
    samples: int = 0

    @classmethod
    def from_tags(cls, tags: dict) -> "Scores":
        try:
            return cls(float(tags["eval.perplexity"]), float(tags.get("eval.degenerate_share", 0.0)),
                       float(tags.get("eval.stop_share", 0.0)), int(float(tags.get("eval.samples", 0))))
        except KeyError as e:
            raise ValueError(f"model version has no {e.args[0]} tag: it was not registered by tunepath's register stage") from e


@dataclass
class Verdict:
    promote: bool
    reason: str
    checks: list[dict] = field(default_factory=list)

    def as_dict(self) -> dict:
        return asdict(self)


def compare(cfg: PromoteConfig, candidate: Scores, champion: Scores) -> Verdict:
    """The candidate wins when its perplexity is lower by the margin and its samples are not worse beyond the slack."""
    need = champion.perplexity * (1 - cfg.min_improvement)
    checks = [
        {"check": "perplexity", "passed": candidate.perplexity <= need,
         "detail": f"candidate {candidate.perplexity:.4f} vs champion {champion.perplexity:.4f}, needs <= {need:.4f}"},
    ]
    if candidate.samples and champion.samples:
        checks.append({"check": "degenerate", "passed": candidate.degenerate_share <= champion.degenerate_share + cfg.generation_slack,
                       "detail": f"degenerate share {candidate.degenerate_share:.2f} vs champion {champion.degenerate_share:.2f} "
                                 f"(slack {cfg.generation_slack})"})
        checks.append({"check": "stop_at_eot", "passed": candidate.stop_share >= champion.stop_share - cfg.generation_slack,
                       "detail": f"stop-at-end-of-turn share {candidate.stop_share:.2f} vs champion {champion.stop_share:.2f} "
                                 f"(slack {cfg.generation_slack})"})
    failed = [c for c in checks if not c["passed"]]
    if failed:
        return Verdict(False, "candidate is not better: " + "; ".join(c["detail"] for c in failed), checks)
    return Verdict(True, "candidate is better: " + "; ".join(c["detail"] for c in checks), checks)
