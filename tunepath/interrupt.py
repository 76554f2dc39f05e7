"""Ctrl-C and SIGTERM stop the whole run, within seconds, and say how to resume.

    with stop_on_signals("tunepath run", tracking_uri, resume="run the same command again"):
        ...

Neither Python's KeyboardInterrupt nor Prefect's handlers can be relied on here: the signal lands wherever the
main thread is (inside Prefect's engine, which retries against its dead temporary server; inside a torch op), and
children in the same process group die or not depending on who sent the signal. So the Python handler only
wakes a watcher thread (as does the C-level wakeup fd, which fires even while the main thread sits in C code),
and that thread, by itself:

1. sends SIGTERM to every descendant (the temporary Prefect server, accelerate's per-GPU trainers, dataloader
   workers), then SIGKILL to what is left after 3 s;
2. marks this process's RUNNING MLflow runs KILLED (bounded: the next run's start marks them FAILED anyway);
3. prints one line naming what was interrupted and how to resume, and exits 128 + the signal (130, 143),
   which drops the project lock with the process.

Checkpoints stay consistent without help: each is written to a temporary folder and renamed into place.

A SIGKILL cannot be caught: a guard process (tunepath.guard) started beside the run stops what the run left.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
GRACE_S = 3.0
DEADLINE_S = 8.0  # the watcher exits by then whatever is still pending (the promise to the user is 10 s)

current = {"stage": None}  # set by tunepath.stages.run_stage: what the interrupt message names


@contextlib.contextmanager
def stop_on_signals(what: str, tracking_uri: str | None, resume: str) -> Iterator[None]:
    if threading.current_thread() is not threading.main_thread():
        yield  # signal handlers belong to the main thread (a flow run in a worker thread has Prefect's own)
        return
    read_fd, write_fd = os.pipe()
    os.set_blocking(write_fd, False)

    def wake(signum, frame):
        with contextlib.suppress(OSError):
            os.write(write_fd, bytes([signum]))

    previous = {s: signal.signal(s, wake) for s in STOP_SIGNALS}
    previous_fd = signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)
    triggered = threading.Event()
    watcher = threading.Thread(target=_watch, args=(read_fd, triggered, what, tracking_uri, resume), name="tunepath-stop", daemon=True)
    watcher.start()
    try:
        yield
    finally:
        if triggered.is_set():
            watcher.join(DEADLINE_S + 1)  # the watcher ends the process; returning early would orphan the children
        signal.set_wakeup_fd(previous_fd)
        for s, handler in previous.items():
            signal.signal(s, handler)
        os.close(write_fd)  # the watcher reads end-of-file and returns


def _watch(read_fd: int, triggered: threading.Event, what: str, tracking_uri: str | None, resume: str) -> None:
    try:
        while True:
            data = os.read(read_fd, 1)
            if not data:
                return  # the block ended normally
            if data[0] in STOP_SIGNALS:
                break  # any other signal with a Python handler also writes the wakeup fd
    finally:
        os.close(read_fd)
    triggered.set()
    signum = data[0]
    threading.Timer(DEADLINE_S, _exit, args=(signum,)).start()  # whatever below hangs, the process still ends
    name = signal.Signals(signum).name
    stopped = stop_descendants()
    killed = _mark_runs_killed(tracking_uri, f"interrupted by {name}")
    stage = current["stage"]
    during = f" during the {stage} stage" if stage else ""
    extra = f"; MLflow run{'s' if len(killed) > 1 else ''} {', '.join(killed)} marked KILLED" if killed else ""
    print(f"\n{what}: interrupted by {name}{during}; stopped {len(stopped)} child process{'es' if len(stopped) != 1 else ''}"
          f"{extra}; to resume: {resume}", file=sys.stderr, flush=True)
    _exit(signum)


def _exit(signum: int) -> None:
    with contextlib.suppress(Exception):
        sys.stdout.flush()
        sys.stderr.flush()
    os._exit(128 + signum)


def stop_descendants(grace_s: float = GRACE_S) -> list[int]:
    """SIGTERM to every descendant, SIGKILL to those alive after grace_s; returns the pids it found."""
    import psutil

    me = psutil.Process()
    found: dict[int, psutil.Process] = {}
    deadline = time.monotonic() + grace_s
    while True:
        # looked up again each round: a child may start one more (a dataloader worker, the server's reloader)
        fresh = [p for p in me.children(recursive=True) if p.pid not in found]
        for p in fresh:
            found[p.pid] = p
            with contextlib.suppress(psutil.Error):
                p.terminate()
        alive = [p for p in found.values() if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
        if not alive and not fresh:
            break
        if time.monotonic() > deadline:
            for p in alive:
                with contextlib.suppress(psutil.Error):
                    p.kill()
            psutil.wait_procs(alive, timeout=1.0)
            break
        psutil.wait_procs(alive, timeout=0.2)
    return sorted(found)


def _mark_runs_killed(tracking_uri: str | None, reason: str, timeout_s: float = 3.0) -> list[str]:
    """This process's RUNNING MLflow runs as KILLED; only when MLflow is already loaded (it takes seconds)."""
    if not tracking_uri or "mlflow" not in sys.modules:
        return []
    done: list[str] = []

    def mark() -> None:
        from mlflow import MlflowClient

        from tunepath.registry import PID_TAG

        client = MlflowClient(tracking_uri)
        experiments = [e.experiment_id for e in client.search_experiments()]
        if not experiments:
            return
        runs = client.search_runs(experiments, filter_string=f"attributes.status = 'RUNNING' and tags.`{PID_TAG}` = '{os.getpid()}'")
        for run in runs:
            client.set_tag(run.info.run_id, "tunepath.ended", reason)
            client.set_terminated(run.info.run_id, status="KILLED")
            done.append(run.info.run_id)

    worker = threading.Thread(target=_quietly, args=(mark,), daemon=True)
    worker.start()
    worker.join(timeout_s)
    return list(done)


def _quietly(fn) -> None:
    with contextlib.suppress(Exception):
        fn()
