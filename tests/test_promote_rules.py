"""The promotion rule and the decision report, without a registry."""

from __future__ import annotations

from tunepath.promote import PromoteConfig
from tunepath.promote.decide import Scores, compare
from tunepath.promote.report import render_decision


def test_lower_perplexity_by_the_margin_wins():
    cfg = PromoteConfig(min_improvement=0.01, generation_slack=0.125)
    champion = Scores(20.0, 0.25, 0.75, 8)
    assert compare(cfg, Scores(19.0, 0.25, 0.75, 8), champion).promote
    close = compare(cfg, Scores(19.9, 0.25, 0.75, 8), champion)
    assert not close.promote and "needs <= 19.8000" in close.reason


def test_samples_may_not_get_worse_beyond_the_slack():
    cfg = PromoteConfig(min_improvement=0.0, generation_slack=0.125)
    champion = Scores(20.0, 0.25, 0.75, 8)
    assert compare(cfg, Scores(15.0, 0.375, 0.625, 8), champion).promote  # one sample in eight is within the slack
    looping = compare(cfg, Scores(15.0, 0.5, 0.75, 8), champion)
    assert not looping.promote and "degenerate share" in looping.reason
    silent = compare(cfg, Scores(15.0, 0.25, 0.5, 8), champion)
    assert not silent.promote and "stop-at-end-of-turn" in silent.reason


def test_without_samples_only_perplexity_is_compared():
    assert [c["check"] for c in compare(PromoteConfig(), Scores(10.0, 1.0, 0.0, 0), Scores(20.0, 0.0, 1.0, 0)).checks] == ["perplexity"]


def test_decision_report_shows_numbers_and_aliases():
    record = {"model": "m", "decision": "rejected", "reason": "candidate is not better", "forced": False,
              "compared_on": "recorded", "candidate": {"version": "2", "perplexity": "21.5", "data_hash": "abc", "git_commit": "def"},
              "champion": {"version": "1", "perplexity": 20.0, "data_hash": "abc", "git_commit": "123"},
              "checks": [{"check": "perplexity", "passed": False, "detail": "candidate 21.5 vs champion 20.0"}],
              "champion_after": "1", "previous_after": None}
    text = render_decision(record)
    assert "rejected" in text and "| candidate | 2 | 21.5000 |" in text and "version **1**" in text and "| perplexity | **no** |" in text
