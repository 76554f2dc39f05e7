"""Which working copy an isolated run works in: a new one, or the one an interrupted run of the same command left.

An interrupted or failed isolated run keeps its copy (tunepath.isolate). Its rerun (the same command: the same
commit, uncommitted changes and params, which `run_key` sums up) finds it and resumes there, with the stages it
finished and its training checkpoints:

    with working_copy(home, run_key(home, params), name, what) as (copy, left):   # left: None for a new copy
        ... run in `copy`, land it, close_copy(copy, home) ...

A copy is claimed by its run with a flock on its record (.tunepath/workspaces/NAME.json beside it: key, command,
pid, start, and a failed run's error), so a copy whose record can be locked is one no run works in.
`left_copies` lists every copy with its state and size and `remove_copy` removes one (`tunepath workspaces`).
A look takes the lock shared and a claim retries for a moment (CLAIM_SETTLE_S), so a look at the instant a rerun
looks for its copy does not pass for a run that works there.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import time
from collections.abc import Iterator
from pathlib import Path

from tunepath.isolate import WORKSPACES, changed_files, close_copy, head_commit, open_copy

log = logging.getLogger(__name__)


def run_key(home: Path, params: dict) -> str:
    """What makes two isolated runs the same run: the project's commit, its uncommitted changes (except
    params.yaml and dvc.lock, which a run in place rewrites while it works) and the run's own params."""
    home = Path(home)
    digest = hashlib.sha256(head_commit(home).encode())
    for rel in changed_files(home):
        if rel in ("params.yaml", "dvc.lock"):
            continue
        path = home / rel
        digest.update(f"\0{rel}\0".encode())
        if path.is_file() and not path.is_symlink():
            digest.update(hashlib.sha256(path.read_bytes()).digest())
        else:
            digest.update(os.readlink(path).encode() if path.is_symlink() else b"(deleted)")
    digest.update(json.dumps(params, sort_keys=True, default=str).encode())
    return digest.hexdigest()[:16]


def _record_path(home: Path, name: str) -> Path:
    return Path(home).resolve() / WORKSPACES / f"{name}.json"  # beside the copy: `git worktree add` wants an empty folder


@contextlib.contextmanager
def working_copy(home: Path, key: str, name: str, what: str) -> Iterator[tuple[Path, dict | None]]:
    """The copy this run works in, held for the block: the copy an interrupted or failed run with the same key
    left (yields it with that run's record, the run resumes there), else a new copy named `name` (record None).

    The claim is a flock on the copy's record (NAME.json beside it), held as long as the run: the kernel drops it
    when the run dies, so a copy whose record can be locked is one no run works in."""
    home = Path(home).resolve()
    found = _claim_left(home, key)
    if found is not None:
        fd, left = found
        copy = home / WORKSPACES / left["name"]
    else:
        fd, left = _claim_new(home, name), None
        copy = None
    try:
        _write_record(fd, {"name": left["name"] if left else name, "key": key, "command": what, "pid": os.getpid(),
                           "started": time.time(), "runs": (left or {}).get("runs", 0) + 1})
        if copy is None:
            copy = open_copy(home, name)
        else:
            log.info("resuming in working copy %s, left by an %s run (pid %s, started %s) with the same params; its "
                     "finished stages and training checkpoints are kept", copy, "failed" if left.get("error") else "interrupted",
                     left.get("pid"), time.strftime("%H:%M:%S", time.localtime(left.get("started", 0))))
        others = [c for c in left_copies(home) if c["state"] != "running" and c["name"] != copy.name]
        if others:
            log.warning("%d other working copies of interrupted or failed runs are left (%.1f MB): `tunepath workspaces` "
                        "lists them, `tunepath workspaces --clean` removes them", len(others), sum(c["bytes"] for c in others) / 1e6)
        yield copy, left
    except BaseException as e:
        if copy is None or not copy.is_dir():  # no copy was made: nothing to resume, no record to keep
            _record_path(home, name).unlink(missing_ok=True)
            raise
        with contextlib.suppress(OSError):
            _write_record(fd, {**_read_record(fd), "ended": time.time(), "error": f"{type(e).__name__}: {e}"[:300]})
        raise
    finally:
        os.close(fd)


