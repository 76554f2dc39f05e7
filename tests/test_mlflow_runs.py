"""MLflow runs after faults: a run whose process was killed is marked FAILED by the next start, and a resumed
training logs each step once. Real MLflow on SQLite; the killed process is a real process killed with SIGKILL."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

KILLED = """
    import os, signal, sys
    from mlflow import MlflowClient
    from tunepath.registry import process_tags
    client = MlflowClient(sys.argv[1])
    experiment = client.get_experiment_by_name("tunepath").experiment_id
    run = client.create_run(experiment, tags=process_tags(), run_name="register")
    print(run.info.run_id, flush=True)
    os.kill(os.getpid(), signal.SIGKILL)  # as a kill during register: the run is never ended
"""


@pytest.fixture
def store(tmp_path):
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    client.create_experiment("tunepath", artifact_location=(tmp_path / "mlartifacts").as_uri())
    return uri, client


def test_a_run_left_running_by_a_killed_process_is_marked_failed_on_the_next_start(store, tmp_path):
    from tunepath.registry import HOST_TAG, fail_orphaned_runs, process_tags
    from tunepath.train.tracking import MlflowSink

    uri, client = store
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    killed = subprocess.run([sys.executable, "-c", textwrap.dedent(KILLED), uri], capture_output=True, text=True,
                            env=env, timeout=120)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    orphan = killed.stdout.split()[0]
    experiment = client.get_experiment_by_name("tunepath").experiment_id
    alive = client.create_run(experiment, tags=process_tags()).info.run_id  # this test's process: still running
    elsewhere = client.create_run(experiment, tags={**process_tags(), HOST_TAG: "another-machine"}).info.run_id
    untagged = client.create_run(experiment).info.run_id
    assert client.get_run(orphan).info.status == "RUNNING"

    MlflowSink(uri, "tunepath", tmp_path / "mlartifacts", None, {})  # the next training's start

    run = client.get_run(orphan)
    assert run.info.status == "FAILED" and run.info.end_time is not None
    assert "ended without finishing this run (killed?)" in run.data.tags["tunepath.ended"]
    assert {client.get_run(r).info.status for r in (alive, elsewhere, untagged)} == {"RUNNING"}
    assert fail_orphaned_runs(client) == []  # once is enough


def test_a_resumed_training_logs_each_step_once(store, tmp_path):
    import mlflow

    from tunepath.train.tracking import MlflowSink

    uri, client = store
    first = MlflowSink(uri, "tunepath", tmp_path / "mlartifacts", None, {})
    for step in range(1, 11):  # checkpoint at 5, killed after 10
        first.log({"loss": 1.0 / step, "learning_rate": 1e-3}, step)
    mlflow.flush_async_logging()
    resumed = MlflowSink(uri, "tunepath", tmp_path / "mlartifacts", first.run_id, {})  # resume from step 5
    assert resumed.run_id == first.run_id
    for step in range(6, 16):
        resumed.log({"loss": 1.0 / step, "learning_rate": 1e-3, "grad_norm": 0.5}, step)
    resumed.finish()
    for key, steps in (("loss", range(1, 16)), ("learning_rate", range(1, 16)), ("grad_norm", range(6, 16))):
        logged = sorted(m.step for m in client.get_metric_history(first.run_id, key))
        assert logged == list(steps), key
    assert client.get_run(first.run_id).info.status == "FINISHED"
