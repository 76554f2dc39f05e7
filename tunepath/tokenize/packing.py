"""Best-fit-decreasing packing of samples into rows, and the rows themselves as Arrow columns.

Position ids restart at 0 at each sample of a row. transformers derives a block-diagonal causal mask from
those restarts when no attention mask is passed, so packed samples do not attend to each other; the model
must run with `use_cache=False` for that (with a cache object present, transformers skips the detection).
"""

from __future__ import annotations

from bisect import bisect_left, insort


def best_fit_decreasing(lengths: list[int], capacity: int) -> list[list[int]]:
    """Bins of sample indices, each bin's lengths summing to at most `capacity`.

    Longest first, each sample goes into the open bin it fills most tightly. Deterministic: ties keep the
    input order.
    """
    too_long = [i for i, n in enumerate(lengths) if n > capacity]
    if too_long:
        raise ValueError(f"samples {too_long[:5]} are longer than the row capacity {capacity}; truncate them first")
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    bins: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (space left, bin index), ascending
    for i in order:
        need = lengths[i]
        j = bisect_left(free, (need, -1))
        if j < len(free):
            space, b = free.pop(j)
            bins[b].append(i)
        else:
            space, b = capacity, len(bins)
            bins.append([i])
        if space - need > 0:
            insort(free, (space - need, b))
    return bins


def padding_share(tokens: int, rows: int, width: int) -> float:
    """The share of a rows x width grid that would be padding."""
    return round(1.0 - tokens / (rows * width), 6) if rows else 0.0


def build_rows(table, bins: list[list[int]], extra: tuple[str, ...] = (), rows=None):
    """A pyarrow Table with one row per bin: input_ids, labels and position_ids concatenated over its samples.

    `table` holds one sample per row (list columns input_ids and labels); bins index `rows` (an array of table
    row numbers: the samples kept) or the table itself. `extra` names list columns copied through unchanged
    (only for bins of one sample). The samples are gathered in one take.
    """
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc

    order = np.fromiter((i for b in bins for i in b), dtype=np.int64, count=sum(len(b) for b in bins))
    taken = take_rows(table, order if rows is None else np.asarray(rows, dtype=np.int64)[order])
    sample_lengths = pc.list_value_length(taken["input_ids"]).to_numpy(zero_copy_only=False).astype(np.int32)
    bin_sizes = np.fromiter((len(b) for b in bins), dtype=np.int64, count=len(bins))
    sample_ends = np.cumsum(sample_lengths, dtype=np.int64)
    row_offsets = np.concatenate([[0], sample_ends[np.cumsum(bin_sizes) - 1]]) if len(bins) else np.zeros(1, np.int64)
    total = int(sample_ends[-1]) if len(sample_ends) else 0
    # Position ids count up from 0 in each sample: ones, with each sample's first set back to 1 - its predecessor's length.
    steps = np.ones(total, dtype=np.int32)
    if total:
        lengths = sample_lengths[sample_lengths > 0]
        steps[0] = 0
        steps[np.cumsum(lengths[:-1], dtype=np.int64)] = 1 - lengths[:-1]
    positions = np.cumsum(steps, dtype=np.int32)
    offsets = pa.array(row_offsets.astype(np.int32))
    columns = {
        "input_ids": pa.ListArray.from_arrays(offsets, _flat(taken["input_ids"])),
        "labels": pa.ListArray.from_arrays(offsets, _flat(taken["labels"])),
        "position_ids": pa.ListArray.from_arrays(offsets, pa.array(positions, type=pa.int32())),
    }
    for name in extra:
        if (bin_sizes != 1).any():
            raise ValueError(f"column {name!r} can only be copied for unpacked rows")
        columns[name] = taken[name]
    return pa.table(columns)


def take_rows(table, rows, memory_pool=None):
    """`table.take(rows)`, reading only the span of rows the indices cover. pyarrow's take on a chunked list
    column concatenates every chunk first: over a memory-mapped split, the whole column copied into memory
    for each window (11.6 GB at 3M conversations). A slice is free, so the copy is the window's span."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc

    rows = np.asarray(rows, dtype=np.int64)
    if not len(rows):
        return table.slice(0, 0)
    lo, hi = int(rows.min()), int(rows.max()) + 1
    return pc.take(table.slice(lo, hi - lo), pa.array(rows - lo), memory_pool=memory_pool)


def _flat(column):
    import pyarrow as pa

    values = column.combine_chunks().flatten() if column.num_chunks else pa.array([], type=pa.int32())
    return values.cast(pa.int32())
