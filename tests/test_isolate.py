"""Working copies of a project (tunepath.isolate) on a tiny real git + DVC project, and the project's one MLflow
store written by several processes at once.

The end-to-end race of two real `tunepath run` (one in place, one isolated) is in test_concurrent_runs.py (slow).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import yaml

from tests.conftest import REPO

GIT = ["git", "-c", "user.email=t@example.invalid", "-c", "user.name=t"]
STAGE = {"stages": {"make": {"cmd": "python make.py", "deps": ["data/raw", "models/m", "make.py"], "params": ["a"],
                             "outs": ["artifacts/out.txt"]}}}
MAKE = ("import yaml, pathlib\n"
        "a = yaml.safe_load(open('params.yaml'))['a']\n"
        "text = pathlib.Path('data/raw/rows.txt').read_text() + pathlib.Path('models/m/w.bin').read_text()\n"
        "pathlib.Path('artifacts').mkdir(exist_ok=True)\n"
        "pathlib.Path('artifacts/out.txt').write_text(f'{a}:{text}')\n")


def sh(cwd: Path, *cmd: str) -> str:
    return subprocess.run(list(cmd), cwd=cwd, capture_output=True, text=True, check=True).stdout


def dvc(cwd: Path, *args: str) -> str:
    return sh(cwd, sys.executable, "-m", "dvc", *args)


def tiny_project(root: Path) -> Path:
    """git + DVC; data/raw tracked by DVC, models/ in neither (a local base model), one stage run in place."""
    root.mkdir()
    (root / "data" / "raw").mkdir(parents=True)
    (root / "data" / "raw" / "rows.txt").write_text("rows\n")
    (root / "models" / "m").mkdir(parents=True)
    (root / "models" / "m" / "w.bin").write_text("weights\n")
    (root / "make.py").write_text(MAKE)
    (root / "params.yaml").write_text("a: 1\n")
    (root / "dvc.yaml").write_text(yaml.safe_dump(STAGE))
    (root / ".gitignore").write_text("/artifacts/\n/models/\n/mlflow.db\n/.tunepath/\n")
    sh(root, "git", "init", "-q")
    dvc(root, "init", "-q")
    dvc(root, "add", "-q", "data/raw")
    sh(root, *GIT, "add", "-A")
    sh(root, *GIT, "commit", "-q", "-m", "project")
    dvc(root, "repro", "-q")  # the project's own run: dvc.lock (uncommitted) and its output in the cache
    return root


def test_a_working_copy_runs_apart_shares_the_cache_and_lands_as_an_experiment(tmp_path):
    from tunepath import isolate

    home = tiny_project(tmp_path / "home")
    (home / "notes.md").write_text("not committed yet\n")  # uncommitted changes go with the copy
    before = {name: (home / name).read_text() for name in ("params.yaml", "dvc.lock")}
    copy = isolate.open_copy(home, "lr-two")
    assert copy == home / ".tunepath" / "workspaces" / "lr-two"
    assert (copy / "notes.md").read_text() == "not committed yet\n" and (copy / "dvc.lock").read_text() == before["dvc.lock"]
    assert isolate.home_of(copy) == home and isolate.home_of(home) == home
    assert (copy / "mlflow.db").is_symlink() and os.readlink(copy / "mlflow.db") == str(home / "mlflow.db")
    assert dvc(copy, "cache", "dir").strip() == str(home / ".dvc" / "cache")

    (copy / "params.yaml").write_text("a: 2\n")
    from tunepath.runlock import project_lock

    with project_lock(copy, dvc=True):  # as the flow holds it around the run in the copy
        brought = isolate.bring_inputs(copy, home)
    assert brought["checked out"] == ["data/raw"] and brought["linked"] == ["models"]
    assert not (copy / "data" / "raw").is_symlink() and (copy / "data" / "raw" / "rows.txt").read_text() == "rows\n"
    assert (copy / "artifacts" / "out.txt").read_text() == "1:rows\nweights\n"  # the project's last output, from the cache
    dvc(copy, "repro", "-q")
    assert (copy / "artifacts" / "out.txt").read_text() == "2:rows\nweights\n"

    landed = isolate.land(copy, home, "lr-two")
    assert landed["ref"].startswith("refs/exps/") and landed["ref"].endswith("/lr-two")
    shown = json.loads(dvc(home, "exp", "show", "--json"))
    names = [e["name"] for base in shown for e in (base.get("experiments") or [])]
    assert names == ["lr-two"]
    assert yaml.safe_load(sh(home, "git", "show", f"{landed['ref']}:params.yaml")) == {"a": 2}
    isolate.close_copy(copy, home)
    assert not copy.exists()
    assert (home / "models" / "m" / "w.bin").read_text() == "weights\n"  # the link went, not what it pointed at
    assert len(sh(home, "git", "worktree", "list").strip().splitlines()) == 1

    # the project itself was never written; applying the experiment brings its params and output from the cache
    assert {name: (home / name).read_text() for name in before} == before
    assert (home / "artifacts" / "out.txt").read_text() == "1:rows\nweights\n"
    dvc(home, "exp", "apply", "lr-two")
    assert (home / "params.yaml").read_text() == "a: 2\n"
    assert (home / "artifacts" / "out.txt").read_text() == "2:rows\nweights\n"


def test_a_project_outside_git_cannot_be_isolated_and_says_why(tmp_path):
    from tunepath.isolate import cannot_isolate

    assert "not in git" in cannot_isolate(tmp_path)
    home = tiny_project(tmp_path / "home")
    assert cannot_isolate(home) is None


WRITER = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from mlflow import MlflowClient
    from tunepath import isolate
    from tunepath.registry import experiment_id, set_alias
    from tunepath.register.stage import _new_version
    from tunepath.runlock import file_lock

    home, start = Path(sys.argv[1]), float(sys.argv[2])
    uri = f"sqlite:///{home / 'mlflow.db'}"
    with file_lock(isolate.shared_lock_path(home, "mlflow")):  # as the flow opens the store: tables made once
        client = MlflowClient(uri)
        client.search_experiments()
    while time.time() < start:
        pass
    exp = experiment_id(client, "tunepath", home / "mlartifacts")  # every writer races to create it
    run = client.create_run(exp)
    for step in range(40):
        client.log_metric(run.info.run_id, "loss", 1.0 / (step + 1), step=step)
    version = _new_version(client, "tunepath-demo", type("Info", (), {"model_uri": f"runs:/{run.info.run_id}/model",
                           "model_id": None})(), run.info.run_id, {"writer": sys.argv[3]})
    set_alias(client, "tunepath-demo", "candidate", version.version)  # every writer races to create the alias
    client.set_terminated(run.info.run_id)
    print(run.info.run_id, version.version, flush=True)
""")


