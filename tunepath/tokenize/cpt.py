"""Continued pretraining: documents joined with EOS and cut into blocks of max_length; every token is learnt.

With `isolate` the position ids restart at each document inside a block (and at each block), so documents
do not attend to each other; otherwise they restart only at each block.
"""

from __future__ import annotations

from dataclasses import dataclass

IGNORE_INDEX = -100


@dataclass
class Blocks:
    table: object  # pyarrow Table: input_ids, labels, position_ids
    tokens: int  # real tokens kept in blocks
    dropped_tokens: int  # tokens of a short last block left out (remainder: drop)
    pad_tokens: int  # padding added to the last block (remainder: pad)


def cut_blocks(doc_ids, max_length: int, remainder: str, isolate: bool, pad_id: int) -> Blocks:
    """`doc_ids` is a pyarrow list column: one document per row, EOS already appended."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc

    doc_ids = doc_ids.combine_chunks() if hasattr(doc_ids, "combine_chunks") else doc_ids
    flat = doc_ids.flatten().to_numpy(zero_copy_only=False).astype(np.int32)
    lengths = pc.list_value_length(doc_ids).to_numpy(zero_copy_only=False).astype(np.int64)
    total = len(flat)
    index = np.arange(total, dtype=np.int64)
    doc_start = np.repeat(np.cumsum(lengths) - lengths, lengths)
    block_start = index // max_length * max_length
    positions = index - (np.maximum(doc_start, block_start) if isolate else block_start)
    labels = flat.copy()

    kept, dropped, pad = total, 0, 0
    short = total % max_length
    if short and remainder == "drop":
        kept, dropped = total - short, short
    elif short and remainder == "pad":
        pad = max_length - short
        flat = np.concatenate([flat, np.full(pad, pad_id, np.int32)])
        labels = np.concatenate([labels, np.full(pad, IGNORE_INDEX, np.int32)])
        # Padding is its own segment at the end: no real token can attend to it under the causal mask.
        positions = np.concatenate([positions, np.arange(pad)])
    end = kept + pad
    offsets = np.append(np.arange(0, end, max_length), end).astype(np.int32) if end else np.zeros(1, np.int32)
    offsets = pa.array(offsets)

    def column(values):
        return pa.ListArray.from_arrays(offsets, pa.array(values[:end].astype(np.int32), type=pa.int32()))

    table = pa.table({"input_ids": column(flat), "labels": column(labels), "position_ids": column(positions)})
    return Blocks(table, kept, dropped, pad)
