"""The evaluate stage: held-out loss and perplexity of the base and the tuned model, preference accuracy,
generation samples with and without the chat template, and the gates a tuned model must pass to be registered.

Outputs in `artifacts/evaluate/`: `metrics.json` (numbers, gates, the held-out fingerprint), `samples.jsonl`
(one generated answer per held-out prompt), `row_scores.json` (per-row log-likelihood of the tuned model, which
the merge stage compares the merged model against) and `report.md`.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from tunepath.strict import Strict


class EvaluateConfig(Strict):
    """What is measured on the held-out split, and the gates a tuned model must pass to be registered."""

    batch_size: int = Field(8, ge=1, description="Rows per forward pass when scoring.")
    precision: Literal["auto", "fp32", "bf16"] = Field("auto", description="Scoring dtype: auto is bf16 on a GPU that supports it, fp32 on CPU.")
    samples: int = Field(8, ge=0, description="Held-out prompts to generate answers for (with and without the template).")
    max_new_tokens: int = Field(48, ge=1, description="Longest generated answer, in tokens.")
    min_ppl_improvement: float = Field(
        0.05, ge=0, lt=1, description="Gate: tuned perplexity must be at least this share below the base's (0.05 = 5% lower)."
    )
    max_degenerate_share: float = Field(
        0.5, ge=0, le=1, description="Gate: at most this share of templated samples may be empty or loop on one n-gram."
    )
    repeat_ngram: int = Field(4, ge=2, description="An answer repeating one n-gram of this size 4+ times in a row counts as degenerate.")
    min_stop_share: float = Field(
        0.5, ge=0, le=1,
        description="Gate: at least this share of templated samples must end with the end-of-turn token within max_new_tokens (0 turns it off).",
    )
    max_preference_drop: float = Field(
        0.1, ge=0, le=1,
        description="Gate, when preference pairs are held out: tuned preference accuracy may fall at most this far below the base's (1 turns it off).",
    )