def test_several_processes_write_one_sqlite_registry_at_once(tmp_path):
    """Runs, per-step metrics, a registered model made by whichever comes first, versions and aliases from
    four processes at once: no "database is locked", every version number once, every metric kept."""
    writers = 3
    start = time.time() + 12  # past the MLflow import of every writer on a loaded machine
    procs = [subprocess.Popen([sys.executable, "-c", WRITER, str(tmp_path), str(start), str(i)], cwd=REPO, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
             for i in range(writers)]
    results = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), [err[-2000:] for _, err in results]
    assert time.time() > start  # they did overlap
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = dict(line.split() for line, _ in results)
    versions = client.search_model_versions("name='tunepath-demo'")
    assert sorted(int(v.version) for v in versions) == list(range(1, writers + 1))
    assert {v.run_id: str(v.version) for v in versions} == runs
    assert {v.tags["writer"] for v in versions} == {str(i) for i in range(writers)}
    for run_id in runs:
        assert len(client.get_metric_history(run_id, "loss")) == 40
    assert len(client.search_experiments()) == 2  # Default and the one they all raced to create


# --- an interrupted isolated run resumes in the copy it left ----------------------------------------------------

HOLDER = textwrap.dedent("""
    import os, sys
    from pathlib import Path
    from tunepath import workspaces

    home, key, name, end = Path(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
    with workspaces.working_copy(home, key, name, "tunepath run --set a=2") as (copy, left):
        (copy / "artifacts").mkdir(exist_ok=True)
        (copy / "artifacts" / "checkpoint-5").write_text("step 5")  # what a killed training leaves
        print(copy, flush=True)
        if end == "kill":
            sys.stdin.readline()  # held until the test kills it
        raise SystemExit("gate failed")
""")


def hold_copy(home: Path, key: str, name: str, end: str) -> tuple[subprocess.Popen, Path]:
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(home), key, name, end], cwd=REPO, stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    line = proc.stdout.readline().strip()
    assert line, proc.stderr.read()
    return proc, Path(line)


