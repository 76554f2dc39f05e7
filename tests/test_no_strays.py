"""The check every test passes on its way out (conftest's `_no_process_outlives_its_test`): it finds what a test
left running, also an orphan that init adopted, and stops it; it leaves other people's processes alone."""

from __future__ import annotations

import subprocess
import sys
import time

from tests.conftest import stop_strays, strays


def orphan_in(folder, tmp_path) -> int:
    """A `sleep` whose parent shell exited at once, working in `folder`: nobody's descendant, adopted by init.
    Returned once it is `sleep`: until the shell's forked child has exec'd (late on a loaded machine), its command
    line is the shell's, which names the pid file under `tmp_path`, and it would count as this test's."""
    import psutil

    pid_file = tmp_path / "orphan.pid"
    subprocess.run(["sh", "-c", f"sleep 60 & echo $! > {pid_file}"], cwd=folder, check=True)
    pid = int(pid_file.read_text())
    deadline = time.monotonic() + 20
    while psutil.Process(pid).cmdline()[:1] != ["sleep"]:
        assert time.monotonic() < deadline, f"pid {pid} never became sleep: {psutil.Process(pid).cmdline()}"
        time.sleep(0.02)
    return pid


def test_a_left_process_is_found_and_stopped_and_others_are_not_touched(tmp_path):
    import psutil

    # a module fixture's process (a browser, a worker), there before the test: what it starts meanwhile is its own
    go = tmp_path / "go"
    fixture = subprocess.Popen([sys.executable, "-c", "import pathlib, subprocess, sys, time\n"
                                f"while not pathlib.Path({str(go)!r}).exists(): time.sleep(0.05)\n"
                                "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); time.sleep(60)"],
                               cwd=tmp_path)
    before = set(psutil.pids())
    go.touch()
    deadline = time.monotonic() + 20
    while not psutil.Process(fixture.pid).children():
        assert time.monotonic() < deadline
        time.sleep(0.05)
    [renderer] = psutil.Process(fixture.pid).children()
    project = tmp_path / "project"
    project.mkdir()
    orphan = psutil.Process(orphan_in(project, tmp_path))
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    elsewhere = psutil.Process(orphan_in("/", tmp_path))  # not this test's: not under its folder, nobody's child here
    try:
        assert orphan.ppid() != psutil.Process().pid  # init's, not ours
        found = {p.pid for p in strays(tmp_path, before)}
        assert orphan.pid in found and child.pid in found and elsewhere.pid not in found and renderer.pid not in found
        left = stop_strays(tmp_path, before, grace_s=0.5)
        assert any(line.startswith(f"pid {orphan.pid} ") and "sleep 60" in line for line in left), left
        child.wait(timeout=10)
        time.sleep(0.2)
        assert not orphan.is_running() or orphan.status() == psutil.STATUS_ZOMBIE
        assert elsewhere.is_running() and renderer.is_running()
        assert strays(tmp_path, before) == []
    finally:
        for proc in (elsewhere, orphan, renderer, psutil.Process(fixture.pid)):
            if proc.is_running():
                proc.kill()
        fixture.wait()
