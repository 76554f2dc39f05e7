"""Promotion: move the registry alias `champion` to the `candidate` version only when it is better.

    tunepath promote [--model NAME]   # compare candidate with champion; move `champion` when the candidate wins
    tunepath promote --force          # move it without comparing (recorded as forced)
    tunepath promote --rollback       # point `champion` back at `previous`

The comparison uses the evaluate stage's metrics and intervals: the candidate's primary metric (its
`evaluate.primary_metric`; ROUGE-L after SFT) must beat the champion's with the paired bootstrap interval of the
difference above `min_improvement`, and its answers may not loop or run on more often beyond the slack. When both
versions were evaluated on the same held-out data the same way (same `eval.fingerprint` and `data_hash` tags), their
recorded per-row scores and answers (logged with each run) are compared row by row; otherwise both are re-evaluated
on the candidate's held-out split (logged with each version) before deciding. The comparison table is written on
the candidate version (`promotion.comparison`) and into the promote flow's Prefect artifact. The decision and its numbers are
written as `promotion.*` tags on the candidate version; the old champion stays reachable as `previous`.
"""

from __future__ import annotations

from pydantic import Field

from tunepath.strict import Strict


class PromoteConfig(Strict):
    """When a candidate replaces the champion."""

    min_improvement: float = Field(
        0.0, ge=0, lt=1,
        description="The lower end of the interval of (candidate - champion) on the primary metric must be above this (perplexity: relative reduction; 0: better with the evaluation's confidence).",
    )
    generation_slack: float = Field(
        0.125, ge=0, le=1,
        description="Degenerate and stop-at-end-of-turn shares may be this much worse than the champion's (0.125 = one sample in eight).",
    )
