"""Faults that hide their cause end in one line naming the file and the cause: a full disk, a corrupt dvc.lock,
a locked or corrupt mlflow.db. Each fault is real (a full device, SQLite's own page limit, a real lock, real
DVC and MLflow code); only the message is what is checked."""

from __future__ import annotations

import os
import sqlite3
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from tunepath.errors import explain_fault

# every write to /dev/full fails with ENOSPC; only the character device, never a file that took its name
FULL_DEVICE = os.path.exists("/dev/full") and stat.S_ISCHR(os.stat("/dev/full").st_mode)


def _raised(fn) -> BaseException:
    try:
        fn()
    except BaseException as e:  # noqa: BLE001 - the fault under test, whatever its type
        return e
    raise AssertionError("the fault did not happen")


@pytest.mark.skipif(not FULL_DEVICE, reason="needs the /dev/full device")
def test_enospc_behind_another_error_is_named(tmp_path):
    def save():
        try:
            with open("/dev/full", "wb") as f:  # every write to /dev/full fails with ENOSPC
                f.write(b"x" * 100_000)
                f.flush()
        except OSError as e:
            raise RuntimeError("PytorchStreamWriter failed writing file data/0: file write failed") from e

    text = explain_fault(_raised(save), root=tmp_path)
    assert text.startswith("No space left on device (") and f"MB free on the disk holding {tmp_path}" in text
    assert "\n" not in text


@pytest.mark.skipif(not FULL_DEVICE, reason="needs the /dev/full device")
def test_a_torch_save_on_a_full_device_points_at_the_disk(tmp_path):
    import torch

    error = _raised(lambda: torch.save({"w": torch.zeros(1000, 1000)}, "/dev/full"))  # torch drops the errno
    text = explain_fault(error, root=tmp_path)
    assert text.startswith("saving a torch file failed (") and text.endswith("a full disk is the usual cause")
    assert f"MB free on the disk holding {tmp_path}" in text


def _mlflow_store(db: Path):
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{db}")
    client.search_experiments()  # creates the schema
    return client


def test_a_full_mlflow_db_says_no_space_left_and_names_the_file(tmp_path):
    from sqlalchemy import event

    db = tmp_path / "mlflow.db"
    client = _mlflow_store(db)
    experiment = client.create_experiment("tunepath")
    run = client.create_run(experiment)
    pages = sqlite3.connect(db).execute("PRAGMA page_count").fetchone()[0]
    engine = client._tracking_client.store.engine
    engine.dispose()

    @event.listens_for(engine, "connect")
    def _limit(connection, record):  # SQLite refuses to grow the file past this: SQLITE_FULL, as on a full disk
        connection.execute(f"PRAGMA max_page_count = {pages + 2}")

    def fill():
        for i in range(10_000):
            client.log_param(run.info.run_id, f"p{i}", "x" * 4000)

    error = _raised(fill)
    assert "No space left" not in str(error)  # what the user saw before: an MLflow SQL error
    text = explain_fault(error, mlflow_db=str(db))
    assert text.startswith(f"No space left on device writing {db} (SQLite: database or disk is full; ")


def test_a_corrupt_mlflow_db_is_named(tmp_path):
    from mlflow import MlflowClient

    db = tmp_path / "mlflow.db"
    db.write_bytes(b"this is not an SQLite file at all" * 100)
    error = _raised(lambda: MlflowClient(f"sqlite:///{db}").search_experiments())
    text = explain_fault(error, mlflow_db=str(db))
    assert text.startswith(f"{db} is corrupt or unreadable (SQLite: file is not a database)")


@pytest.mark.slow  # MLflow waits out its 20 s busy timeout before it gives up on a lock
def test_a_locked_mlflow_db_is_named(tmp_path):
    db = tmp_path / "mlflow.db"
    client = _mlflow_store(db)
    experiment = client.create_experiment("tunepath")
    holder = sqlite3.connect(db, isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")
    try:
        error = _raised(lambda: client.create_run(experiment))
    finally:
        holder.execute("ROLLBACK")
    assert explain_fault(error, mlflow_db=str(db)).startswith(f"{db} is locked by another process (SQLite: database is locked)")


@pytest.mark.parametrize("body, cause", [
    (b'schema: "2.0"\nstages: {validate: [1, 2', "YAML file structure is corrupted"),
    (b'schema: "2.0"\nstages:\n  validate:\n    cmd: 3\n    outs: 7\n', "validation failed"),
    (b"\x00\xff\xfe garbage", "is not valid utf-8"),
])
def test_a_corrupt_dvc_lock_is_named_with_its_cause(tmp_path, body, cause):
    from tunepath.ledger import Ledger

    subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True)
    subprocess.run([sys.executable, "-m", "dvc", "init", "-q"], cwd=tmp_path, check=True)
    (tmp_path / "dvc.yaml").write_text("stages:\n  validate:\n    cmd: echo hi > out.txt\n    outs:\n      - out.txt\n")
    (tmp_path / "dvc.lock").write_bytes(body)
    error = _raised(lambda: Ledger(tmp_path).changes("validate"))
    text = explain_fault(error)
    assert text.startswith("dvc.lock is corrupt (") and cause in text and "git checkout dvc.lock" in text
    assert "\n" not in text


def test_other_errors_are_left_to_their_own_message():
    assert explain_fault(ValueError("train.max_steps: 0 trains nothing")) is None
    assert explain_fault(_raised(lambda: open("/nonexistent/file"))) is None


def test_the_cli_prints_one_line_for_a_fault_and_keeps_tracebacks_for_bugs(tmp_path, monkeypatch, capsys):
    from tunepath import cli

    (tmp_path / "params.yaml").write_text("")
    db = tmp_path / "mlflow.db"
    db.write_bytes(b"not a database" * 100)

    def stage(args):  # the command's own work, reaching MLflow's store as the train and register stages do
        from mlflow import MlflowClient

        MlflowClient(cli.tracking_uri(args.project)).search_experiments()

    monkeypatch.setattr(cli, "cmd_stage", stage)  # build_parser binds the command by name when main runs
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("TUNEPATH_DEBUG", raising=False)
    assert cli.main(["--project", str(tmp_path), "stage", "train"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert not any(line.startswith("Traceback") for line in err)
    assert err[-1].startswith(f"tunepath: error: {db} is corrupt or unreadable (SQLite: file is not a database)")

    def bug(args):
        raise KeyError("a bug")

    monkeypatch.setattr(cli, "cmd_stage", bug)
    with pytest.raises(KeyError):
        cli.main(["--project", str(tmp_path), "stage", "train"])
