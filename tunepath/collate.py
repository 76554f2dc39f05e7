"""Batching of pre-tokenized rows, shared by training and evaluation.

Rows carry `input_ids`, `labels` and `position_ids` of equal length. Packed rows hold several samples whose
position ids restart at 0; transformers builds a block-diagonal causal mask from those restarts, so samples
in one row never attend to each other. Padding is appended on the right as one more segment (position ids
restarting at 0, labels -100): under a causal mask no real token can see it, so no attention mask is needed.
"""

from __future__ import annotations

IGNORE_INDEX = -100


class PadCollator:
    """Right-pads rows to the longest in the batch; optionally to a multiple (tensor-core friendly on GPU)."""

    def __init__(self, pad_token_id: int, pad_to_multiple_of: int = 1) -> None:
        self.pad_token_id = pad_token_id
        self.pad_to_multiple_of = pad_to_multiple_of

    def __call__(self, rows: list[dict]) -> dict:
        import torch

        longest = max(len(r["input_ids"]) for r in rows)
        m = self.pad_to_multiple_of
        width = (longest + m - 1) // m * m
        input_ids, labels, position_ids = [], [], []
        for r in rows:
            n = len(r["input_ids"])
            pad = width - n
            input_ids.append(list(r["input_ids"]) + [self.pad_token_id] * pad)
            labels.append(list(r["labels"]) + [IGNORE_INDEX] * pad)
            position_ids.append(list(r.get("position_ids") or range(n)) + list(range(pad)))
        return {
            "input_ids": torch.tensor(input_ids, dtype=torch.long),
            "labels": torch.tensor(labels, dtype=torch.long),
            "position_ids": torch.tensor(position_ids, dtype=torch.long),
        }
