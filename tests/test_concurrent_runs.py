"""Real `tunepath run` processes side by side in one project folder, and real runs stopped by signals.

Two runs started at once with different learning rates both succeed: one works in the project folder, the other
in a working copy of its own and lands as a DVC experiment. Every registered version then holds its own run's
params next to its own weights; the project's params.yaml and dvc.lock are the in-place run's alone. A third run
with --in-place, started meanwhile, is refused at once with a line naming the holder (pid, command, start time).
Then Ctrl-C and SIGKILL during training: the run and everything it started are gone within 10 s.
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


def test_two_runs_at_once_both_land_each_with_its_own_lineage(tmp_path, demo_assets):
    import yaml

    root = make_project(tmp_path / "project", demo_assets)
    committed = {name: (root / name).read_text() for name in ("params.yaml", "dvc.yaml")}
    logs = {lr: tmp_path / f"run-{lr}.log" for lr in ("0.002", "0.004", "0.003")}
    runs = {"0.002": start(root, "--set", "train.learning_rate=0.002", log=logs["0.002"]),
            "0.004": start(root, "--set", "train.learning_rate=0.004", log=logs["0.004"])}
    time.sleep(2)
    refused = subprocess.run([sys.executable, "-m", "tunepath.cli", "--project", str(root), "run", "--in-place",
                              "--set", "train.learning_rate=0.003"], cwd=REPO, capture_output=True, text=True, timeout=120,
                             env={**os.environ, "PYTHONPATH": str(REPO)})
    codes = {lr: p.wait(timeout=2400) for lr, p in runs.items()}
    errors = {lr: logs[lr].read_text() for lr in runs}
    assert codes == {"0.002": 0, "0.004": 0}, {lr: errors[lr][-3000:] for lr in runs}

    # which one got the folder: the other said so in one line naming it, then worked in its own copy
    isolated = next(lr for lr in runs if "this run works in a working copy of its own" in errors[lr])
    in_place = "0.004" if isolated == "0.002" else "0.002"
    notice = next(l for l in errors[isolated].splitlines() if "working copy of its own" in l)
    assert f"pid {runs[in_place].pid} `tunepath --project {root} run" in notice and f"train.learning_rate={in_place}" in notice
    assert "working copy of its own" not in errors[in_place]
    # --in-place while the project is busy: refused at once, one line naming the holder, nothing touched
    assert refused.returncode == 2, refused.stderr[-3000:]
    lines = refused.stderr.strip().splitlines()
    assert len(lines) == 1 and f"pid {runs[in_place].pid}" in lines[0] and "another run works in this project folder" in lines[0]
    assert " since " in lines[0]

    # each registered version: its own params, its own weights (hash of the files registered), its own loss curve
    client, versions = registered_versions(root)
    assert len(versions) == 2
    by_lr = {client.get_run(v.run_id).data.params["train.learning_rate"]: v for v in versions}
    assert set(by_lr) == {"0.002", "0.004"}
    for lr, version in by_lr.items():
        check_version(client, version, lr, tmp_path / f"v{version.version}")
    assert by_lr["0.002"].tags["artifact_hash"] != by_lr["0.004"].tags["artifact_hash"]

    # the project folder holds the in-place run alone: its params, its lock, its weights; dvc status is clean
    params = yaml.safe_load((root / "params.yaml").read_text())
    assert params["train"]["learning_rate"] == float(in_place)
    lock = yaml.safe_load((root / "dvc.lock").read_text())
    assert lock["stages"]["train"]["params"]["params.yaml"]["train"]["learning_rate"] == float(in_place)
    status = subprocess.run([sys.executable, "-m", "dvc", "status"], cwd=root, capture_output=True, text=True, check=True)
    assert "up to date" in status.stdout, status.stdout
    from tunepath.register.stage import artifact_hash

    record = json.loads((root / "artifacts" / "register" / "model.json").read_text())
    assert record["version"] == str(by_lr[in_place].version)
    assert record["tags"]["artifact_hash"] == artifact_hash(root / "artifacts" / "merge" / "model")
    assert (root / "dvc.yaml").read_text() == committed["dvc.yaml"]

    # the isolated one is a DVC experiment with its own params and lock; its copy is gone
    shown = subprocess.run([sys.executable, "-m", "dvc", "exp", "show", "--json"], cwd=root, capture_output=True, text=True, check=True)
    experiments = [e for base in json.loads(shown.stdout) for e in (base.get("experiments") or [])]
    assert len(experiments) == 1, shown.stdout[:2000]
    name = experiments[0]["name"]
    assert name in errors[isolated]
    ref = subprocess.run(["git", "for-each-ref", "--format=%(refname)", "refs/exps"], cwd=root, capture_output=True, text=True, check=True)
    ref = next(r for r in ref.stdout.split() if r.endswith("/" + name))
    exp_params = yaml.safe_load(subprocess.run(["git", "show", f"{ref}:params.yaml"], cwd=root, capture_output=True, text=True, check=True).stdout)
    assert exp_params["train"]["learning_rate"] == float(isolated)
    exp_lock = yaml.safe_load(subprocess.run(["git", "show", f"{ref}:dvc.lock"], cwd=root, capture_output=True, text=True, check=True).stdout)
    assert exp_lock["stages"]["train"]["params"]["params.yaml"]["train"]["learning_rate"] == float(isolated)
    merged = next(o for o in exp_lock["stages"]["merge"]["outs"] if o["path"] == "artifacts/merge")
    assert (root / ".dvc" / "cache" / "files" / "md5" / merged["md5"][:2] / merged["md5"][2:]).exists()  # in the shared cache
    assert not list((root / ".tunepath" / "workspaces").iterdir())
    worktrees = subprocess.run(["git", "worktree", "list"], cwd=root, capture_output=True, text=True, check=True).stdout
    assert len(worktrees.strip().splitlines()) == 1, worktrees

    # applied to the project, the experiment brings exactly the weights its registered version carries
    subprocess.run([sys.executable, "-m", "dvc", "exp", "apply", name], cwd=root, capture_output=True, text=True, check=True)
    assert yaml.safe_load((root / "params.yaml").read_text())["train"]["learning_rate"] == float(isolated)
    assert artifact_hash(root / "artifacts" / "merge" / "model") == by_lr[isolated].tags["artifact_hash"]


def check_version(client, version, lr: str, dst: Path) -> None:
    """The version's recorded params and params hash, its loss curve's peak rate, and the hash of the model files
    served from the registry against the artifact hash it carries."""
    import mlflow

    from tunepath.lineage import params_hash
    from tunepath.register.stage import artifact_hash

    mlflow.set_tracking_uri(client.tracking_uri)
    run = client.get_run(version.run_id)
    assert run.data.params["train.learning_rate"] == lr
    local = Path(mlflow.artifacts.download_artifacts(run_id=version.run_id, artifact_path="", dst_path=str(dst / "run")))
    params = json.loads((local / "params.json").read_text())
    assert params["train"]["learning_rate"] == float(lr)
    assert version.tags["params_hash"] == params_hash(params)
    curve = [float(l.split(",")[3]) for l in (local / "train" / "loss.csv").read_text().splitlines()[1:] if l]
    assert 0.5 * float(lr) < max(curve) <= float(lr) * 1.0001, (lr, max(curve))  # trained at this run's rate
    served = Path(mlflow.artifacts.download_artifacts(f"models:/tunepath-demo/{version.version}", dst_path=str(dst / "model")))
    model = sorted(p.parent for p in served.rglob("config.json") if any(p.parent.glob("*.safetensors")))[0]
    assert artifact_hash(model) == version.tags["artifact_hash"]  # the registered files are the hashed ones


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


def test_an_interrupted_isolated_run_resumes_in_its_copy_when_the_same_command_runs_again(tmp_path, demo_assets):
    """SIGKILL during training of an isolated run: the copy stays, listed as interrupted; the same command again
    says in one line that it resumes there, trains on from the last complete checkpoint, lands, and the copy goes."""
    from tunepath.train.checkpoints import MARKER

    root = make_project(tmp_path / "project", demo_assets)
    args = ("--isolated", "--set", "train.max_steps=40", "--set", "train.save_steps=5", "--set", "train.learning_rate=0.003")
    first = start(root, *args, log=tmp_path / "first.log")
    deadline = time.monotonic() + 1500
    while not list((root / ".tunepath" / "workspaces").glob(f"*/artifacts/checkpoints/train/*/checkpoint-*/{MARKER}")):
        assert first.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
        assert time.monotonic() < deadline, "no checkpoint was written"
        time.sleep(1)
    first.kill()
    assert first.wait(timeout=30) == -9
    [copy] = [p for p in (root / ".tunepath" / "workspaces").iterdir() if p.is_dir()]
    listing = subprocess.run([sys.executable, "-m", "tunepath.cli", "--project", str(root), "workspaces"], cwd=REPO,
                             capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert f"{copy.name}  interrupted" in listing.stdout, listing.stdout + listing.stderr

    second = start(root, *args, log=tmp_path / "second.log")
    assert second.wait(timeout=2400) == 0, (tmp_path / "second.log").read_text()[-3000:]
    log = (tmp_path / "second.log").read_text()
    resumed = [l for l in log.splitlines() if "resuming in working copy" in l]
    assert len(resumed) == 1 and str(copy) in resumed[0] and f"interrupted run (pid {first.pid}" in resumed[0], log[-3000:]
    assert re.search(r"resuming from .*checkpoint-\d+ \(step [1-9]\d*\)", log), log[-3000:]  # not from step 0
    assert not copy.exists() and not list((root / ".tunepath" / "workspaces").iterdir())
    shown = subprocess.run([sys.executable, "-m", "dvc", "exp", "show", "--json"], cwd=root, capture_output=True, text=True, check=True)
    assert [e["name"] for base in json.loads(shown.stdout) for e in (base.get("experiments") or [])] == [copy.name]
    client, versions = registered_versions(root)
    assert len(versions) == 1
    check_version(client, versions[0], "0.003", tmp_path / "v")
