"""Task metrics of one generated answer against its reference: exact match, token F1, ROUGE-L and chrF.

Words are lower-cased runs of letters and digits; every CJK character is a word of its own. rouge-score's default
tokenizer keeps only [a-z0-9] and would score any Chinese answer 0, so ROUGE-L gets this tokenizer instead.
chrF (sacrebleu) works on characters and needs no word split at all.
"""

from __future__ import annotations

import re
import unicodedata
from collections import Counter
from functools import cache

METRICS = ("exact_match", "token_f1", "rouge_l", "chrf")
# CJK ideographs, kana, hangul and the CJK punctuation blocks: scripts written without spaces between words
_CJK = "\u2e80-\u9fff\uac00-\ud7af\uf900-\ufaff\uff00-\uffef"
_WORD = re.compile(rf"[{_CJK}]|[^\W_{_CJK}]+", re.UNICODE)


def words(text: str) -> list[str]:
    """Lower-cased words; punctuation dropped; each CJK character one word."""
    text = unicodedata.normalize("NFKC", text).lower()
    return [w for w in _WORD.findall(text) if not unicodedata.category(w[0]).startswith("P")]


class _Tokenizer:
    """The object rouge-score calls (`tokenize(text) -> list[str]`)."""

    def tokenize(self, text: str) -> list[str]:
        return words(text)


@cache
def _rouge():
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rougeL"], tokenizer=_Tokenizer())


@cache
def _chrf():
    from sacrebleu.metrics import CHRF

    return CHRF()


def exact_match(answer: str, reference: str) -> float:
    return float(" ".join(words(answer)) == " ".join(words(reference)))


def token_f1(answer: str, reference: str) -> float:
    """SQuAD-style F1 over word multisets."""
    a, r = words(answer), words(reference)
    if not a or not r:
        return float(a == r)
    common = sum((Counter(a) & Counter(r)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(a), common / len(r)
    return 2 * precision * recall / (precision + recall)


def rouge_l(answer: str, reference: str) -> float:
    return _rouge().score(reference, answer)["rougeL"].fmeasure


def chrf(answer: str, reference: str) -> float:
    """chrF on a 0-1 scale (sacrebleu reports 0-100)."""
    return _chrf().sentence_score(answer, [reference]).score / 100.0


SCORERS = {"exact_match": exact_match, "token_f1": token_f1, "rouge_l": rouge_l, "chrf": chrf}


def score_answers(answers: list[str], references: list[str]) -> dict[str, list[float]]:
    """{metric: one score per answer}."""
    return {name: [fn(a, r) for a, r in zip(answers, references)] for name, fn in SCORERS.items()}


def mismatched_scores(answers: list[str], references: list[str], metric: str, shifts: int = 8) -> list[float]:
    """Per answer: its mean score against the references of other prompts (the next `shifts` rows, cyclically).

    An answer that fits its own prompt scores well above this; one that ignores the prompt (a model trained on
    shuffled labels answers everything alike) scores the same against any reference.
    """
    n = len(answers)
    fn = SCORERS[metric]
    steps = range(1, min(shifts, n - 1) + 1)
    return [sum(fn(answers[i], references[(i + k) % n]) for k in steps) / max(len(steps), 1) for i in range(n)]
