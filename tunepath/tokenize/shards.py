"""Writing a data set piece by piece into the layout `datasets.load_from_disk` reads, without holding it whole.

`Dataset.save_to_disk` needs the whole table first; the stage produces its rows in bounded windows instead,
so each window is appended to an Arrow shard (a new one past `shard_bytes`) and the state and info files are
written at the end, as save_to_disk writes them.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

SHARD_BYTES = 500 << 20  # datasets' own default shard size


class ShardWriter:
    def __init__(self, target: Path, fingerprint: str, shard_bytes: int = SHARD_BYTES) -> None:
        self.target, self.fingerprint, self.shard_bytes = Path(target), fingerprint, shard_bytes
        self.rows = 0
        self._paths: list[Path] = []
        self._writer = None
        self._bytes = 0
        self._features = None

    def write(self, table) -> None:
        from datasets import Features
        from datasets.arrow_writer import ArrowWriter

        if table is None or not table.num_rows:
            return
        if self._features is None:
            self._features = Features.from_arrow_schema(table.schema)
            self.target.mkdir(parents=True, exist_ok=True)
        if self._writer is None or self._bytes >= self.shard_bytes:
            self._close_shard()
            path = self.target / f"part-{len(self._paths):05d}.arrow"
            self._paths.append(path)
            self._writer, self._bytes = ArrowWriter(features=self._features, path=str(path)), 0
        self._writer.write_table(table.cast(self._features.arrow_schema) if table.schema != self._features.arrow_schema else table)
        self._bytes += table.nbytes
        self.rows += table.num_rows

    def close(self) -> int:
        """Names the shards as save_to_disk does and writes its state and info files; returns the rows written."""
        from dataclasses import asdict

        from datasets import DatasetInfo

        self._close_shard()
        if not self._paths:
            return 0
        names = [f"data-{i:05d}-of-{len(self._paths):05d}.arrow" for i in range(len(self._paths))]
        for path, name in zip(self._paths, names):
            os.replace(path, self.target / name)
        state = {
            "_data_files": [{"filename": name} for name in names], "_fingerprint": self.fingerprint,
            "_format_columns": None, "_format_kwargs": {}, "_format_type": None, "_output_all_columns": False, "_split": None,
        }
        (self.target / "state.json").write_text(json.dumps(state, indent=2, sort_keys=True), encoding="utf-8")
        info = asdict(DatasetInfo(features=self._features))
        (self.target / "dataset_info.json").write_text(json.dumps({k: info[k] for k in sorted(info)}, indent=2), encoding="utf-8")
        return self.rows

    def _close_shard(self) -> None:
        if self._writer is not None:
            self._writer.finalize()
            self._writer.close()
            self._writer = None
