"""Deterministic train/eval split by record-id hash.

A record goes to eval when `sha256(id + ":" + seed)` read as a fraction in [0, 1) is below `eval_share`. The
decision depends on the record alone, so appending rows never moves an old record, and duplicates (same
content, same id) cannot land on both sides.

Small data sets: a kind with at least two records and none in eval gets its record with the smallest
fraction moved to eval (and one with none in train gets its largest moved to train), so evaluation always
sees every kind. This is the one place where adding rows can move a record: once a record of that kind
falls in eval on its own, the forced one returns to train.
"""

from __future__ import annotations

import hashlib
from collections import defaultdict


def split_fraction(record_id: str, seed: int) -> float:
    digest = hashlib.sha256(f"{record_id}:{seed}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def assign_splits(records: list[tuple[str, str]], eval_share: float, seed: int) -> list[str]:
    """Split of each (id, kind) in `records`: "train" or "eval"."""
    fractions = [split_fraction(record_id, seed) for record_id, _ in records]
    splits = ["eval" if f < eval_share else "train" for f in fractions]
    if eval_share <= 0:
        return splits
    by_kind: dict[str, list[int]] = defaultdict(list)
    for i, (_, kind) in enumerate(records):
        by_kind[kind].append(i)
    for positions in by_kind.values():
        if len(positions) < 2:
            continue
        if all(splits[i] == "train" for i in positions):
            splits[min(positions, key=fractions.__getitem__)] = "eval"
        elif all(splits[i] == "eval" for i in positions):
            splits[max(positions, key=fractions.__getitem__)] = "train"
    return splits
