"""The gates: each one a rule from params with the numbers that decided it. One failed gate blocks registration."""

from __future__ import annotations

from tunepath.errors import StageError
from tunepath.evaluate import EvaluateConfig


class GateFailed(StageError):
    """The tuned model did not pass an evaluation gate: nothing downstream may register it."""


def apply_gates(cfg: EvaluateConfig, base: dict, tuned: dict, kind: str, preference: dict) -> dict[str, dict]:
    """{gate name: {"passed": bool, "detail": str}}, for `base` and `tuned` as `measure` returns them."""
    limit = base["perplexity"] * (1 - cfg.min_ppl_improvement)
    gates = {
        "perplexity": {"passed": tuned["perplexity"] <= limit,
                       "detail": f"tuned {tuned['perplexity']:.3f} vs base {base['perplexity']:.3f} on {kind} eval, needs <= {limit:.3f}"},
    }
    n = tuned["samples"]
    if n:
        bad = round(tuned["degenerate_share"] * n)
        gates["degenerate"] = {"passed": tuned["degenerate_share"] <= cfg.max_degenerate_share,
                               "detail": f"{bad}/{n} samples empty or looping, allowed share {cfg.max_degenerate_share}"}
    else:
        gates["degenerate"] = {"passed": True, "detail": "no samples generated (evaluate.samples is 0 or nothing held out)"}
    if kind == "sft" and n:
        stopped = round(tuned["stopped_at_eot_share"] * n)
        gates["stop_at_eot"] = {"passed": tuned["stopped_at_eot_share"] >= cfg.min_stop_share,
                                "detail": f"{stopped}/{n} samples ended with the end-of-turn token within {cfg.max_new_tokens} "
                                          f"tokens, needs share >= {cfg.min_stop_share}"}
    if preference.get("pairs"):
        floor = preference["base_accuracy"] - cfg.max_preference_drop
        gates["preference"] = {"passed": preference["tuned_accuracy"] >= floor - 1e-12,
                               "detail": f"chosen above rejected in {preference['tuned_accuracy']:.0%} of {preference['pairs']} pairs "
                                         f"(base {preference['base_accuracy']:.0%}), needs >= {max(floor, 0):.0%}"}
    return gates


def failure_message(gates: dict[str, dict], where: str) -> str:
    failed = "; ".join(f"{name}: {g['detail']}" for name, g in gates.items() if not g["passed"])
    return f"evaluation gate failed ({failed}); nothing is registered. See {where}"
