"""Where MLflow keeps a new experiment's artifacts, for the train stage's tracking and the register stage."""

from __future__ import annotations

from pathlib import Path


def artifact_location(tracking_uri: str, artifact_root: Path) -> str | None:
    """A local file URI for a file-based store (SQLite, a folder), else None: a tracking server keeps artifacts
    where it is configured to (infra/: S3 on MinIO), and a client-side local path would be unreadable to others.

    With a SQLite store MLflow would otherwise put artifacts under ./mlruns of whatever folder the process runs
    in (DVC and Prefect workers run from different ones), so the project's folder is named explicitly.
    """
    if tracking_uri.startswith(("http://", "https://", "databricks")):
        return None
    return Path(artifact_root).resolve().as_uri()
