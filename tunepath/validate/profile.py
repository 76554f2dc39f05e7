"""The data profile of the accepted records, read by the route stage (counts, characters, rough languages)."""

from __future__ import annotations

import re
from collections.abc import Iterable

from tunepath.records import KINDS

# Han, Hiragana/Katakana, Hangul and their compatibility blocks: enough for a rough "is this CJK data" signal
_CJK = re.compile(r"[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af\uf900-\ufaff\uff66-\uff9f]")
_CYRILLIC = re.compile(r"[\u0400-\u04ff]")
_ARABIC = re.compile(r"[\u0600-\u06ff]")
_ASCII_RUNS = re.compile(r"[\x00-\x7f]+")


def _contents(record: dict) -> Iterable[str]:
    if record["kind"] == "text":
        yield record["text"]
    else:
        for part in ("prompt", "chosen", "rejected") if record["kind"] == "preference" else ("messages",):
            for m in record[part]:
                yield m["content"]


def _stats(values: list[int]) -> dict:
    if not values:
        return {"min": 0, "mean": 0.0, "p50": 0, "p95": 0, "max": 0}
    values = sorted(values)
    n = len(values)
    return {"min": values[0], "mean": round(sum(values) / n, 1), "p50": values[(n - 1) // 2],
            "p95": values[min(n - 1, round(0.95 * (n - 1)))], "max": values[-1]}


def build_profile(records: Iterable[dict]) -> dict:
    """Counts per kind and split, characters, per-kind length stats (characters) and the share of CJK text."""
    lengths: dict[str, list[int]] = {kind: [] for kind in KINDS}
    splits = {split: {kind: 0 for kind in KINDS} for split in ("train", "eval")}
    turns = assistant_turns = tool_calls = desirable = 0
    cjk = cyrillic = arabic = non_ascii = 0
    for record in records:
        kind = record["kind"]
        splits[record["split"]][kind] += 1
        total = 0
        for content in _contents(record):
            total += len(content)
            if not content.isascii():  # the regexes run only on the few non-ASCII strings
                non_ascii += len(_ASCII_RUNS.sub("", content))
                cjk += len(_CJK.findall(content))
                cyrillic += len(_CYRILLIC.findall(content))
                arabic += len(_ARABIC.findall(content))
        lengths[kind].append(total)
        if kind == "conversation":
            turns += len(record["messages"])
            assistant_turns += sum(1 for m in record["messages"] if m["role"] == "assistant")
            tool_calls += sum(len(m.get("tool_calls", ())) for m in record["messages"] if len(m) > 2)
        elif kind == "feedback":
            desirable += record["label"] is True
    characters = {kind: sum(v) for kind, v in lengths.items()}
    all_chars = sum(characters.values()) or 1
    return {
        "conversations": len(lengths["conversation"]),
        "turns": turns,
        "assistant_turns": assistant_turns,
        "documents": len(lengths["text"]),
        "preference_pairs": len(lengths["preference"]),
        "feedback_examples": len(lengths["feedback"]),
        "feedback_desirable": desirable,
        "tool_calls": tool_calls,
        "characters": characters,
        "cjk_share": round(cjk / all_chars, 4),
        "scripts": {"cjk": round(cjk / all_chars, 4), "cyrillic": round(cyrillic / all_chars, 4),
                    "arabic": round(arabic / all_chars, 4), "non_ascii": round(non_ascii / all_chars, 4)},
        "lengths": {kind: _stats(v) for kind, v in lengths.items()},
        "splits": splits,
    }
