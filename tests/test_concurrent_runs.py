"""Real `tunepath run` processes side by side in one project folder, and real runs stopped by signals.

Two runs started at once with different learning rates: one is refused at once with a line naming the other
(pid, command, start time); a third with --wait runs after the first. Every registered version then holds its own
run's params next to its own weights, and dvc.lock records the last run's learning rate against the last run's
weights. Then Ctrl-C and SIGKILL during training: the run and everything it started are gone within 10 s.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from tests.conftest import FAST_OVERRIDES, REPO, make_project

pytestmark = pytest.mark.slow  # whole runs on 2 cores: minutes

SHORT = [*FAST_OVERRIDES, "train.max_steps=20"]


def start(root: Path, *args: str, log: Path) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "tunepath.cli", "--project", str(root), "run"]
    for override in SHORT:
        cmd += ["--set", override]
    return subprocess.Popen([*cmd, *args], cwd=REPO, stdout=subprocess.DEVNULL, stderr=open(log, "w"), start_new_session=True,
                            env={**os.environ, "PYTHONPATH": str(REPO)})


def registered_versions(root: Path) -> list:
    from mlflow import MlflowClient

    from tunepath.stages import default_tracking_uri

    client = MlflowClient(default_tracking_uri(root))
    return client, sorted(client.search_model_versions("name='tunepath-demo'"), key=lambda v: int(v.version))


def test_two_runs_at_once_never_mix_params_and_weights(tmp_path, demo_assets):
    import mlflow
    import yaml

    from tunepath.register.stage import artifact_hash
    from tunepath.stages import default_tracking_uri

    root = make_project(tmp_path / "project", demo_assets)
    logs = {lr: tmp_path / f"run-{lr}.log" for lr in ("0.002", "0.004", "0.003")}
    runs = {"0.002": start(root, "--set", "train.learning_rate=0.002", log=logs["0.002"]),
            "0.004": start(root, "--set", "train.learning_rate=0.004", log=logs["0.004"])}
    time.sleep(0.5)
    runs["0.003"] = start(root, "--set", "train.learning_rate=0.003", "--wait", log=logs["0.003"])
    codes = {lr: p.wait(timeout=1500) for lr, p in runs.items()}
    errors = {lr: logs[lr].read_text() for lr in runs}

    # of the two started at once, exactly one ran; the other stopped at once with one line naming it
    first, refused = (("0.002", "0.004") if codes["0.002"] == 0 else ("0.004", "0.002"))
    assert codes[first] == 0, errors[first][-3000:]
    assert codes[refused] == 2, errors[refused][-3000:]
    line = errors[refused].strip().splitlines()[-1]
    assert f"pid {runs[first].pid} `tunepath --project {root} run" in line and f"train.learning_rate={first}" in line, line
    assert "another run works in this project folder" in line and " since " in line
    assert len(errors[refused].strip().splitlines()) == 1  # nothing else started: no server, no stage
    # the queued one said whom it waited for, and then ran
    assert codes["0.003"] == 0, errors["0.003"][-3000:]
    assert f"pid {runs[first].pid}" in errors["0.003"] and "waiting for it to finish" in errors["0.003"]

    # each registered version: its own params, its own weights, its own loss curve
    client, versions = registered_versions(root)
    assert len(versions) == 2
    mlflow.set_tracking_uri(default_tracking_uri(root))
    hashes = set()
    for version, lr in zip(versions, (first, "0.003")):
        run = client.get_run(version.run_id)
        assert run.data.params["train.learning_rate"] == lr
        local = Path(mlflow.artifacts.download_artifacts(run_id=version.run_id, artifact_path="", dst_path=str(tmp_path / f"v{version.version}")))
        params = json.loads((local / "params.json").read_text())
        assert params["train"]["learning_rate"] == float(lr)
        from tunepath.lineage import params_hash

        assert version.tags["params_hash"] == params_hash(params)
        curve = [float(l.split(",")[3]) for l in (local / "train" / "loss.csv").read_text().splitlines()[1:] if l]
        assert 0.5 * float(lr) < max(curve) <= float(lr) * 1.0001, (lr, max(curve))  # trained at this run's rate
        served = Path(mlflow.artifacts.download_artifacts(f"models:/tunepath-demo/{version.version}",
                                                          dst_path=str(tmp_path / f"m{version.version}")))
        model = sorted(p.parent for p in served.rglob("config.json") if any(p.parent.glob("*.safetensors")))[0]
        assert artifact_hash(model) == version.tags["artifact_hash"]  # the registered files are the hashed ones
        hashes.add(version.tags["artifact_hash"])
    assert len(hashes) == 2

    # the last run's params are what params.yaml and dvc.lock hold, against its weights: dvc status is clean
    assert yaml.safe_load((root / "params.yaml").read_text())["train"]["learning_rate"] == 0.003
    lock = yaml.safe_load((root / "dvc.lock").read_text())
    assert lock["stages"]["train"]["params"]["params.yaml"]["train"]["learning_rate"] == 0.003
    status = subprocess.run([sys.executable, "-m", "dvc", "status"], cwd=root, capture_output=True, text=True, check=True)
    assert "up to date" in status.stdout, status.stdout
    record = json.loads((root / "artifacts" / "register" / "model.json").read_text())
    assert record["version"] == str(versions[-1].version)
    assert record["tags"]["artifact_hash"] == artifact_hash(root / "artifacts" / "merge" / "model")
    lineage = json.loads((root / "artifacts" / "train" / "lineage.json").read_text())
    assert lineage["params"]["train"]["learning_rate"] == 0.003


def wait_for_training(proc: subprocess.Popen, log: Path, timeout: float = 900) -> None:
    deadline = time.monotonic() + timeout
    while not re.search(r"train sft \(1/1\): \d+/\d+ steps", log.read_text()):
        assert proc.poll() is None, log.read_text()[-3000:]
        assert time.monotonic() < deadline, "training did not start"
        time.sleep(1)


def session_processes(sid: int) -> list[psutil.Process]:
    out = []
    for p in psutil.process_iter():
        try:
            if os.getsid(p.pid) == sid:
                out.append(p)
        except (ProcessLookupError, PermissionError, psutil.Error):
            continue
    return out


@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGKILL, -9)])
def test_a_signal_during_training_stops_the_run_and_everything_it_started(tmp_path, demo_assets, sig, code):
    import sqlite3

    root = make_project(tmp_path / "project", demo_assets)
    log = tmp_path / "run.log"
    proc = start(root, "--set", "train.max_steps=2000", log=log)  # minutes even on a fast machine
    wait_for_training(proc, log)
    tree = psutil.Process(proc.pid).children(recursive=True)
    assert any("uvicorn" in " ".join(p.cmdline()) for p in tree)  # the temporary Prefect server is among them
    started = time.monotonic()
    proc.send_signal(sig)  # to the run alone, as `kill` does; a terminal's Ctrl-C reaches the group, which is easier
    assert proc.wait(timeout=30) == code
    took = time.monotonic() - started
    _, alive = psutil.wait_procs(tree, timeout=12)
    assert not alive, f"outlived the run: {[' '.join(p.cmdline())[:120] for p in alive]}"
    assert not session_processes(proc.pid)
    if sig == signal.SIGKILL:
        return  # nothing could run in it; the guard stopped the rest (and the next run marks its MLflow run FAILED)
    assert took < 10
    text = log.read_text().strip().splitlines()[-1]
    assert text.startswith("tunepath run: interrupted by SIGINT during the train stage; stopped "), text
    assert "to resume: run the same command again" in text
    with sqlite3.connect(root / "mlflow.db") as db:
        statuses = [s for (s,) in db.execute("SELECT status FROM runs")]
    assert statuses == ["KILLED"], statuses
    from tunepath.runlock import project_lock

    with project_lock(root):  # released with the process
        pass
