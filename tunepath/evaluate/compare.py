"""Two models measured on the same held-out rows, side by side: every metric with its interval for each model and
the paired interval of the difference. The evaluate stage compares base and tuned; promotion compares champion and
candidate with the same function (`base` is the reference side, `tuned` the side that must be better).
"""

from __future__ import annotations

from tunepath.evaluate.stats import Bootstrap, auc_ci, mean_ci, paired_diff_ci, perplexity_ci, perplexity_gain_ci
from tunepath.evaluate.textmetrics import METRICS, mismatched_scores, score_answers

HIGHER_IS_BETTER = {**{m: True for m in METRICS}, "perplexity": False, "preference_accuracy": True,
                    "preference_margin": True, "feedback_auc": True, "feedback_margin": True, "degenerate_share": False, "stopped_at_eot_share": True, "prompt_dependence": True}


def preference_correct(scores: list[tuple]) -> list[float]:
    """Per pair: 1 when the chosen answer has the higher mean log-probability per token. Sums would favour short
    answers whatever the model learnt (the demo's rejected answers are a tenth as long as the chosen ones)."""
    return [float(c / max(cn, 1) > r / max(rn, 1)) for c, cn, r, rn in scores]


def preference_margins(scores: list[tuple]) -> list[float]:
    """Per pair: mean log-probability per token of the chosen answer minus the rejected one's (nats). What DPO
    widens; it still moves when the base already ranks every pair right and accuracy cannot rise."""
    return [c / max(cn, 1) - r / max(rn, 1) for c, cn, r, rn in scores]


def class_gaps(values: list[float], positive: list[bool]) -> list[float]:
    """Per-row terms whose mean is mean(values of positive rows) - mean(values of negative rows): each row weighted by
    its class's share, so the usual mean interval applies (class sizes held at the sample's)."""
    n, pos = len(values), sum(positive)
    return [v * n / pos if p else -v * n / (n - pos) for v, p in zip(values, positive)]


def compare(base: dict, tuned: dict, references: list[str], boot: Bootstrap, relevance_metric: str | None = None) -> dict:
    """{metric: {"base": ci, "tuned": ci, "diff": ci}} for `base` and `tuned` as `measure` returns them; the diff of
    perplexity is the relative reduction 1 - tuned/base (positive: tuned better), every other diff is tuned - base."""
    out: dict[str, dict] = {}
    if references and tuned["answers"]:
        b = score_answers([a["text"] for a in base["answers"]], references)
        t = score_answers([a["text"] for a in tuned["answers"]], references)
        for name in METRICS:
            out[name] = {"base": mean_ci(b[name], boot), "tuned": mean_ci(t[name], boot), "diff": paired_diff_ci(t[name], b[name], boot)}
        for name in ("degenerate", "stopped_at_eot"):
            bv, tv = ([float(a[name]) for a in m["answers"]] for m in (base, tuned))
            out[f"{name}_share"] = {"base": mean_ci(bv, boot), "tuned": mean_ci(tv, boot), "diff": paired_diff_ci(tv, bv, boot)}
        if relevance_metric in METRICS and len(references) > 1:
            own = t[relevance_metric]
            other = mismatched_scores([a["text"] for a in tuned["answers"]], references, relevance_metric)
            out["relevance"] = {"metric": relevance_metric, "own": mean_ci(own, boot), "other": mean_ci(other, boot),
                                "diff": paired_diff_ci(own, other, boot)}
    bd, td = base.get("prompt_dependence") or [], tuned.get("prompt_dependence") or []
    if td and len(bd) == len(td):
        out["prompt_dependence"] = {"base": mean_ci(bd, boot), "tuned": mean_ci(td, boot), "diff": paired_diff_ci(td, bd, boot),
                                    "rows": len(td)}
    out["perplexity"] = {"base": perplexity_ci(base["row_scores"], boot), "tuned": perplexity_ci(tuned["row_scores"], boot),
                         "diff": perplexity_gain_ci(tuned["row_scores"], base["row_scores"], boot)}
    if tuned["preference"]:
        b, t = preference_correct(base["preference"]), preference_correct(tuned["preference"])
        out["preference_accuracy"] = {"base": mean_ci(b, boot), "tuned": mean_ci(t, boot), "diff": paired_diff_ci(t, b, boot),
                                      "pairs": len(t)}
        bm, tm = preference_margins(base["preference"]), preference_margins(tuned["preference"])
        out["preference_margin"] = {"base": mean_ci(bm, boot), "tuned": mean_ci(tm, boot), "diff": paired_diff_ci(tm, bm, boot),
                                    "pairs": len(tm)}
    if tuned.get("feedback"):
        per_token = [[lp / max(n, 1) for lp, n, _ in m["feedback"]] for m in (base, tuned)]
        labels = [desirable for _, _, desirable in tuned["feedback"]]
        if any(labels) and not all(labels):
            out["feedback_auc"] = {**auc_ci(per_token[1], per_token[0], labels, boot), "examples": len(labels),
                                   "desirable": sum(labels)}
            b, t = (class_gaps(x, labels) for x in per_token)
            out["feedback_margin"] = {"base": mean_ci(b, boot), "tuned": mean_ci(t, boot), "diff": paired_diff_ci(t, b, boot),
                                      "examples": len(labels)}
    return out


def per_sample_scores(answers: list[dict], references: list[str]) -> list[dict]:
    """Each answer's task metrics (for samples.jsonl and the MLflow evaluation table)."""
    scores = score_answers([a["text"] for a in answers], references)
    return [{name: scores[name][i] for name in METRICS} for i in range(len(answers))]
