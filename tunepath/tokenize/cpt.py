"""Continued pretraining: documents joined with EOS and cut into blocks of max_length; every token is learnt.

With `isolate` the position ids restart at each document inside a block (and at each block), so documents
do not attend to each other; otherwise they restart only at each block.

The cut streams: documents come in chunks, full blocks leave at once and only the tokens of the block still
open are carried to the next chunk, so memory follows the chunk, not the corpus. Every array is int32 except
the token indices of one chunk (a corpus may hold more than 2^31 tokens).
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


class BlockCutter:
    """Cuts a stream of document chunks into blocks; the blocks are the same however the stream is chunked."""

    def __init__(self, max_length: int, remainder: str, isolate: bool, pad_id: int) -> None:
        import numpy as np

        self.max_length, self.remainder, self.isolate, self.pad_id = max_length, remainder, isolate, pad_id
        self.seen = 0  # tokens added so far: the global index of the next token
        self.tokens = self.dropped_tokens = self.pad_tokens = 0
        self._ids = np.zeros(0, np.int32)  # the open block's tokens and positions
        self._positions = np.zeros(0, np.int32)

    def add(self, doc_ids):
        """`doc_ids`: a pyarrow list column, one document per row, EOS appended. Returns the full blocks (a Table) or None."""
        import numpy as np
        import pyarrow as pa
        import pyarrow.compute as pc

        doc_ids = doc_ids.combine_chunks() if hasattr(doc_ids, "combine_chunks") else doc_ids
        flat = pc.list_flatten(doc_ids).to_numpy(zero_copy_only=False).astype(np.int32, copy=False)
        if not len(flat):
            return None
        lengths = pc.list_value_length(doc_ids).to_numpy(zero_copy_only=False).astype(np.int64)
        lengths = lengths[lengths > 0]
        index = np.arange(self.seen, self.seen + len(flat), dtype=np.int64)
        block_start = index // self.max_length * self.max_length
        if self.isolate:
            doc_start = np.repeat(self.seen + np.cumsum(lengths) - lengths, lengths)
            positions = (index - np.maximum(doc_start, block_start)).astype(np.int32)
            del doc_start
        else:
            positions = (index - block_start).astype(np.int32)
        del index, block_start
        self.seen += len(flat)
        ids = np.concatenate([self._ids, flat])
        positions = np.concatenate([self._positions, positions])
        full = len(ids) // self.max_length * self.max_length
        self._ids, self._positions = ids[full:].copy(), positions[full:].copy()
        if not full:
            return None
        self.tokens += full
        return _table(ids[:full], ids[:full], positions[:full], self.max_length)

    def finish(self):
        """The short last block, as `remainder` says (None when there is none or it is dropped)."""
        import numpy as np

        ids, positions = self._ids, self._positions
        self._ids, self._positions = ids[:0], positions[:0]
        if not len(ids):
            return None
        if self.remainder == "drop":
            self.dropped_tokens += len(ids)
            return None
        self.tokens += len(ids)
        labels = ids
        if self.remainder == "pad":
            pad = self.max_length - len(ids)
            self.pad_tokens += pad
            ids = np.concatenate([ids, np.full(pad, self.pad_id, np.int32)])
            labels = np.concatenate([labels, np.full(pad, IGNORE_INDEX, np.int32)])
            # Padding is its own segment at the end: no real token can attend to it under the causal mask.
            positions = np.concatenate([positions, np.arange(pad, dtype=np.int32)])
        return _table(ids, labels, positions, self.max_length)


def _table(ids, labels, positions, max_length: int):
    """Rows of max_length (the last may be shorter), input_ids, labels and position_ids as list<int32>."""
    import numpy as np
    import pyarrow as pa

    end = len(ids)
    offsets = pa.array(np.append(np.arange(0, end, max_length), end).astype(np.int32))

    def column(values):
        return pa.ListArray.from_arrays(offsets, pa.array(values, type=pa.int32()))

    return pa.table({"input_ids": column(ids), "labels": column(labels), "position_ids": column(positions)})


def cut_blocks(doc_ids, max_length: int, remainder: str, isolate: bool, pad_id: int) -> Blocks:
    """Every block of `doc_ids` (a pyarrow list column: one document per row, EOS already appended) in one Table."""
    import pyarrow as pa

    cutter = BlockCutter(max_length, remainder, isolate, pad_id)
    parts = [t for t in (cutter.add(doc_ids), cutter.finish()) if t is not None]
    empty = pa.table({name: pa.array([], type=pa.list_(pa.int32())) for name in ("input_ids", "labels", "position_ids")})
    table = pa.concat_tables(parts) if parts else empty
    return Blocks(table, cutter.tokens, cutter.dropped_tokens, cutter.pad_tokens)
