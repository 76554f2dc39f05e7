"""A process beside a run that stops what the run started when the run itself is SIGKILLed.

A SIGKILL cannot be caught, and Prefect starts its temporary server as a plain child: without this, the server
(and any trainer or dataloader worker) outlives a killed `tunepath run`. The guard asks the kernel for a signal
when its parent dies (prctl PR_SET_PDEATHSIG), keeps a list of the parent's descendants (every second), and on
that signal stops those that are still the same processes.

    with guard_children():   # in the run's main thread (the death signal follows the thread that started it)
        ...
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator

PARENT_DIED = signal.SIGUSR1
PR_SET_PDEATHSIG = 1


@contextlib.contextmanager
def guard_children() -> Iterator[None]:
    if not sys.platform.startswith("linux") or threading.current_thread() is not threading.main_thread():
        yield
        return
    proc = subprocess.Popen([sys.executable, "-m", "tunepath.guard", str(os.getpid())], stdin=subprocess.DEVNULL,
                            start_new_session=True)  # its own session: Ctrl-C at the terminal does not reach it
    try:
        yield
    finally:
        proc.terminate()  # a normal end: nothing to stop
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=5)


def _set_parent_death_signal(signum: int) -> None:
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, int(signum), 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")


def watch(parent: int, every_s: float = 1.0) -> int:
    import psutil

    died = threading.Event()
    signal.signal(PARENT_DIED, lambda *_: died.set())
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # the run ended normally and says so
    _set_parent_death_signal(PARENT_DIED)
    known: dict[int, psutil.Process] = {}
    me = os.getpid()
    while not died.is_set() and os.getppid() == parent:  # the parent may have died before prctl took effect
        with contextlib.suppress(psutil.Error):
            for p in psutil.Process(parent).children(recursive=True):
                if p.pid != me:
                    known.setdefault(p.pid, p)
        known = {pid: p for pid, p in known.items() if p.is_running()}
        died.wait(every_s)
    left = _still_running(known.values())
    for p in left:  # their own children too: an orphaned server keeps its workers as children
        with contextlib.suppress(psutil.Error):
            left += [c for c in p.children(recursive=True) if c.pid not in {q.pid for q in left}]
    for p in left:
        with contextlib.suppress(psutil.Error):
            p.terminate()
    _, alive = psutil.wait_procs(left, timeout=3)
    for p in alive:
        with contextlib.suppress(psutil.Error):
            p.kill()
    if left:
        print(f"tunepath: the run (pid {parent}) was killed; stopped the {len(left)} processes it left", file=sys.stderr)
    return 0


def _still_running(procs) -> list:
    return [p for p in procs if p.is_running()]  # is_running compares the start time too: a reused pid is not it


if __name__ == "__main__":
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    raise SystemExit(watch(int(sys.argv[1])))