def test_the_rerun_of_an_interrupted_isolated_run_resumes_in_its_copy_and_others_are_listed(tmp_path, caplog):
    import logging

    from tunepath import isolate, workspaces

    caplog.set_level(logging.INFO, logger="tunepath.workspaces")

    home = tiny_project(tmp_path / "home")
    key = workspaces.run_key(home, {"a": 2})
    assert key == workspaces.run_key(home, {"a": 2}) != workspaces.run_key(home, {"a": 3})
    (home / "make.py").write_text(MAKE + "# edited\n")  # other uncommitted code: another run
    assert workspaces.run_key(home, {"a": 2}) != key
    (home / "make.py").write_text(MAKE)
    (home / "params.yaml").write_text("a: 7\n")  # a run in place rewriting params.yaml: still the same run
    assert workspaces.run_key(home, {"a": 2}) == key
    # a run killed while writing the shared registry leaves SQLite's journal beside it (the project's .gitignore
    # may not name it): not a change of the project, not carried into a copy
    (home / "mlflow.db-journal").write_bytes(b"\xd9\xd5\x05\xf9 \xa1c\xd7")
    assert workspaces.run_key(home, {"a": 2}) == key and "mlflow.db-journal" not in isolate.changed_files(home)
    (home / "mlflow.db-journal").unlink()

    proc, copy = hold_copy(home, key, "first", "kill")
    assert workspaces.resumable(home, key) is None  # its run is alive: not to be taken over
    [listed] = workspaces.left_copies(home)
    assert listed["state"] == "running" and listed["pid"] == proc.pid and listed["command"] == "tunepath run --set a=2"
    assert listed["bytes"] > 0
    proc.kill()
    proc.wait()
    left = workspaces.resumable(home, key)
    assert left["name"] == "first" and left["pid"] == proc.pid
    assert [c["state"] for c in workspaces.left_copies(home)] == ["interrupted"]

    # the same run again: the same copy, with what the killed run left; another name is ignored
    with workspaces.working_copy(home, key, "second", "tunepath run --set a=2") as (again, record):
        assert again == copy and record["name"] == "first" and record["runs"] == 1
        [said] = [r.getMessage() for r in caplog.records if "resuming in working copy" in r.getMessage()]
        assert said.startswith(f"resuming in working copy {copy}, left by an interrupted run (pid {proc.pid}, started ")
        assert (again / "artifacts" / "checkpoint-5").read_text() == "step 5"
        assert [c["state"] for c in workspaces.left_copies(home)] == ["running"]
        with workspaces.working_copy(home, key, "third", "the same run, started meanwhile") as (other, none):
            assert other != copy and none is None  # the copy is held: a second run of the same params gets its own
            isolate.close_copy(other, home)
        isolate.close_copy(again, home)  # as the flow does once the run has landed
    assert workspaces.left_copies(home) == [] and not copy.exists()
    assert len(sh(home, "git", "worktree", "list").strip().splitlines()) == 1

    # a failed run's copy and an unmatched one: listed with their state, removed by `tunepath workspaces --clean`
    proc, failed = hold_copy(home, key, "failed", "fail")
    assert proc.wait() == 1
    proc, killed = hold_copy(home, workspaces.run_key(home, {"a": 9}), "other", "kill")
    proc.kill()
    proc.wait()
    states = {c["name"]: (c["state"], c.get("error", "")) for c in workspaces.left_copies(home)}
    assert states == {"failed": ("failed", "SystemExit: gate failed"), "other": ("interrupted", "")}
    assert workspaces.resumable(home, key)["name"] == "failed"  # a failed run's rerun goes on there too
    caplog.clear()
    with workspaces.working_copy(home, workspaces.run_key(home, {"a": 4}), "fourth", "another run") as (fourth, _):
        isolate.close_copy(fourth, home)
    assert any(r.levelname == "WARNING" and r.getMessage().startswith("2 other working copies of interrupted or failed runs are left")
               for r in caplog.records), caplog.text  # nobody forgets them silently
    listing = subprocess.run([sys.executable, "-m", "tunepath.cli", "--project", str(home), "workspaces"], cwd=REPO,
                             capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert listing.returncode == 0, listing.stderr
    assert "failed  failed" in listing.stdout and "other  interrupted" in listing.stdout
    assert "2 copies no run works in" in listing.stdout and "--clean" in listing.stdout
    cleaned = subprocess.run([sys.executable, "-m", "tunepath.cli", "--project", str(home), "workspaces", "--clean"], cwd=REPO,
                             capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert cleaned.returncode == 0, cleaned.stderr
    assert f"removed: {failed}" in cleaned.stdout and f"removed: {killed}" in cleaned.stdout
    assert workspaces.left_copies(home) == [] and not failed.exists() and not killed.exists()
    assert (home / "models" / "m" / "w.bin").exists()
    assert len(sh(home, "git", "worktree", "list").strip().splitlines()) == 1


def test_a_look_at_the_copies_at_the_moment_a_rerun_looks_does_not_send_it_to_a_fresh_copy(tmp_path, monkeypatch):
    """`tunepath workspaces` holds a copy's record locked for an instant to tell a running copy from a left one;
    a rerun looking for its copy in that instant took the copy for a running one and made a fresh copy."""
    import fcntl
    import threading
    import types

    from tunepath import workspaces

    home = tiny_project(tmp_path / "home")
    key = workspaces.run_key(home, {"a": 2})
    proc, copy = hold_copy(home, key, "left", "kill")
    proc.kill()
    proc.wait()

    holding, go, listing = threading.Event(), threading.Event(), []

    def flock(fd, op):  # the look stops while it holds the record's lock, until the rerun has started looking
        fcntl.flock(fd, op)
        if threading.current_thread().name == "look" and not op & fcntl.LOCK_UN:
            holding.set()
            go.wait(10)

    monkeypatch.setattr(workspaces, "fcntl", types.SimpleNamespace(**{k: getattr(fcntl, k) for k in dir(fcntl) if k.startswith("LOCK_")}, flock=flock))
    look = threading.Thread(target=lambda: listing.extend(workspaces.left_copies(home)), name="look")
    look.start()
    assert holding.wait(10)
    threading.Timer(0.3, go.set).start()  # the look lets go while the rerun looks
    started = time.monotonic()
    found = workspaces.resumable(home, key)
    look.join(10)
    assert found and found["name"] == "left", found
    assert time.monotonic() - started < workspaces.CLAIM_SETTLE_S + 0.5
    assert [(c["name"], c["state"]) for c in listing] == [("left", "interrupted")]
    with workspaces.working_copy(home, key, "fresh", "tunepath run --set a=2") as (again, record):
        assert again == copy and record["name"] == "left"


# --- runs with identical inputs reuse each other's stages through DVC's run cache -------------------------------

CKPT_STAGE = {"stages": {"make": {**STAGE["stages"]["make"],
                                  "outs": ["artifacts/out.txt", {"artifacts/ckpt": {"persist": True, "cache": False}}]}}}
COUNTED = MAKE + ("import os\n"
                  "pathlib.Path('artifacts/ckpt').mkdir(exist_ok=True)\n"
                  "open(os.environ['MAKE_LOG'], 'a').write(f'{a}\\n')\n")
COMPUTE = textwrap.dedent("""
    import logging, os, subprocess, sys, time
    from pathlib import Path
    from tunepath import isolate
    from tunepath.ledger import Ledger

    logging.basicConfig(stream=sys.stdout, format="%(name)s: %(message)s")
    logging.getLogger("tunepath").setLevel(logging.INFO)
    copy, wait_s = Path(sys.argv[1]), float(sys.argv[2])
    if len(sys.argv) > 3:  # a gate: this run stops on its way to the stage's lock until the file exists
        gate, inputs_key = Path(sys.argv[3]), Ledger.inputs_key
        def gated(self, stage):
            print("on the way", flush=True)
            while not gate.exists():
                time.sleep(0.05)
            return inputs_key(self, stage)
        Ledger.inputs_key = gated
    ledger = Ledger(copy)
    os.chdir(copy)
    with ledger.first_with_these_inputs("make", isolate.home_of(copy) / isolate.LOCKS) as restored:
        if not restored:
            print("computing", flush=True)
            time.sleep(wait_s)  # long enough for the other run to arrive meanwhile
            subprocess.run([sys.executable, "make.py"], check=True)
            ledger.record("make")
            ledger.remember("make")
    print("restored" if restored else "computed", flush=True)
""")


def reuse_project(root: Path) -> Path:
    """The tiny project, its stage with a persistent uncached output (as train's checkpoints) counting its runs."""
    root = tiny_project(root)
    (root / "dvc.yaml").write_text(yaml.safe_dump(CKPT_STAGE))
    (root / "make.py").write_text(COUNTED)
    sh(root, *GIT, "commit", "-qam", "counted")
    return root


def copy_with(home: Path, name: str, a: int) -> Path:
    from tunepath import isolate

    copy = isolate.open_copy(home, name)
    (copy / "params.yaml").write_text(f"a: {a}\n")
    isolate.bring_inputs(copy, home)
    return copy


def compute(copy: Path, wait_s: float = 0.0, gate: Path | None = None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", COMPUTE, str(copy), str(wait_s), *([str(gate)] if gate else [])], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(REPO), "MAKE_LOG": str(copy.parent / "made.log")})


def test_a_run_with_the_inputs_of_a_finished_one_restores_its_stage_from_the_run_cache(tmp_path, monkeypatch):
    from tunepath.ledger import Ledger

    home = reuse_project(tmp_path / "home")
    made = home / ".tunepath" / "workspaces" / "made.log"
    first = copy_with(home, "first", 2)
    out = compute(first).communicate(timeout=300)
    assert out[0].split()[-1] == "computed", out
    assert made.read_text() == "2\n"
    assert "restored" not in out[0].split()  # nothing to restore yet

    second = copy_with(home, "second", 2)  # the same inputs: not in the project's dvc.lock, but in the run cache
    assert Ledger(second).changes("make")
    out = compute(second).communicate(timeout=300)
    assert out[0].split()[-1] == "restored", out
    assert made.read_text() == "2\n"  # not computed again
    assert (second / "artifacts" / "out.txt").read_text() == "2:rows\nweights\n" and (second / "artifacts" / "ckpt").is_dir()
    assert Ledger(second).changes("make") == {}  # recorded in the copy's dvc.lock: DVC calls it up to date
    other = copy_with(home, "other", 5)
    out = compute(other).communicate(timeout=300)
    assert out[0].split()[-1] == "computed", out  # other params: computed
    assert made.read_text() == "2\n5\n"


def test_two_runs_started_together_with_the_same_inputs_compute_the_stage_once(tmp_path):
    home = reuse_project(tmp_path / "home")
    made = home / ".tunepath" / "workspaces" / "made.log"
    a, b = copy_with(home, "a", 3), copy_with(home, "b", 3)
    first = compute(a, wait_s=4.0)
    assert first.stdout.readline().strip() == "computing"
    second = compute(b)
    outs = {"a": first.communicate(timeout=300), "b": second.communicate(timeout=300)}
    assert outs["a"][0].split()[-1] == "computed", outs
    lines = outs["b"][0].strip().splitlines()
    assert lines[-1] == "restored", outs
    assert f"tunepath.ledger: make: pid {first.pid} (in {a}) computes it from the same inputs; waiting to reuse its outputs" in lines
    assert "tunepath.ledger: make: restored from DVC's run cache (a run with the same deps and params made it), skipped" in lines
    assert made.read_text() == "3\n"
    assert (b / "artifacts" / "out.txt").read_text() == (a / "artifacts" / "out.txt").read_text() == "3:rows\nweights\n"


def test_two_identical_runs_at_the_same_instant_compute_the_stage_once(tmp_path):
    """The second run is on its way to the stage's lock when the first, started with it, finishes the stage and
    lets the lock go: the second finds the lock free, and the stage made, and restores it."""
    home = reuse_project(tmp_path / "home")
    made = home / ".tunepath" / "workspaces" / "made.log"
    a, b = copy_with(home, "a", 4), copy_with(home, "b", 4)
    gate = tmp_path / "gate"
    second = compute(b, gate=gate)
    assert second.stdout.readline().strip() == "on the way"
    first = compute(a)
    out = first.communicate(timeout=300)
    assert out[0].split()[-1] == "computed", out
    gate.touch()
    outs = second.communicate(timeout=300)
    assert outs[0].split()[-1] == "restored", outs
    assert made.read_text() == "4\n"  # computed once
    assert (b / "artifacts" / "out.txt").read_text() == (a / "artifacts" / "out.txt").read_text() == "4:rows\nweights\n"


def test_tunepath_run_in_a_free_project_goes_to_the_copy_its_interrupted_run_left(tmp_path):
    """The CLI's choice: the same `tunepath run --set ...` as an interrupted isolated run resumes in its copy even
    when the folder is free; other params (or --in-place, --wait) run in the folder."""
    import argparse
    import shutil

    from tunepath import workspaces
    from tunepath.cli import left_copy_to_resume, load_run_config

    home = tmp_path / "home"
    home.mkdir()
    shutil.copy(REPO / "params.yaml", home / "params.yaml")
    (home / ".gitignore").write_text("/.tunepath/\n")
    sh(home, "git", "init", "-q")
    dvc(home, "init", "-q")
    sh(home, *GIT, "add", "-A")
    sh(home, *GIT, "commit", "-q", "-m", "project")
    args = argparse.Namespace(project=home, config=None, set=["train.learning_rate=0.003"])
    assert not left_copy_to_resume(args)  # no copies at all
    key = workspaces.run_key(home, load_run_config(args).model_dump(mode="json"))
    proc, copy = hold_copy(home, key, "left", "kill")
    assert not left_copy_to_resume(args)  # its run is alive: this one gets the folder (or a copy of its own)
    proc.kill()
    proc.wait()
    assert left_copy_to_resume(args)
    assert not left_copy_to_resume(argparse.Namespace(project=home, config=None, set=["train.learning_rate=0.004"]))
