"""DVC as the ledger of a flow run: which stages are up to date, and recording what a stage produced.

The Prefect flow runs the same core functions as `dvc repro`; after each stage it records the stage's deps,
params and outs into dvc.lock (`dvc commit`), so right after a flow run `dvc status` is clean and `dvc repro`
would reproduce it. A stage whose lock entry still matches the workspace is skipped.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from pathlib import Path

log = logging.getLogger(__name__)


@contextlib.contextmanager
def _inside(root: Path) -> Iterator[None]:
    """DVC resolves output paths against the working directory (asserts otherwise): work from the project root."""
    before = Path.cwd()
    os.chdir(root)
    try:
        yield
    finally:
        os.chdir(before)


class Ledger:
    """A thin handle on the project's DVC repository (the DVC import costs about a second per process)."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root).resolve()

    def changes(self, stage: str) -> dict:
        """What DVC sees changed for this stage (deps, params, outs) against dvc.lock; empty when up to date."""
        with _inside(self.root), self._repo() as repo:
            return repo.status(targets=[stage])

    def record(self, stage: str) -> None:
        """Store the stage's outputs in the DVC cache and its deps/params/outs hashes in dvc.lock."""
        with _inside(self.root), self._repo() as repo:
            repo.commit(stage, force=True)

    def _repo(self):
        from dvc.lock import LockNoop
        from dvc.repo import Repo

        from tunepath.logs import adopt_dvc_loggers
        from tunepath.runlock import holds_dvc_lock

        adopt_dvc_loggers()  # DVC's own console handlers would print each of its messages a second time
        repo = Repo(str(self.root))
        if holds_dvc_lock(self.root):
            repo.lock = LockNoop()  # this run holds DVC's lock from start to end (tunepath.runlock); DVC would wait on it
        return repo
