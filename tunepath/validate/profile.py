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


def _stats(values) -> dict:
    import numpy as np

    if not len(values):
        return {"min": 0, "mean": 0.0, "p50": 0, "p95": 0, "max": 0}
    values = np.sort(np.asarray(values, dtype=np.int64))  # a million lengths sort in 8 MB, not as Python ints
    n = len(values)
    return {"min": int(values[0]), "mean": round(int(values.sum()) / n, 1), "p50": int(values[(n - 1) // 2]),
            "p95": int(values[min(n - 1, round(0.95 * (n - 1)))]), "max": int(values[-1])}


class ProfileTally:
    """The profile's counts over some records; tallies of chunks merge, in order, into the whole data's."""

    def __init__(self) -> None:
        from array import array

        self.lengths = {kind: array("q") for kind in KINDS}  # 8 bytes a record: the percentiles need every length
        self.splits = {split: {kind: 0 for kind in KINDS} for split in ("train", "eval")}
        self.turns = self.assistant_turns = self.tool_calls = self.desirable = 0
        self.cjk = self.cyrillic = self.arabic = self.non_ascii = 0

    def add(self, record: dict) -> None:
        kind = record["kind"]
        self.splits[record["split"]][kind] += 1
        total = 0
        for content in _contents(record):
            total += len(content)
            if not content.isascii():  # the regexes run only on the few non-ASCII strings
                self.non_ascii += len(_ASCII_RUNS.sub("", content))
                self.cjk += len(_CJK.findall(content))
                self.cyrillic += len(_CYRILLIC.findall(content))
                self.arabic += len(_ARABIC.findall(content))
        self.lengths[kind].append(total)
        if kind == "conversation":
            self.turns += len(record["messages"])
            self.assistant_turns += sum(1 for m in record["messages"] if m["role"] == "assistant")
            self.tool_calls += sum(len(m.get("tool_calls", ())) for m in record["messages"] if len(m) > 2)
        elif kind == "feedback":
            self.desirable += record["label"] is True

    def merge(self, other: "ProfileTally") -> None:
        for kind in KINDS:
            self.lengths[kind].extend(other.lengths[kind])
            for split in self.splits:
                self.splits[split][kind] += other.splits[split][kind]
        for name in ("turns", "assistant_turns", "tool_calls", "desirable", "cjk", "cyrillic", "arabic", "non_ascii"):
            setattr(self, name, getattr(self, name) + getattr(other, name))

    def result(self) -> dict:
        lengths = self.lengths
        characters = {kind: sum(v) for kind, v in lengths.items()}
        all_chars = sum(characters.values()) or 1
        return {
            "conversations": len(lengths["conversation"]),
            "turns": self.turns,
            "assistant_turns": self.assistant_turns,
            "documents": len(lengths["text"]),
            "preference_pairs": len(lengths["preference"]),
            "feedback_examples": len(lengths["feedback"]),
            "feedback_desirable": self.desirable,
            "tool_calls": self.tool_calls,
            "characters": characters,
            "cjk_share": round(self.cjk / all_chars, 4),
            "scripts": {"cjk": round(self.cjk / all_chars, 4), "cyrillic": round(self.cyrillic / all_chars, 4),
                        "arabic": round(self.arabic / all_chars, 4), "non_ascii": round(self.non_ascii / all_chars, 4)},
            "lengths": {kind: _stats(v) for kind, v in lengths.items()},
            "splits": {split: dict(counts) for split, counts in self.splits.items()},
        }


def build_profile(records: Iterable[dict]) -> dict:
    """Counts per kind and split, characters, per-kind length stats (characters) and the share of CJK text."""
    tally = ProfileTally()
    for record in records:
        tally.add(record)
    return tally.result()
