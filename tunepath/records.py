"""Canonical records: what the validate stage writes and every later stage reads.

`artifacts/validate/records.jsonl` holds one JSON object per accepted input row:

    {"id": "<sha256 of the normalised content, 16 hex>",
     "kind": "conversation" | "text" | "preference",
     "split": "train" | "eval",
     "source": {"file": "data/raw/chat.jsonl", "line": 12},
     # kind == "conversation"
     "messages": [{"role": "system" | "user" | "assistant", "content": "..."}, ...],
     # kind == "text"
     "text": "...",
     # kind == "preference"
     "prompt": [messages...],          # ends with a user turn
     "chosen": [{"role": "assistant", "content": "..."}],
     "rejected": [{"role": "assistant", "content": "..."}]}

`artifacts/validate/rejects.jsonl` holds one object per rejected row:

    {"source": {"file": ..., "line": ...}, "raw": "<the line as read, decoded with replacement>",
     "reasons": ["<code>: <explanation with the field>", ...]}
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

KINDS = ("conversation", "text", "preference")
ROLES = ("system", "user", "assistant")
Kind = Literal["conversation", "text", "preference"]
Split = Literal["train", "eval"]


def read_records(path: Path, kind: str | None = None, split: str | None = None) -> Iterator[dict]:
    """Yield canonical records from a records.jsonl file, optionally only one kind and/or split."""
    with open(path, encoding="utf-8") as f:
        for line in f:
            record = json.loads(line)
            if kind is not None and record["kind"] != kind:
                continue
            if split is not None and record["split"] != split:
                continue
            yield record
