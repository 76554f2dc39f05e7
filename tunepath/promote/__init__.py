"""Promotion: move the registry alias `champion` to the `candidate` version only when it is better.

    tunepath promote [--model NAME]   # compare candidate with champion; move `champion` when the candidate wins
    tunepath promote --force          # move it without comparing (recorded as forced)
    tunepath promote --rollback       # point `champion` back at `previous`

The comparison uses the gate metrics (held-out perplexity, share of degenerate samples, share of samples that
stop at the end-of-turn token). When both versions were evaluated on the same held-out data the same way (same
`eval.fingerprint` and `data_hash` tags), their recorded numbers are compared; otherwise both are re-evaluated
on the candidate's held-out split (logged with each version) before deciding. The decision and its numbers are
written as `promotion.*` tags on the candidate version; the old champion stays reachable as `previous`.
"""

from __future__ import annotations

from pydantic import Field

from tunepath.strict import Strict


class PromoteConfig(Strict):
    """When a candidate replaces the champion."""

    min_improvement: float = Field(
        0.01, ge=0, lt=1, description="Candidate perplexity must be at least this share below the champion's (0.01 = 1% lower)."
    )
    generation_slack: float = Field(
        0.125, ge=0, le=1,
        description="Degenerate and stop-at-end-of-turn shares may be this much worse than the champion's (0.125 = one sample in eight).",
    )
