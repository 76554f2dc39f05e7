"""The evaluate stage: the base and the tuned model answer every held-out prompt (batched, greedy) and are scored
against the reference answers (exact match, token F1, ROUGE-L, chrF), on answer-only perplexity and on preference
accuracy, each with a bootstrap interval; the gates are rules on those intervals.

Outputs in `artifacts/evaluate/`: `metrics.json` (numbers with intervals, gates, the held-out fingerprint),
`samples.jsonl` (per held-out prompt: reference, base and tuned answers and their scores), `row_scores.json`
(per-row log-likelihood of the tuned model, which the merge stage compares the merged model against) and
`report.md`.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from tunepath.evaluate.judge import JudgeConfig
from tunepath.strict import Strict

PrimaryMetric = Literal["auto", "rouge_l", "chrf", "token_f1", "exact_match", "perplexity", "preference_accuracy"]


class EvaluateConfig(Strict):
    """What is measured on the held-out split, and the gates a tuned model must pass to be registered."""

    batch_size: int = Field(8, ge=1, description="Rows per forward pass when scoring.")
    precision: Literal["auto", "fp32", "bf16"] = Field("auto", description="Scoring dtype: auto is bf16 on a GPU that supports it, fp32 on CPU.")
    samples: int = Field(0, ge=0, description="Held-out prompts answered by both models and scored with the task metrics; 0: every one.")
    report_samples: int = Field(6, ge=0, description="Answers shown side by side in the report (also answered without the chat template).")
    max_new_tokens: int = Field(64, ge=1, description="Longest generated answer, in tokens.")
    generation_batch_size: int = Field(16, ge=1, description="Prompts generated together (left-padded).")
    do_sample: bool = Field(False, description="Sample answers instead of greedy decoding (greedy is reproducible).")
    temperature: float = Field(1.0, gt=0, description="Sampling temperature when do_sample is on.")
    primary_metric: PrimaryMetric = Field(
        "auto", description="Metric the tuned model must beat the base on: auto is rouge_l after SFT, preference_accuracy after DPO, feedback_auc after KTO, perplexity after CPT only."
    )
    min_primary_gain: float = Field(
        0.0, description="Gate: the lower end of the interval of (tuned - base) on the primary metric must be above this (perplexity: relative reduction)."
    )
    primary_support: Literal["perplexity", "none"] = Field(
        "perplexity",
        description="When a generated-text primary metric (rouge_l, ...) cannot tell tuned from base (interval across zero, not surely worse), "
                    "the primary gate passes if the reference answers became surely likelier: the relative perplexity reduction's interval clear of min_primary_gain. none: the text metric alone decides.",
    )
    bootstrap_resamples: int = Field(1000, ge=100, le=100_000, description="Bootstrap resamples per interval.")
    confidence: float = Field(0.95, gt=0.5, lt=1, description="Two-sided confidence of every interval.")
    bootstrap_seed: int = Field(0, ge=0, description="Seed of the bootstrap resampling (and of sampling when do_sample is on).")
    check_relevance: bool = Field(
        True, description="Gate (SFT): answers must fit their own prompt: the primary metric against the own reference beats it against other prompts' references (interval clear of zero), or the tuned likelihood of each reference depends on its prompt and not surely less than the base's."
    )
    max_ppl_rise: float = Field(
        0.0, ge=0, description="Gate when perplexity is not the primary metric: fails when the whole interval of the relative perplexity reduction lies below -max_ppl_rise (tuned surely worse)."
    )
    max_degenerate_share: float = Field(
        0.5, ge=0, le=1, description="Gate: at most this share of the tuned model's answers may be empty or loop on one n-gram."
    )
    repeat_ngram: int = Field(4, ge=2, description="An answer repeating one n-gram of this size 4+ times in a row counts as degenerate.")
    min_stop_share: float = Field(
        0.0, ge=0, le=1,
        description="Gate: at least this share of the tuned model's answers must end with the end-of-turn token within max_new_tokens; 0 (off): briefly trained adapters answer right but run on, which the primary metric already charges for.",
    )
    benchmarks: list[str] = Field(
        ["evals/northwind_policy", "evals/general_text"],
        description="lm-evaluation-harness task folders (task YAML + local data, paths relative to the folder) run offline for base and tuned; [] runs none. The shipped two are the demo's domain task and a general-text forgetting check.",
    )
    benchmark_limit: int = Field(0, ge=0, description="Documents per benchmark task; 0: all.")
    max_benchmark_drop: float = Field(
        0.1, ge=0, description="Gate per benchmark task: accuracy-like scores may drop at most this much (absolute), perplexity-like ones rise at most this share.",
    )
    judge: JudgeConfig = Field(
        default_factory=JudgeConfig,
        description="Optional model-as-judge through an OpenAI-compatible chat endpoint: base_url (null: off), model, rubric, api_key_env, prompts, timeout_s, min_win_rate.",
    )
    max_preference_drop: float = Field(
        0.1, ge=0, le=1,
        description="Gate, when preference pairs are held out: tuned accuracy must be at least chance (0.5) and the interval of (tuned - base) must reach above -max_preference_drop (1 turns it off).",
    )
