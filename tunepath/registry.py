"""Where MLflow keeps a new experiment's artifacts, and which runs a killed process left RUNNING; for the train
stage's tracking and the register stage."""

from __future__ import annotations

import logging
import os
import socket
from pathlib import Path

log = logging.getLogger(__name__)


def artifact_location(tracking_uri: str, artifact_root: Path) -> str | None:
    """A local file URI for a file-based store (SQLite, a folder), else None: a tracking server keeps artifacts
    where it is configured to (infra/: S3 on MinIO), and a client-side local path would be unreadable to others.

    With a SQLite store MLflow would otherwise put artifacts under ./mlruns of whatever folder the process runs
    in (DVC and Prefect workers run from different ones), so the project's folder is named explicitly.
    """
    if tracking_uri.startswith(("http://", "https://", "databricks")):
        return None
    return Path(artifact_root).resolve().as_uri()


HOST_TAG, PID_TAG, START_TAG = "tunepath.host", "tunepath.pid", "tunepath.pid_start"


def _process_start(pid: int) -> str | None:
    """The kernel's start time of a live process (clock ticks since boot), telling it from a later one with the
    same pid; None when no such process runs. Without /proc, any live process of that pid counts."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        if Path("/proc/self/stat").exists():
            return None
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return None
        except PermissionError:
            pass
        return "?"
    except OSError:
        return "?"
    return stat.rsplit(")", 1)[1].split()[19]


def process_tags() -> dict[str, str]:
    """Tags that let the next run tell whether this run's process is still alive (see fail_orphaned_runs)."""
    pid = os.getpid()
    return {HOST_TAG: socket.gethostname(), PID_TAG: str(pid), START_TAG: _process_start(pid) or "?"}


def fail_orphaned_runs(client) -> list[str]:
    """Mark FAILED the RUNNING runs whose process on this machine is gone (killed: it could not end its run).

    Runs started elsewhere, or before runs carried process tags, are left as they are. Returns their ids."""
    host = socket.gethostname()
    experiments = [e.experiment_id for e in client.search_experiments()]
    if not experiments:
        return []
    failed = []
    for run in client.search_runs(experiments, filter_string="attributes.status = 'RUNNING'", max_results=5000):
        tags = run.data.tags
        if tags.get(HOST_TAG) != host or not tags.get(PID_TAG, "").isdigit():
            continue
        pid, start = int(tags[PID_TAG]), tags.get(START_TAG, "?")
        now = _process_start(pid)
        if now is not None and (start == "?" or now == "?" or now == start):
            continue  # still running (or cannot be told apart from a live process)
        client.set_tag(run.info.run_id, "tunepath.ended",
                       f"process {pid} on {host} ended without finishing this run (killed?); marked FAILED by a later run")
        client.set_terminated(run.info.run_id, status="FAILED")
        log.warning("MLflow run %s (%s) was left RUNNING by process %d, which is gone: marked FAILED",
                    run.info.run_id, run.info.run_name, pid)
        failed.append(run.info.run_id)
    return failed
