"""Where MLflow keeps a new experiment's artifacts, which runs a killed process left RUNNING, and the one MLflow
run of a pipeline run; for the flow, the train stage's tracking and the register stage.

One pipeline run is one MLflow run. The `finetune` flow opens it (`open_pipeline_run`, named after the Prefect
flow run, tagged with its id and page) and hands its id to every stage: in the Workspace for stages in its own
process, and in the environment (`RUN_ENV`) for processes it starts (`accelerate launch`). The train stage logs
its per-step metrics into it; the register stage logs the reports and the model into it and registers the
version from it. Under plain `dvc repro` (no flow, no `RUN_ENV`) the train stage opens the run and records its id
in artifacts/train/metrics.json, where register finds it.
"""

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


RUN_ENV = "TUNEPATH_MLFLOW_RUN_ID"  # read by entry points only (the CLI's `tunepath stage`)
PIPELINE_TAG = "tunepath.pipeline_run"


def experiment_id(client, name: str, artifact_root: Path) -> str:
    """The experiment's id; a new one keeps its artifacts where `artifact_location` says."""
    from mlflow.exceptions import MlflowException

    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    try:
        return client.create_experiment(name, artifact_location=artifact_location(client.tracking_uri, artifact_root))
    except MlflowException:
        exp = client.get_experiment_by_name(name)  # another run of the project created it a moment ago
        if exp is None:
            raise
        return exp.experiment_id


def set_alias(client, name: str, alias: str, version) -> None:
    """Point `alias` at `version`. MLflow's store reads, then inserts: two runs that set a new alias at the same moment
    both insert, and the second fails on the unique key. Its retry finds the row and updates it (the later run wins,
    as it would one after the other)."""
    from mlflow.exceptions import MlflowException

    for attempt in range(5):
        try:
            client.set_registered_model_alias(name, alias, str(version))
            return
        except MlflowException as e:
            if attempt == 4 or not any(s in str(e) for s in ("UNIQUE", "Duplicate", "unique", "IntegrityError")):
                raise


def open_pipeline_run(tracking_uri: str, experiment: str, artifact_root: Path, name: str | None, tags: dict[str, str]) -> str:
    """A new RUNNING run for one pipeline run (tagged with this process, which ends it); returns its id."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri)
    fail_orphaned_runs(client)
    run = client.create_run(experiment_id(client, experiment, artifact_root), run_name=name,
                            tags={PIPELINE_TAG: "true", **tags, **process_tags()})
    return run.info.run_id


def end_pipeline_run(tracking_uri: str, run_id: str, failed: bool, note: str | None = None) -> None:
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri)
    if note:
        client.set_tag(run_id, "tunepath.outcome", note[:5000])
    client.set_terminated(run_id, status="FAILED" if failed else "FINISHED")


def run_url(tracking_uri: str, run_id: str, experiment: str | None = None) -> str | None:
    """The run's page in the MLflow UI when the tracking URI is a server; None for a SQLite file (no UI address)."""
    if not tracking_uri.startswith(("http://", "https://")):
        return None
    from mlflow import MlflowClient

    exp = experiment or MlflowClient(tracking_uri).get_run(run_id).info.experiment_id
    return f"{tracking_uri.rstrip('/')}/#/experiments/{exp}/runs/{run_id}"


def existing_run(client, run_id: str | None) -> str | None:
    """`run_id` when that run is in this tracking store (and not deleted), else None."""
    if not run_id:
        return None
    try:
        run = client.get_run(run_id)
    except Exception:  # noqa: BLE001  (MlflowException for an unknown id; the database may have been replaced)
        return None
    return run_id if run.info.lifecycle_stage == "active" else None