# How long a claim retries a record that someone else locks: `tunepath workspaces` (a shared lock) and another
# run's look (`resumable`) hold it for an instant; only the run that works in the copy holds it longer.
CLAIM_SETTLE_S = 1.0


def _claim_left(home: Path, key: str) -> tuple[int, dict] | None:
    """The flock on the record of a left copy with this key, and its record; None when there is none."""
    for record in sorted((home / WORKSPACES).glob("*.json")):
        try:
            fd = os.open(record, os.O_RDWR)
        except OSError:
            continue
        seen = _read_record(fd)
        if seen.get("key") not in (None, key):  # another run's copy; a record that reads empty is being written: locked and read again
            os.close(fd)
            continue
        if not _lock_within(fd, CLAIM_SETTLE_S):
            os.close(fd)  # its run is alive
            continue
        info = _read_record(fd)
        # the copy may have been closed between our open and our flock (its record is unlinked, then unlocked)
        if info.get("key") == key and record.exists() and (record.with_suffix("")).is_dir():
            return fd, info
        os.close(fd)
    return None


def _lock_within(fd: int, seconds: float) -> bool:
    """The exclusive flock, retried for `seconds` while someone holds it; False when it is still held then."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.02)


def resumable(home: Path, key: str) -> dict | None:
    """The record of a copy an interrupted or failed run with this key left, that no run works in now."""
    found = _claim_left(Path(home).resolve(), key)
    if found is None:
        return None
    os.close(found[0])
    return found[1]


def _claim_new(home: Path, name: str) -> int:
    path = _record_path(home, name)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
    fcntl.flock(fd, fcntl.LOCK_EX)
    return fd


def _read_record(fd: int) -> dict:
    try:
        return json.loads(os.pread(fd, 1 << 20, 0) or b"{}")
    except ValueError:
        return {}


def _write_record(fd: int, record: dict) -> None:
    os.ftruncate(fd, 0)
    os.pwrite(fd, (json.dumps(record) + "\n").encode(), 0)


def left_copies(home: Path) -> list[dict]:
    """Every working copy of the project with its state: `running` (its run holds it), `interrupted` (its run
    died: a rerun of the same command resumes there), `failed` (its run ended with an error) or `stray` (a
    folder without a record); with its size in bytes."""
    home = Path(home).resolve()
    root = home / WORKSPACES
    found = []
    for copy in sorted(p for p in root.iterdir() if p.is_dir()) if root.is_dir() else []:
        record = copy.with_suffix(".json")
        info, state = {}, "stray"
        with contextlib.suppress(OSError):
            fd = os.open(record, os.O_RDWR)
            try:
                info = _read_record(fd)
                try:  # shared: a look never stands for a run (a claim retries past it, see CLAIM_SETTLE_S)
                    fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
                    state = "failed" if info.get("error") else "interrupted"
                except BlockingIOError:
                    state = "running"
            finally:
                os.close(fd)
        found.append({**info, "name": copy.name, "path": str(copy), "state": state, "bytes": _size(copy)})
    return found


def _size(folder: Path) -> int:
    total = 0
    for base, _, files in os.walk(folder):  # does not follow links: the linked base model is not the copy's
        for f in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(base, f)).st_size
    return total


def remove_copy(home: Path, name: str) -> bool:
    """Remove a copy no run works in (False: a run holds it, it stays)."""
    home = Path(home).resolve()
    copy, record = home / WORKSPACES / name, _record_path(home, name)
    fd = os.open(record, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        close_copy(copy, home)
        return True
    finally:
        os.close(fd)
