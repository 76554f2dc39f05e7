"""Which exceptions are the user's to fix (one line, exit 2) rather than bugs (a traceback).

Bad input and settings raise ValueError (or a subclass: ConfigError, ProfileError, ...); missing or unreadable
files OSError; a stage that stops for a reason the user can act on (a failed gate, CUDA out of memory, a
server that did not start) raises StageError. Anything else, a RuntimeError from torch included, is a bug or
a fault of the machine and keeps its traceback.
"""

from __future__ import annotations


class StageError(RuntimeError):
    """A stage stopped for a reason the user can act on; the message says what and which setting to change."""


USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, OSError, NotImplementedError, StageError)


def describe(e: BaseException) -> str:
    """The first line of the error (its type's name when it has no message)."""
    text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return text


def _chain(e: BaseException):
    """e and every exception behind it (causes, contexts, SQLAlchemy's `orig`), each once."""
    seen, todo = set(), [e]
    while todo:
        x = todo.pop(0)
        if x is None or id(x) in seen:
            continue
        seen.add(id(x))
        yield x
        todo += [x.__cause__, x.__context__, getattr(x, "orig", None) if isinstance(getattr(x, "orig", None), BaseException) else None]


def _free(path) -> str:
    import shutil
    from pathlib import Path

    p = Path(path)
    while not p.exists() and p != p.parent:
        p = p.parent
    try:
        return f"{shutil.disk_usage(p).free / 1e6:,.0f} MB free on the disk holding {p}"
    except OSError:
        return "free space unknown"


def _first_line(x: BaseException) -> str:
    return describe(x)[:300]


def explain_fault(e: BaseException, mlflow_db=None, root=None) -> str | None:
    """One line for the faults whose own message hides the cause, else None: a full disk (ENOSPC anywhere in the
    chain, or SQLite's "database or disk is full"), a locked or corrupt MLflow SQLite file (`mlflow_db`), a
    corrupt dvc.lock. MLflow wraps the SQL error and DVC its parser's, so the chain is searched, not the top."""
    import errno
    import sqlite3

    chain = list(_chain(e))
    for x in chain:
        if isinstance(x, OSError) and x.errno == errno.ENOSPC:
            where = x.filename or mlflow_db or root
            writing = f" writing {x.filename}" if x.filename else ""
            return f"No space left on device{writing} ({_free(where) if where else 'free space unknown'}); free some space and rerun"
    for x in chain:  # safetensors (Rust) and others put the OS error into their message only
        if "No space left on device" in str(x) or "StorageFull" in str(x):
            where = mlflow_db or root
            return (f"No space left on device ({_free(where) if where else 'free space unknown'}); "
                    f"{type(x).__name__}: {_first_line(x)[:200]}; free some space and rerun")
    torch_write = next((x for x in chain if "PytorchStreamWriter" in str(x) or "inline_container" in str(x)), None)
    if torch_write is not None and root is not None:
        # torch's writer drops the errno; a full disk is by far its most common cause
        return (f"saving a torch file failed ({_first_line(torch_write)[:200]}); {_free(root)}: "
                "a full disk is the usual cause")
    db = mlflow_db or "the MLflow database"
    for x in chain:
        if not isinstance(x, sqlite3.Error):
            continue
        text = str(x).lower()
        if "database or disk is full" in text:
            return (f"No space left on device writing {db} (SQLite: database or disk is full; "
                    f"{_free(db) if mlflow_db else 'free space unknown'}); free some space and rerun")
        if "database is locked" in text or "database table is locked" in text:
            return (f"{db} is locked by another process (SQLite: {x}); wait for the other tunepath or MLflow process, or "
                    "stop it, and rerun")
        if "file is not a database" in text or "malformed" in text or "disk i/o error" in text:
            return (f"{db} is corrupt or unreadable (SQLite: {x}); move it away (an empty registry is created) or "
                    "restore it from a backup")
    for x in chain:
        if type(x).__module__.startswith("dvc.") and "dvc.lock" in str(x):
            cause = next((c for c in chain[chain.index(x) + 1:] if not type(c).__module__.startswith("dvc.")), None)
            detail = f": {_first_line(cause)}" if cause is not None else ""
            return (f"dvc.lock is corrupt ({_first_line(x)}{detail}); restore it with `git checkout dvc.lock`, or "
                    "delete it (every stage then reruns)")
    return None
