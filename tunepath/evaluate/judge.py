"""Optional model-as-judge: an OpenAI-compatible chat endpoint compares the base and the tuned answer to each
held-out prompt, pairwise, asked twice with the answers in swapped positions so a judge that favours the first
(or second) slot cancels out. Off unless `evaluate.judge.base_url` is set; an endpoint that does not answer
fails the stage (a judge that was asked for and not heard is not a pass).

Per prompt the tuned answer scores 1 (preferred in both orders), 0.5 (split, tie, or an unreadable verdict) or 0;
the mean is the tuned win rate, with a bootstrap interval like every other metric.
"""

from __future__ import annotations

import logging
import os
import re

from pydantic import Field

from tunepath.errors import StageError
from tunepath.strict import Strict

log = logging.getLogger(__name__)

RUBRIC = ("You compare two answers of a customer-support assistant to the same customer message. Prefer the answer "
          "that is correct according to the reference answer, answers what was asked, and is concise and polite.")


class JudgeConfig(Strict):
    """The judge endpoint (off while base_url is null)."""

    base_url: str | None = Field(None, description="OpenAI-compatible API root, e.g. http://127.0.0.1:8000/v1; null: no judge.")
    model: str = Field("judge", description="Model name sent to the endpoint.")
    rubric: str = Field(RUBRIC, description="What the judge is told to prefer.")
    api_key_env: str = Field("OPENAI_API_KEY", description="Environment variable holding the endpoint's API key (unset: none sent).")
    prompts: int = Field(20, ge=1, description="Held-out prompts judged (each twice, positions swapped).")
    timeout_s: float = Field(60.0, gt=0, description="Seconds to wait for one verdict.")
    min_win_rate: float = Field(
        0.5, ge=0, le=1, description="Gate: fails when the upper end of the interval of the tuned win rate is below this (tuned surely judged worse)."
    )


class JudgeUnreachable(StageError):
    """The judge endpoint did not answer."""


def _question(cfg: JudgeConfig, prompt: str, reference: str, first: str, second: str) -> list[dict]:
    return [
        {"role": "system", "content": cfg.rubric + " Reply with exactly one of: A, B, tie."},
        {"role": "user", "content": f"Customer message:\n{prompt}\n\nReference answer:\n{reference}\n\n"
                                    f"Answer A:\n{first}\n\nAnswer B:\n{second}\n\nWhich answer is better? Reply A, B or tie."},
    ]


def verdict(text: str) -> str | None:
    """'A', 'B' or 'tie' from the judge's reply; None when it says none of them first."""
    m = re.search(r"\b(A|B|tie)\b", text or "", flags=re.IGNORECASE)
    if not m:
        return None
    word = m.group(1)
    return "tie" if word.lower() == "tie" else word.upper()


def judge_pairs(cfg: JudgeConfig, items: list[dict]) -> dict:
    """`items`: [{"prompt", "reference", "base", "tuned"}]; returns per-prompt tuned scores and the raw verdicts."""
    from openai import APIConnectionError, APIStatusError, APITimeoutError, OpenAI

    client = OpenAI(base_url=cfg.base_url, api_key=os.environ.get(cfg.api_key_env) or "not-needed",
                    timeout=cfg.timeout_s, max_retries=0)
    scores, verdicts, unreadable = [], [], 0
    for item in items[: cfg.prompts]:
        points = 0.0
        pair = []
        for tuned_first in (False, True):
            first, second = (item["tuned"], item["base"]) if tuned_first else (item["base"], item["tuned"])
            try:
                reply = client.chat.completions.create(model=cfg.model, temperature=0, max_tokens=8,
                                                       messages=_question(cfg, item["prompt"], item["reference"], first, second))
            except (APIConnectionError, APITimeoutError) as e:
                raise JudgeUnreachable(f"evaluate.judge.base_url: {cfg.base_url} did not answer ({type(e).__name__}); "
                                       "start the judge server or set evaluate.judge.base_url to null") from e
            except APIStatusError as e:
                raise JudgeUnreachable(f"evaluate.judge.base_url: {cfg.base_url} refused the request (HTTP {e.status_code}); "
                                       "check evaluate.judge.model and the API key") from e
            text = reply.choices[0].message.content or ""
            v = verdict(text)
            unreadable += v is None
            tuned_slot = "A" if tuned_first else "B"
            points += 1.0 if v == tuned_slot else 0.5 if v in (None, "tie") else 0.0
            pair.append(text[:40])
        scores.append(points / 2)
        verdicts.append(pair)
    log.info("judge %s: %d prompts, tuned win rate %.2f, %d unreadable verdicts", cfg.base_url, len(scores),
             sum(scores) / max(len(scores), 1), unreadable)
    return {"scores": scores, "verdicts": verdicts, "unreadable": unreadable, "model": cfg.model, "base_url": cfg.base_url}


def judge_gate(cfg: JudgeConfig, win_rate: dict, unreadable: int, n: int) -> dict:
    return {"metric": "judge_win_rate", "rule": f"upper end of the tuned win rate's interval >= {cfg.min_win_rate}",
            "passed": win_rate["high"] >= cfg.min_win_rate,
            "detail": f"judge {cfg.model} preferred tuned over base: win rate {win_rate['value']:.2f} [{win_rate['low']:.2f}, "
                      f"{win_rate['high']:.2f}] over {n} prompts (both orders; {unreadable} unreadable verdicts count as ties), "
                      f"needs upper end >= {cfg.min_win_rate}"}
