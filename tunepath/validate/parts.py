"""The parent's side of the chunked stage: merging chunk summaries, the split rule over all chunks, and the part
files of the chunks joined into records shards and rejects.jsonl."""

from __future__ import annotations

import json
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from tunepath.records import KINDS
from tunepath.validate.report import by_count

SHARD_BYTES = 128 << 20  # records shards are about this size (parts are concatenated up to it)


def merge_examples(total: dict, more: dict, by: str, limit: int = 20) -> None:
    """Add a chunk's control-text or placeholder summary into the run's (counts add, the first examples stay)."""
    total["rows"] += more["rows"]
    counts = Counter(total[by])
    counts.update(more[by])
    total[by] = by_count(counts)
    total["examples"] = (total["examples"] + more["examples"])[:limit]


@dataclass
class Splits:
    """Items per kind and split, and the records that move when a kind would miss a split (see `split.py`)."""

    counts: dict = field(default_factory=lambda: {kind: {"train": 0, "eval": 0} for kind in KINDS})
    lowest_train: dict = field(default_factory=dict)  # kind -> (fraction, chunk, first line, lines)
    highest_eval: dict = field(default_factory=dict)

    def add(self, result: ChunkResult) -> None:
        for kind, counts in result.splits.items():
            for split, n in counts.items():
                self.counts[kind][split] += n
        for kind, (fraction, line, lines) in result.lowest_train.items():
            if kind not in self.lowest_train or fraction < self.lowest_train[kind][0]:
                self.lowest_train[kind] = (fraction, result.index, line, lines)
        for kind, (fraction, line, lines) in result.highest_eval.items():
            if kind not in self.highest_eval or fraction > self.highest_eval[kind][0]:
                self.highest_eval[kind] = (fraction, result.index, line, lines)

    def moves(self, eval_share: float) -> list[tuple[str, str, int, int, int]]:
        """(kind, new split, chunk, first line, lines) of each record to move: none when eval_share is 0."""
        if eval_share <= 0:
            return []
        out = []
        for kind, c in self.counts.items():
            if c["train"] + c["eval"] < 2:
                continue
            if c["eval"] == 0:
                _, chunk, line, lines = self.lowest_train[kind]
                out.append((kind, "eval", chunk, line, lines))
            elif c["train"] == 0:
                _, chunk, line, lines = self.highest_eval[kind]
                out.append((kind, "train", chunk, line, lines))
        return out


def move_records(part: Path, split: str, line: int, lines: int) -> None:
    """Rewrite `lines` records of a part from `line` on with `split` (one part, so bounded by a chunk)."""
    rows = part.read_text(encoding="utf-8").split("\n")
    for i in range(line, line + lines):
        record = json.loads(rows[i])
        record["split"] = split
        rows[i] = json.dumps(record, ensure_ascii=False)
    partial = part.with_name(part.name + ".moved")
    partial.write_text("\n".join(rows), encoding="utf-8")
    os.replace(partial, part)


def assemble(parts: list[Path], folder: Path, stem: str, suffix: str = ".jsonl") -> list[Path]:
    """Concatenate the parts, in order, into shards `stem-00000.jsonl`, ... of about SHARD_BYTES (empty parts skipped)."""
    import shutil

    shard_bytes = SHARD_BYTES
    folder.mkdir(parents=True, exist_ok=True)
    shards: list[Path] = []
    size = 0
    out = None
    try:
        for part in parts:
            n = part.stat().st_size
            if not n:
                part.unlink()
                continue
            if not shards or size + n > shard_bytes:
                if out is not None:
                    out.close()
                    out = None
                shards.append(folder / f"{stem}-{len(shards):05d}{suffix}")
                os.replace(part, shards[-1])  # a part that starts a shard moves, not copies
                size = n
                continue
            if out is None:
                out = open(shards[-1], "ab")
            with open(part, "rb") as src:
                shutil.copyfileobj(src, out, 1 << 20)
            part.unlink()
            size += n
    finally:
        if out is not None:
            out.close()
    return shards


def concatenate(parts: list[Path], path: Path) -> None:
    import shutil

    with open(path, "wb") as out:
        for part in parts:
            with open(part, "rb") as src:
                shutil.copyfileobj(src, out, 1 << 20)
            part.unlink()
