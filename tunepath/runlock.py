"""One run at a time per project folder.

A run rewrites params.yaml, writes artifacts/ and records dvc.lock; two at once mix one run's params with the
other's weights. Every entry point that does any of that (`tunepath run`, the `finetune` flow of a deployment,
`tunepath stage` as `dvc repro` calls it) holds this lock while it works:

    with project_lock(root, wait=False):   # ProjectBusy names the holder: pid, command, since when
        ...

The lock is `flock` on .tunepath/run.lock, so the kernel drops it when its holder dies: a killed run leaves no
stale lock to clean up. A child started by the holder (accelerate's per-GPU `tunepath stage train`) inherits
TUNEPATH_RUN_LOCK and works under its parent's lock instead of waiting for it.

A run also holds DVC's own repository lock (.dvc/tmp/lock) from before it writes params.yaml to its end, so a
`dvc repro` (or `dvc exp run`) started meanwhile stops at once, before it removes any stage's outputs.
"""

from __future__ import annotations

import contextlib
import contextvars
import fcntl
import json
import os
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from tunepath.errors import StageError

LOCK_FILE = Path(".tunepath") / "run.lock"
ENV = "TUNEPATH_RUN_LOCK"

# What the current thread holds, as context variables rather than module globals: re-entry (the flow takes the
# lock again inside `tunepath run`; its DVC calls skip DVC's lock) is for the holder's own thread and the tasks
# it runs (Prefect hands a flow's context to its task threads), never for a thread of another flow in this
# process (a new thread starts with an empty context, so it contends for the flock like another process).
_held: contextvars.ContextVar[dict[str, int]] = contextvars.ContextVar("tunepath_held_locks", default={})  # path -> depth
_dvc_held: contextvars.ContextVar[frozenset[str]] = contextvars.ContextVar("tunepath_dvc_locks", default=frozenset())


class ProjectBusy(StageError):
    """Another run works in this project folder; the message names it (`holder_text`: who, without advice)."""

    def __init__(self, message: str, holder_text: str = "") -> None:
        super().__init__(message)
        self.holder_text = holder_text or message


# How long a contender waits for a holder's record: the winner writes it a few microseconds after its flock, and
# a finishing holder empties it just before it closes; an empty record is one of those two moments, not a state.
SETTLE_S = 2.0


def holder(root: Path) -> dict | None:
    """What the lock file says about its last holder (pid, command, started, host); None when unreadable."""
    try:
        return json.loads((Path(root) / LOCK_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def describe_holder(info: dict | None, path: Path) -> str:
    if not info:
        return f"a process that is starting up (lock file {path})"
    when = time.strftime("%H:%M:%S", time.localtime(info.get("started", 0)))
    age = int(time.time() - info.get("started", time.time()))
    text = f"pid {info.get('pid')} `{info.get('command', '?')}` since {when} ({age // 60} min {age % 60} s)"
    if info.get("pid") and not _alive(int(info["pid"])):
        others = _fd_holders(path)
        text += (f"; that process is gone, but {', '.join(map(str, others))} it started still hold the lock"
                 if others else "; that process is gone")
    return text


@contextlib.contextmanager
def project_lock(root: Path, wait: bool = False, what: str | None = None, dvc: bool = False) -> Iterator[None]:
    """Hold the project's run lock (and, with dvc=True, DVC's repository lock) for the block.

    wait=False: ProjectBusy at once when another run holds it; wait=True: say who holds it, then wait."""
    path = (Path(root) / LOCK_FILE).resolve()
    key = str(path)
    depth = _held.get().get(key, 0)
    if depth or _inherited(path):
        token = _held.set({**_held.get(), key: depth + 1})
        try:
            outer = holder(root) or {}  # the outermost holder (`tunepath run`) is who a DVC user should be told about
            with (dvc_lock(root, outer.get("command", what), outer.get("started")) if dvc and not holds_dvc_lock(root)
                  else contextlib.nullcontext()):
                yield
        finally:
            _held.reset(token)
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)  # not inherited across exec; forked children share it
    try:
        info = _take_or_describe(fd, root)
        if info is not None:
            busy = f"{Path(root)}: another run works in this project folder: {describe_holder(info, path)}"
            if not wait:
                raise ProjectBusy(f"{busy}. Wait for it (or pass --wait), or stop it; two runs in one folder would mix "
                                  "one run's params with the other's weights", holder_text=busy) from None
            print(f"tunepath: {busy}; waiting for it to finish", file=sys.stderr, flush=True)
            fcntl.flock(fd, fcntl.LOCK_EX)
        record = {"pid": os.getpid(), "command": what or _command(), "started": time.time(), "host": socket.gethostname()}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(record) + "\n").encode(), 0)
        token = _held.set({**_held.get(), key: 1})
        previous = os.environ.get(ENV)
        os.environ[ENV] = f"{key}:{os.getpid()}"
        try:
            with (dvc_lock(root, record["command"], record["started"]) if dvc else contextlib.nullcontext()):
                yield
        finally:
            _held.reset(token)
            if previous is None:
                os.environ.pop(ENV, None)
            else:
                os.environ[ENV] = previous
            os.ftruncate(fd, 0)
    finally:
        os.close(fd)  # closing drops the flock


