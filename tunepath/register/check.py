"""Is the version that artifacts/register/model.json names still in the registry?

DVC sees the register stage's inputs and its model.json, not the MLflow registry: with mlflow.db deleted (or
the tracking URI pointed at another server) DVC still calls the stage up to date. The flow asks this first:

    from tunepath.register.check import registry_gap
    reason = registry_gap(Path("artifacts/register/model.json"), tracking_uri)   # None: registered, skip is fine

A SQLite registry is read with the standard library (a no-change rerun must stay fast; importing mlflow costs
seconds); a server is asked through MlflowClient.
"""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path


def registry_gap(record_path: Path, tracking_uri: str) -> str | None:
    """Why the registered version is missing from the registry at `tracking_uri`, or None when it is there."""
    if not tracking_uri:
        return None  # nothing to compare with (a stage run without MLflow)
    if not record_path.exists():
        return f"{record_path} does not exist"
    record = json.loads(record_path.read_text(encoding="utf-8"))
    name, version = record["name"], str(record["version"])
    digest = record.get("tags", {}).get("artifact_hash")
    if tracking_uri.startswith("sqlite:///"):
        found = _sqlite_version(Path(tracking_uri[len("sqlite:///"):]), name, version)
    else:
        found = _server_version(tracking_uri, name, version)
    if isinstance(found, str):
        return found
    if found is None:
        return f"the registry at {tracking_uri} has no version {version} of {name}"
    if digest and found.get("artifact_hash") not in (None, digest):
        return f"version {version} of {name} at {tracking_uri} holds other weights than this run's"
    return None


def _sqlite_version(db: Path, name: str, version: str) -> dict | str | None:
    if not db.exists():
        return f"the registry database {db} does not exist"
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
            row = conn.execute("SELECT 1 FROM model_versions WHERE name = ? AND version = ?", (name, int(version))).fetchone()
            if row is None:
                return None
            tag = conn.execute("SELECT value FROM model_version_tags WHERE name = ? AND version = ? AND key = 'artifact_hash'",
                               (name, int(version))).fetchone()
    except sqlite3.Error as e:
        return f"the registry database {db} cannot be read ({e})"
    return {"artifact_hash": tag[0] if tag else None}


def _server_version(tracking_uri: str, name: str, version: str) -> dict | str | None:
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    try:
        found = MlflowClient(tracking_uri).get_model_version(name, version)
    except MlflowException as e:
        if "RESOURCE_DOES_NOT_EXIST" in str(getattr(e, "error_code", "")) or "not found" in str(e).lower():
            return None
        return f"the registry at {tracking_uri} did not answer ({str(e).splitlines()[0][:200]})"
    return {"artifact_hash": found.tags.get("artifact_hash")}
