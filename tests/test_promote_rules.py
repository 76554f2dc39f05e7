"""The promotion rule and the decision report, without a registry."""

from __future__ import annotations

from tunepath.promote import PromoteConfig
from tunepath.promote.decide import compare
from tunepath.promote.report import render_decision


def ci(value, low=None, high=None):
    return {"value": value, "low": value if low is None else low, "high": value if high is None else high}


def comparison(diff=(0.1, 0.05, 0.15), degenerate=(0.25, 0.25), stop=(0.75, 0.75), answers=True):
    c = {"rouge_l": {"base": ci(0.3), "tuned": ci(0.4), "diff": ci(*diff)},
         "perplexity": {"base": ci(20.0), "tuned": ci(18.0), "diff": ci(0.1, 0.05, 0.15)}}
    if answers:
        c["degenerate_share"] = {"base": ci(degenerate[0]), "tuned": ci(degenerate[1]), "diff": ci(degenerate[1] - degenerate[0])}
        c["stopped_at_eot_share"] = {"base": ci(stop[0]), "tuned": ci(stop[1]), "diff": ci(stop[1] - stop[0])}
    return c


def test_the_candidate_must_beat_the_champion_with_the_interval_clear_of_the_margin():
    cfg = PromoteConfig(min_improvement=0.0, generation_slack=0.125)
    assert compare(cfg, comparison(), "rouge_l").promote
    unsure = compare(cfg, comparison(diff=(0.02, -0.01, 0.05)), "rouge_l")
    assert not unsure.promote and "needs lower end > 0.0" in unsure.reason and "[-0.0100, 0.0500]" in unsure.reason
    assert not compare(PromoteConfig(min_improvement=0.06), comparison(), "rouge_l").promote
    assert compare(cfg, comparison(), "perplexity").checks[0]["check"] == "perplexity"


def test_answers_may_not_get_worse_beyond_the_slack():
    cfg = PromoteConfig(min_improvement=0.0, generation_slack=0.125)
    assert compare(cfg, comparison(degenerate=(0.25, 0.375), stop=(0.75, 0.625)), "rouge_l").promote  # within the slack
    looping = compare(cfg, comparison(degenerate=(0.25, 0.5)), "rouge_l")
    assert not looping.promote and "degenerate share" in looping.reason
    silent = compare(cfg, comparison(stop=(0.75, 0.5)), "rouge_l")
    assert not silent.promote and "stop-at-end-of-turn" in silent.reason


def test_without_answers_only_the_primary_metric_is_compared():
    assert [c["check"] for c in compare(PromoteConfig(), comparison(answers=False), "perplexity").checks] == ["perplexity"]


def test_decision_report_shows_numbers_the_comparison_and_aliases():
    record = {"model": "m", "decision": "rejected", "reason": "candidate is not better", "forced": False,
              "compared_on": "recorded", "candidate": {"version": "2", "perplexity": "21.5", "data_hash": "abc", "git_commit": "def"},
              "champion": {"version": "1", "perplexity": 20.0, "data_hash": "abc", "git_commit": "123"},
              "checks": [{"check": "perplexity", "passed": False, "detail": "candidate 21.5 vs champion 20.0"}],
              "primary_metric": "rouge_l", "comparison": comparison(),
              "champion_after": "1", "previous_after": None}
    text = render_decision(record)
    assert "rejected" in text and "| candidate | 2 | 21.5000 |" in text and "version **1**" in text and "| perplexity | **no** |" in text
    assert "| metric | champion v1 | candidate v2 | difference (candidate v2 - champion v1) |" in text
    assert "| ROUGE-L **(primary)** | 0.300 [0.300, 0.300] | 0.400 [0.400, 0.400] | 0.100 [0.050, 0.150] |" in text