def _take_or_describe(fd: int, root: Path) -> dict | None:
    """Take the flock (None), or return the holder's record. A contender that finds the record empty is
    between a winner's flock and its write, or a finishing holder's truncate and its close: it tries again
    for up to SETTLE_S instead of naming "a process that is starting up" (or refusing a run the lock was
    just about to admit)."""
    deadline = time.monotonic() + SETTLE_S
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return None
        except BlockingIOError:
            pass
        info = holder(root)
        if info or time.monotonic() >= deadline:
            return info or {}
        time.sleep(0.01)


@contextlib.contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """A plain blocking flock on `path` for the block: for short steps several runs of one project share
    (opening the MLflow store the first time, landing a DVC experiment)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def held(root: Path) -> bool:
    """Whether this process works under the project's lock (its own or its parent's)."""
    path = (Path(root) / LOCK_FILE).resolve()
    return bool(_held.get().get(str(path))) or _inherited(path)


def _inherited(path: Path) -> bool:
    """The lock is held by an ancestor of this process that handed it down (accelerate's children of a run)."""
    value = os.environ.get(ENV, "")
    where, _, pid = value.rpartition(":")
    if where != str(path) or not pid.isdigit():
        return False
    info = holder(path.parent.parent) or {}
    return info.get("pid") == int(pid) and int(pid) in _ancestors()


@contextlib.contextmanager
def dvc_lock(root: Path, what: str | None = None, since: float | None = None) -> Iterator[None]:
    """DVC's repository lock, taken as DVC takes it (zc.lockfile on .dvc/tmp/lock, 3 s of retries).

    DVC writes its pid into the file; this writes the pid, then who holds it and since when, so the file itself
    names the run to whoever meets DVC's "Unable to acquire lock" (DVC's message is fixed text that names no one)."""
    tmp = Path(root) / ".dvc" / "tmp"
    if not tmp.parent.is_dir():
        yield  # not a DVC repository: nothing to share
        return
    refuse_hardlink_lock(root)
    import zc.lockfile

    tmp.mkdir(exist_ok=True)
    since = time.strftime("%H:%M:%S", time.localtime(since))
    template = "{pid} " + f"{what or _command()} since {since} (tunepath's run lock: .tunepath/run.lock)".replace("{", "{{").replace("}", "}}")
    lock = None
    for attempt in range(7):  # DVC's own retries: 6 more after the first, 0.5 s apart
        try:
            lock = zc.lockfile.LockFile(str(tmp / "lock"), content_template=template)
            break
        except zc.lockfile.LockError:
            if attempt < 6:
                time.sleep(0.5)
    if lock is None:
        pid = _read_pid(tmp / "lock")
        who = f"pid {pid} `{_cmdline(pid)}`" if pid else "another DVC process"
        raise ProjectBusy(f"{Path(root)}: DVC is working in this project ({who} holds {tmp / 'lock'}); "
                          "wait for it to finish, then run again") from None
    token = _dvc_held.set(_dvc_held.get() | {str(Path(root).resolve())})
    try:
        yield
    finally:
        _dvc_held.reset(token)
        lock.close()


class HardlinkLockSet(StageError):
    """The project turns on DVC's core.hardlink_lock, a lock that tunepath's does not exclude."""


def refuse_hardlink_lock(root: Path) -> None:
    """Refuse a project whose DVC config turns on core.hardlink_lock, naming the file that sets it.

    DVC then locks with hard links (flufl.lock) on the same .dvc/tmp/lock, while tunepath takes that file as DVC
    does by default (an fcntl lock, zc.lockfile): neither sees the other, so a `dvc repro` beside a run would
    delete the stages' outputs the run is writing. A filesystem that needs hard-link locks (NFS across hosts) may
    not honour tunepath's flocks either, so taking DVC's hard-link lock instead would not make the run lock safe."""
    from dvc.config import Config, ConfigError

    try:
        config = Config(dvc_dir=str(Path(root) / ".dvc"))
        if not config["core"].get("hardlink_lock", False):
            return
        setters = [config.files[level] for level in config.LEVELS
                   if level in config.files and "hardlink_lock" in config.load_one(level).get("core", {})]
    except ConfigError:
        return  # DVC itself reports a broken config, in its words, when the first stage runs
    where = setters[-1] if setters else "DVC's config"
    level = next((lvl for lvl in ("local", "repo", "global", "system") if config.files.get(lvl) == where), "repo")
    flag = {"local": " --local", "global": " --global", "system": " --system"}.get(level, "")
    raise HardlinkLockSet(
        f"{Path(root)}: DVC's core.hardlink_lock is on (set in {where}): DVC then locks this project with hard links, "
        "which tunepath's run lock does not exclude, so a `dvc repro` beside a run would not be stopped. Turn it "
        f"off to run tunepath here: dvc config{flag} --unset core.hardlink_lock")


def dvc_lock_holder(root: Path) -> str:
    """What .dvc/tmp/lock says about its holder (for a tunepath run: pid, command, since when); empty if nothing."""
    try:
        return (Path(root) / ".dvc" / "tmp" / "lock").read_text().strip()
    except OSError:
        return ""


def holds_dvc_lock(root: Path) -> bool:
    """Whether this thread (or the flow whose task it runs) holds DVC's lock on `root`."""
    return str(Path(root).resolve()) in _dvc_held.get()


def _command() -> str:
    text = " ".join(["tunepath", *sys.argv[1:]])
    text = text if len(text) <= 200 else text[:197] + "..."
    parent = _cmdline(os.getppid()).split()
    names = [Path(a).name for a in parent[:3]]
    if "dvc" in names:  # `tunepath stage` as a stage of `dvc repro` / `dvc exp run`
        text += f" (a stage of `dvc {' '.join(parent[names.index('dvc') + 1:])[:80]}`, pid {os.getppid()})"
    return text


def _read_pid(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    first = text.split(maxsplit=1)[0] if text else ""  # DVC writes " PID"; a tunepath run "PID what since when"
    return int(first) if first.isdigit() else None


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()[:200]
    except OSError:
        return "?"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _ancestors() -> set[int]:
    out, pid = set(), os.getppid()
    while pid > 1 and pid not in out:
        out.add(pid)
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            break
        pid = int(stat.rsplit(")", 1)[1].split()[1])
    return out


def _fd_holders(path: Path) -> list[int]:
    """Processes with the lock file open (a forked child of a killed run keeps the lock)."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            if any(os.readlink(fd) == str(path) for fd in (proc / "fd").iterdir()):
                found.append(int(proc.name))
        except OSError:
            continue
    return found
