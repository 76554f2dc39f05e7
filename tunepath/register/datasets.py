"""Data lineage as MLflow dataset inputs: the raw data by its DVC hash, and the train and held-out records.

The MLflow UI then shows, on the run, which data version trained the model (`dvc pull` + `git checkout` of the
commit in the tags brings it back) and the record splits with their row counts and schema.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

DIGEST_LIMIT = 36  # MLflow stores a dataset digest in 36 characters; a DVC md5 with ".dir" fits exactly


def dvc_source(path: str, md5: str, git_commit: str):
    """A DatasetSource naming the data folder as DVC tracks it (built lazily: mlflow imports stay in functions)."""
    from mlflow.data.dataset_source import DatasetSource

    class DVCDatasetSource(DatasetSource):
        def __init__(self, path: str, md5: str, git_commit: str):
            self.path, self.md5, self.git_commit = path, md5, git_commit

        @staticmethod
        def _get_source_type() -> str:
            return "dvc"

        def load(self, **kwargs) -> Any:
            raise NotImplementedError(f"bring the data back with: git checkout {self.git_commit} && dvc pull {self.path}.dvc")

        @staticmethod
        def _can_resolve(raw_source: Any) -> bool:
            return False

        @classmethod
        def _resolve(cls, raw_source: Any):
            raise NotImplementedError

        def to_dict(self) -> dict[str, Any]:
            return {"path": self.path, "dvc_file": f"{self.path}.dvc", "md5": self.md5, "git_commit": self.git_commit}

        @classmethod
        def from_dict(cls, d: dict[str, Any]):
            return cls(d["path"], d["md5"], d["git_commit"])

    return DVCDatasetSource(path, md5, git_commit)


def record_frame(records_path: Path, split: str):
    """One row per canonical record of a split: id, kind, source file and line (the content stays in DVC)."""
    import pandas as pd

    from tunepath.records import read_records

    rows = []
    for r in read_records(records_path, split=split):
        src = r.get("source") or {}
        rows.append({"id": r["id"], "kind": r["kind"], "file": str(src.get("file", "")), "line": int(src.get("line") or 0)})
    return pd.DataFrame(rows, columns=["id", "kind", "file", "line"])


def log_lineage(raw_dir: str, data_hash: str, git_commit: str, records_path: Path, heldout_digest: str) -> None:
    """Log the raw data and the record splits as inputs of the active run."""
    import mlflow
    from mlflow.data.meta_dataset import MetaDataset

    source = dvc_source(raw_dir, data_hash, git_commit)
    raw = MetaDataset(source, name=raw_dir, digest=data_hash[:DIGEST_LIMIT])
    mlflow.log_input(raw, context="raw", tags={"dvc.md5": data_hash})
    for split, context in (("train", "training"), ("eval", "evaluation")):
        frame = record_frame(records_path, split)
        if frame.empty:
            continue
        tags = {"dvc.md5": data_hash, "rows": str(len(frame))}
        if split == "eval":
            tags["heldout.digest"] = heldout_digest
        with warnings.catch_warnings():  # MLflow's hint on integer columns is about model inputs, not lineage
            warnings.filterwarnings("ignore", message=".*Inferred schema contains integer column")
            mlflow.log_input(mlflow.data.from_pandas(frame, source=source, name=f"records-{split}"), context=context, tags=tags)
