"""One run per project folder: the lock's refusals, waits, takeovers after a kill; DVC's lock; lineage records.

Real processes hold the locks (a `tunepath run` of one would take minutes; the refusal comes before anything
loads, so a held lock and a bare folder show it). The end-to-end race of two real runs is in
test_concurrent_runs.py (slow).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from tests.conftest import REPO

HOLD = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from tunepath.runlock import project_lock
    with project_lock(Path(sys.argv[1]), what="tunepath run --set train.learning_rate=0.1", dvc=sys.argv[3] == "dvc"):
        print("held", flush=True)
        time.sleep(float(sys.argv[2]))
""")


def hold(root: Path, seconds: float = 60, dvc: bool = False) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(root), str(seconds), "dvc" if dvc else "-"], cwd=REPO, stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.stdout.readline().strip() == "held"
    return proc


def tunepath(root: Path, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tunepath.cli", "--project", str(root), *args], cwd=REPO, capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, "PYTHONPATH": str(REPO)})


@pytest.fixture
def holder(tmp_path):
    proc = hold(tmp_path)
    yield proc
    proc.kill()
    proc.wait()


@pytest.mark.parametrize("mode", ["--in-place", "auto"])
def test_a_second_run_is_refused_at_once_naming_the_holder(tmp_path, holder, mode):
    started = time.monotonic()
    # auto: a folder outside git cannot have a working copy, so a busy one refuses too, and says why
    out = tunepath(tmp_path, "run", *([mode] if mode != "auto" else []), "--set", "train.learning_rate=0.2")
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1, out.stderr
    assert f"pid {holder.pid}" in lines[0] and "`tunepath run --set train.learning_rate=0.1`" in lines[0]
    assert "since " in lines[0] and "another run works in this project folder" in lines[0]
    if mode == "auto":
        assert "not in git" in lines[0]
    assert time.monotonic() - started < 15  # before any server starts or model loads
    assert not (tmp_path / "params.yaml").exists()  # nothing of the project was touched


def test_a_dvc_stage_is_refused_while_a_run_works(tmp_path, holder):
    out = tunepath(tmp_path, "stage", "validate")
    assert out.returncode == 2
    assert f"pid {holder.pid}" in out.stderr and "another run works" in out.stderr


def test_a_killed_holder_leaves_no_stale_lock(tmp_path, holder):
    from tunepath.runlock import ProjectBusy, project_lock

    with pytest.raises(ProjectBusy):
        with project_lock(tmp_path):
            pass
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    with project_lock(tmp_path):  # the kernel dropped the flock with its process
        info = json.loads((tmp_path / ".tunepath" / "run.lock").read_text())
        assert info["pid"] == os.getpid()


def test_wait_queues_behind_the_holder_and_says_so(tmp_path):
    proc = hold(tmp_path, seconds=2)
    driver = ("import sys; from pathlib import Path; from tunepath.runlock import project_lock\n"
              "with project_lock(Path(sys.argv[1]), wait=True): print('got it', flush=True)")
    started = time.monotonic()
    out = subprocess.run([sys.executable, "-c", driver, str(tmp_path)], cwd=REPO, capture_output=True, text=True, timeout=60,
                         env={**os.environ, "PYTHONPATH": str(REPO)})
    proc.wait()
    assert out.stdout.strip() == "got it"
    assert f"pid {proc.pid}" in out.stderr and "waiting for it to finish" in out.stderr
    assert time.monotonic() - started >= 1.0


def test_the_flow_inside_a_cli_run_and_its_gpu_children_reenter_the_lock(tmp_path):
    from tunepath.runlock import ENV, held, project_lock

    with project_lock(tmp_path):
        with project_lock(tmp_path):  # the flow, inside `tunepath run`
            assert held(tmp_path)
        child = subprocess.run([sys.executable, "-c", "import sys; from pathlib import Path; from tunepath.runlock import held;"
                                "print(held(Path(sys.argv[1])))", str(tmp_path)], cwd=REPO, capture_output=True, text=True,
                               env={**os.environ, "PYTHONPATH": str(REPO)})
        assert child.stdout.strip() == "True"  # accelerate's `tunepath stage train` under the run
    assert ENV not in os.environ
    # the variable alone is not enough: an unrelated process that copied it does not skip the lock
    stranger = subprocess.run([sys.executable, "-c", "import sys; from pathlib import Path; from tunepath.runlock import held;"
                               "print(held(Path(sys.argv[1])))", str(tmp_path)], cwd=REPO, capture_output=True, text=True,
                              env={**os.environ, "PYTHONPATH": str(REPO), ENV: f"{(tmp_path / '.tunepath/run.lock').resolve()}:1"})
    assert stranger.stdout.strip() == "False"


def test_a_run_stops_at_once_while_dvc_holds_its_lock(tmp_path):
    from tunepath.runlock import ProjectBusy, project_lock

    subprocess.run([sys.executable, "-m", "dvc", "init", "-q", "--no-scm"], cwd=tmp_path, check=True)
    (tmp_path / ".dvc" / "tmp").mkdir(exist_ok=True)
    dvc_like = subprocess.Popen([sys.executable, "-c", "import sys, time, zc.lockfile; l = zc.lockfile.LockFile(sys.argv[1]);"
                                 "print('held', flush=True); time.sleep(60)", str(tmp_path / ".dvc" / "tmp" / "lock")],
                                stdout=subprocess.PIPE, text=True)
    try:
        assert dvc_like.stdout.readline().strip() == "held"
        with pytest.raises(ProjectBusy, match=f"DVC is working in this project \\(pid {dvc_like.pid} "):
            with project_lock(tmp_path, dvc=True):
                pass
        with project_lock(tmp_path):  # the run lock itself was free, and is released again
            pass
    finally:
        dvc_like.kill()
        dvc_like.wait()
    with project_lock(tmp_path, dvc=True):  # and a running flow's own DVC calls do not wait on its lock
        from tunepath.runlock import holds_dvc_lock

        assert holds_dvc_lock(tmp_path)


def test_dvc_repro_beside_a_run_stops_before_it_touches_the_runs_outputs(project):
    marker = project / "artifacts" / "validate" / "being-written"
    marker.parent.mkdir(parents=True)
    marker.write_text("a run's output")
    # dvc.yaml's commands call `tunepath`: the interpreter's own bin folder first (CI calls .venv/bin/python directly)
    env = {**os.environ, "PYTHONPATH": str(REPO), "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    run = hold(project, dvc=True)  # what a `tunepath run` holds from start to end
    lock_before = (project / "dvc.lock").exists()
    try:
        started = time.monotonic()
        out = subprocess.run([sys.executable, "-m", "dvc", "repro"], cwd=project, capture_output=True, text=True, timeout=120, env=env)
        took = time.monotonic() - started
        named = (project / ".dvc" / "tmp" / "lock").read_text().strip()
    finally:
        run.kill()
        run.wait()
    assert out.returncode != 0 and "Unable to acquire lock" in out.stdout + out.stderr, out.stdout + out.stderr
    assert took < 30  # DVC's 3 s of retries plus its start-up: it stops, it does not wait for the run
    assert marker.exists()  # DVC removes a changed stage's outputs before its command: it never got that far
    assert (project / "dvc.lock").exists() == lock_before and not (project / "artifacts" / "tokenize").exists()
    # DVC's message is fixed text; the lock file it names holds the run and since when
    assert re.fullmatch(rf"{run.pid} tunepath run --set train.learning_rate=0.1 since \d\d:\d\d:\d\d "
                        r"\(tunepath's run lock: \.tunepath/run\.lock\)", named), named
    # a stage of `dvc repro` meeting another holder of the run lock (DVC lets go of its lock while a command runs)
    stage = hold(project)
    try:
        out = subprocess.run([sys.executable, "-m", "dvc", "repro", "validate"], cwd=project, capture_output=True, text=True,
                             timeout=120, env=env)
    finally:
        stage.kill()
        stage.wait()
    assert out.returncode != 0
    assert f"another run works in this project folder: pid {stage.pid}" in out.stdout + out.stderr, out.stdout + out.stderr


# --- lineage records: what register checks --------------------------------------------------------------------

SPECS = {"validate": {"params": ["data"], "upstream": []},
         "train": {"params": ["train.learning_rate"], "upstream": ["validate"]},
         "merge": {"params": ["merge"], "upstream": ["train"]}}


def _chain(artifacts: Path, params: dict) -> None:
    from tunepath import stamps

    for stage in SPECS:
        record = stamps.inputs_of(stage, params, artifacts, SPECS)
        (artifacts / stage).mkdir(parents=True, exist_ok=True)
        (artifacts / stage / "weights.bin").write_bytes(f"{stage} {params}".encode())
        stamps.write(artifacts / stage, record)


def test_register_check_passes_a_consistent_chain_and_names_each_mix_up(tmp_path):
    from tunepath.stamps import LineageMismatch, check_chain

    a = {"data": {"raw_dir": "data/raw"}, "train": {"learning_rate": 0.001}, "merge": {"dtype": "float32"}}
    b = {**a, "train": {"learning_rate": 0.002}}
    _chain(tmp_path / "a", a)
    check_chain(a, tmp_path / "a", SPECS)
    # the registered params say b, the weights were trained with a
    with pytest.raises(LineageMismatch, match=r"train: made with train.learning_rate=0.001, but this run's params say train.learning_rate=0.002"):
        check_chain(b, tmp_path / "a", SPECS)
    # another run replaced artifacts/train after this merge was made
    _chain(tmp_path / "b", b)
    import shutil

    shutil.rmtree(tmp_path / "a" / "train")
    shutil.copytree(tmp_path / "b" / "train", tmp_path / "a" / "train")
    with pytest.raises(LineageMismatch, match="merge: made from other .*train outputs than the ones there now"):
        check_chain(b, tmp_path / "a", SPECS)
    # weights overwritten after their record was written
    (tmp_path / "b" / "train" / "weights.bin").write_bytes(b"other")
    with pytest.raises(LineageMismatch, match="train: its files changed after the train stage wrote them"):
        check_chain(b, tmp_path / "b", SPECS)


def test_stage_specs_follow_dvc_yaml():
    from tunepath.config import STAGES
    from tunepath.stamps import stage_specs

    specs = stage_specs(REPO)
    assert list(specs) == list(STAGES)
    assert "train" in specs["merge"]["upstream"] and "train.learning_rate" not in specs["merge"]["params"]
    assert "train" in specs["train"]["params"] and specs["train"]["upstream"] == ["route", "tokenize"]


# --- the start-up race: many contenders at once, exactly one wins, every other names it ------------------------

RACER = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from tunepath.runlock import ProjectBusy, project_lock
    start = float(sys.argv[2])
    while time.time() < start:  # every racer leaves the line at the same moment
        pass
    try:
        with project_lock(Path(sys.argv[1]), what="racer"):
            print("won", flush=True)
            time.sleep(3)
    except ProjectBusy as e:
        print("lost:", e, flush=True)
""")


def test_runs_racing_for_the_lock_one_wins_and_the_others_name_it(tmp_path):
    racers = 6
    start = time.time() + 4  # the interpreters are up by then, even on a loaded machine
    procs = [subprocess.Popen([sys.executable, "-c", RACER, str(tmp_path), str(start)], cwd=REPO, stdout=subprocess.PIPE,
                              text=True, env={**os.environ, "PYTHONPATH": str(REPO)}) for _ in range(racers)]
    outs = {p.pid: p.communicate(timeout=60)[0].strip() for p in procs}
    winners = [pid for pid, out in outs.items() if out == "won"]
    assert len(winners) == 1, outs
    for pid, out in outs.items():
        if pid != winners[0]:
            assert out.startswith("lost:") and f"pid {winners[0]} `racer`" in out, out
            assert "starting up" not in out


# a holder between its flock and its record (or between emptying the record and closing): the moments the
# record is empty, stretched to 0.5 s
RAW_HOLDER = textwrap.dedent("""
    import fcntl, json, os, sys, time
    from pathlib import Path
    path = Path(sys.argv[1]) / ".tunepath" / "run.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX)
    os.ftruncate(fd, 0)
    print("locked", flush=True)
    time.sleep(0.5)
    if sys.argv[2] == "starting":
        os.pwrite(fd, json.dumps({"pid": os.getpid(), "command": "slow starter", "started": time.time()}).encode(), 0)
        time.sleep(30)
    os.close(fd)
""")


@pytest.mark.parametrize("moment", ["starting", "finishing"])
def test_a_contender_waits_out_an_empty_holder_record(tmp_path, moment):
    from tunepath.runlock import ProjectBusy, project_lock

    proc = subprocess.Popen([sys.executable, "-c", RAW_HOLDER, str(tmp_path), moment], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "locked"
        if moment == "starting":  # it names the holder once its record is there, not "a process that is starting up"
            with pytest.raises(ProjectBusy, match=f"pid {proc.pid} `slow starter`"):
                with project_lock(tmp_path):
                    pass
        else:  # the holder was about to let go: the contender gets the lock instead of a refusal
            with project_lock(tmp_path):
                assert json.loads((tmp_path / ".tunepath" / "run.lock").read_text())["pid"] == os.getpid()
    finally:
        proc.kill()
        proc.wait()


def test_lock_reentry_is_per_thread_not_per_process(tmp_path):
    """The flow's own thread (and what runs in its context) re-enters; a thread of another flow in the same
    process contends for the lock like another process, and skips neither the run lock nor DVC's."""
    import contextvars
    import threading

    from tunepath.runlock import ProjectBusy, held, holds_dvc_lock, project_lock

    subprocess.run([sys.executable, "-m", "dvc", "init", "-q", "--no-scm"], cwd=tmp_path, check=True)
    seen = {}

    def other_flow():
        seen["held"], seen["dvc"] = held(tmp_path), holds_dvc_lock(tmp_path)
        try:
            with project_lock(tmp_path):
                seen["entered"] = True
        except ProjectBusy as e:
            seen["busy"] = str(e)

    with project_lock(tmp_path, dvc=True):
        with project_lock(tmp_path, dvc=True):  # re-entry in the holder's thread
            assert held(tmp_path) and holds_dvc_lock(tmp_path)
        thread = threading.Thread(target=other_flow)
        thread.start()
        thread.join()
        assert seen["held"] is False and seen["dvc"] is False and "entered" not in seen
        assert f"another run works in this project folder: pid {os.getpid()}" in seen["busy"]
        # a task thread the holder hands its context to (as Prefect's task runner does) works under the lock
        context = contextvars.copy_context()
        task = threading.Thread(target=lambda: context.run(lambda: seen.update(task=held(tmp_path) and holds_dvc_lock(tmp_path))))
        task.start()
        task.join()
        assert seen["task"] is True
        assert held(tmp_path)  # the holder still holds it
    assert not held(tmp_path) and not holds_dvc_lock(tmp_path)
    thread = threading.Thread(target=other_flow)  # free again: the other thread gets it
    seen.clear()
    thread.start()
    thread.join()
    assert seen == {"held": False, "dvc": False, "entered": True}


@pytest.mark.parametrize("level", ["repo", "local"])
def test_a_project_with_dvcs_hardlink_lock_is_refused_naming_the_setting(tmp_path, level):
    """With core.hardlink_lock DVC locks .dvc/tmp/lock with hard links, which the fcntl lock tunepath takes (as DVC
    does by default) does not see: a run beside a `dvc repro` would not be stopped. tunepath refuses, and says why."""
    import zc.lockfile
    from dvc.lock import make_lock

    from tunepath.runlock import HardlinkLockSet, project_lock

    subprocess.run([sys.executable, "-m", "dvc", "init", "-q", "--no-scm"], cwd=tmp_path, check=True)
    with project_lock(tmp_path, dvc=True):
        pass  # DVC's default: fine
    flag = ["--local"] if level == "local" else []
    subprocess.run([sys.executable, "-m", "dvc", "config", *flag, "core.hardlink_lock", "true"], cwd=tmp_path, check=True)
    # why it cannot be allowed: DVC's hard-link lock held, the fcntl lock is taken all the same (and the file the
    # fcntl lock leaves behind would keep DVC out for good)
    (tmp_path / ".dvc" / "tmp" / "lock").unlink()
    dvc_held = make_lock(str(tmp_path / ".dvc" / "tmp" / "lock"), tmp_dir=str(tmp_path / ".dvc" / "tmp"), hardlink_lock=True)
    dvc_held.lock()
    try:
        zc.lockfile.LockFile(str(tmp_path / ".dvc" / "tmp" / "lock")).close()
    finally:
        (tmp_path / ".dvc" / "tmp" / "lock").unlink()
    with pytest.raises(HardlinkLockSet) as refused:
        with project_lock(tmp_path, dvc=True):
            pytest.fail("the run went on")
    where = tmp_path / ".dvc" / ("config.local" if level == "local" else "config")
    assert str(refused.value) == (
        f"{tmp_path}: DVC's core.hardlink_lock is on (set in {where}): DVC then locks this project with hard links, "
        "which tunepath's run lock does not exclude, so a `dvc repro` beside a run would not be stopped. Turn it off "
        f"to run tunepath here: dvc config{' --local' if level == 'local' else ''} --unset core.hardlink_lock")
    assert not (tmp_path / ".tunepath" / "run.lock").read_text()  # nothing held, no holder named
    subprocess.run([sys.executable, "-m", "dvc", "config", *flag, "--unset", "core.hardlink_lock"], cwd=tmp_path, check=True)
    with project_lock(tmp_path, dvc=True):
        pass
