"""Ctrl-C, SIGTERM and SIGKILL stop a run's whole process tree: the mechanism on a small real process tree.

A driver stands in for `tunepath run`: it holds the project lock, starts a child that starts a grandchild (as
the temporary Prefect server and accelerate's trainers are), and blocks its main thread. The same on a real run,
signalled during training, is in test_concurrent_runs.py (slow).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psutil
import pytest

from tests.conftest import REPO

DRIVER = textwrap.dedent("""
    import subprocess, sys, time
    from pathlib import Path
    from tunepath.guard import guard_children
    from tunepath.interrupt import current, stop_on_signals
    from tunepath.runlock import project_lock

    root = Path(sys.argv[1])
    with stop_on_signals("tunepath run", None, "run it again"), guard_children(), project_lock(root):
        current["stage"] = "train"
        # a child that starts a grandchild and ignores SIGTERM in both (a trainer stuck in a CUDA call)
        tree = subprocess.Popen([sys.executable, "-c",
            "import signal, subprocess, sys, time; signal.signal(signal.SIGTERM, signal.SIG_IGN);"
            "subprocess.Popen([sys.executable, '-c', 'import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(300)']);"
            "time.sleep(300)"])
        time.sleep(1.5)  # the guard's next look at the tree
        print("ready", flush=True)
        while True:
            time.sleep(300)  # the main thread busy elsewhere: the signal is not turned into KeyboardInterrupt here
""")


def start(tmp_path: Path) -> tuple[subprocess.Popen, list[psutil.Process]]:
    proc = subprocess.Popen([sys.executable, "-c", DRIVER, str(tmp_path)], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.stdout.readline().strip() == "ready", proc.stderr.read()
    tree = psutil.Process(proc.pid).children(recursive=True)
    assert len(tree) >= 3  # the guard, the child, the grandchild
    return proc, tree


def survivors(tree: list[psutil.Process], timeout: float) -> list[psutil.Process]:
    _, alive = psutil.wait_procs(tree, timeout=timeout)
    return alive


@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), pytest.param(signal.SIGTERM, 143, marks=pytest.mark.slow)])
def test_a_signal_stops_the_whole_tree_within_10_s_and_says_how_to_resume(tmp_path, sig, code):
    from tunepath.runlock import project_lock

    proc, tree = start(tmp_path)
    started = time.monotonic()
    proc.send_signal(sig)  # to the run only: the children must be stopped by it, not by the terminal
    rc = proc.wait(timeout=15)
    took = time.monotonic() - started
    assert rc == code
    assert took < 10
    assert not survivors(tree, timeout=2), "processes outlived the run"
    lines = [l for l in proc.stderr.read().splitlines() if l.strip()]
    assert lines[-1].startswith(f"tunepath run: interrupted by {signal.Signals(sig).name} during the train stage; stopped ")
    assert lines[-1].endswith("to resume: run it again")
    with project_lock(tmp_path):  # released with the process
        pass


@pytest.mark.slow  # each case waits out the 3 s grace of children that ignore SIGTERM
def test_a_second_ctrl_c_does_not_leave_children_behind(tmp_path):
    proc, tree = start(tmp_path)
    proc.send_signal(signal.SIGINT)
    time.sleep(0.3)
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=15) == 130
    assert not survivors(tree, timeout=2)


@pytest.mark.slow
def test_sigkill_of_the_run_leaves_no_process_behind(tmp_path):
    proc, tree = start(tmp_path)
    proc.kill()
    proc.wait()
    alive = survivors(tree, timeout=10)  # the guard stops them: SIGTERM, 3 s, SIGKILL
    assert not alive, f"left running after SIGKILL: {[p.pid for p in alive]}"
