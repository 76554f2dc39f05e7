"""A split's map outputs (Arrow files, in order) as one table for its small columns, and row spans read a
window at a time.

A memory-mapped page stays in the process's resident set for as long as its map is open, so reading every
row of a large split through one long-lived map grows the RSS to the split's size (2.7 GB of file pages at
1M conversations, about 8 GB at 3M), though the pages are only page cache. `rows` reads a span through maps
of its own, opened for the span and closed when the caller lets the returned table go: the resident pages
follow the window, not the split. Outputs small enough to read whole (`in_memory`) are simply sliced.
"""

from __future__ import annotations

from pathlib import Path


class UnreadableFile(Exception):
    """A map output that cannot be opened (truncated, overwritten, missing): `path` names it."""

    def __init__(self, path: str, cause: Exception) -> None:
        super().__init__(f"{path}: {type(cause).__name__}: {cause}")
        self.path, self.cause = path, cause


def _open(path: str, in_memory: bool):
    import pyarrow as pa
    from datasets import Dataset

    try:
        return Dataset.from_file(path, in_memory=in_memory)
    except (pa.ArrowException, OSError) as e:  # ArrowInvalid for a truncated stream, FileNotFoundError for a gone file
        raise UnreadableFile(path, e) from e


class MappedSplit:
    def __init__(self, paths: list[Path], in_memory: bool) -> None:
        import numpy as np
        from datasets import concatenate_datasets

        self.paths = [str(p) for p in paths]
        self.in_memory = in_memory
        parts = [_open(p, in_memory) for p in self.paths]
        dataset = parts[0] if len(parts) == 1 else concatenate_datasets(parts)
        self.table = dataset.data.table  # for the small columns (status, lengths) and single values
        self.ends = np.cumsum([len(part) for part in parts], dtype=np.int64)  # rows up to the end of each file

    def __len__(self) -> int:
        return int(self.ends[-1]) if len(self.ends) else 0

    def rows(self, lo: int, hi: int, columns: list[str]):
        """Rows [lo, hi) of `columns` as a pyarrow Table. Over memory maps, the maps are this table's own."""
        import numpy as np
        import pyarrow as pa

        if self.in_memory or hi <= lo:
            return self.table.select(columns).slice(lo, max(hi - lo, 0))
        first = int(np.searchsorted(self.ends, lo, side="right"))
        last = int(np.searchsorted(self.ends, hi - 1, side="right"))
        start = int(self.ends[first - 1]) if first else 0
        tables = [pa.ipc.open_stream(pa.memory_map(self.paths[i])).read_all().select(columns) for i in range(first, last + 1)]
        joined = tables[0] if len(tables) == 1 else pa.concat_tables(tables)
        return joined.slice(lo - start, hi - lo)

    def take(self, rows, columns: list[str]):
        """The split's rows at the ascending indices `rows` (at least one), read through their span."""
        from tunepath.tokenize.packing import take_rows

        first = int(rows[0])
        return take_rows(self.rows(first, int(rows[-1]) + 1, columns), rows - first)
