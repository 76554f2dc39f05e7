"""The evaluate stage: held-out loss and perplexity of the base and the tuned model, generation samples, gates."""

from __future__ import annotations

from pydantic import Field

from tunepath.strict import Strict


class EvaluateConfig(Strict):
    """What is measured on the held-out split, and the gates a tuned model must pass to be registered."""

    batch_size: int = Field(8, ge=1, description="Rows per forward pass when scoring.")
    samples: int = Field(8, ge=0, description="Held-out conversations to generate answers for (with and without the template).")
    max_new_tokens: int = Field(48, ge=1, description="Longest generated answer, in tokens.")
    min_ppl_improvement: float = Field(
        0.05, ge=0, lt=1, description="Gate: tuned perplexity must be at least this share below the base's (0.05 = 5% lower)."
    )
    max_degenerate_share: float = Field(
        0.5, ge=0, le=1, description="Gate: at most this share of templated samples may be empty or loop on one n-gram."
    )
    repeat_ngram: int = Field(4, ge=2, description="An answer repeating one n-gram of this size 4+ times in a row counts as degenerate.")
