"""DVC as the ledger of a flow run: which stages are up to date, and recording what a stage produced.

The Prefect flow runs the same core functions as `dvc repro`; after each stage it records the stage's deps,
params and outs into dvc.lock (`dvc commit`), so right after a flow run `dvc status` is clean and `dvc repro`
would reproduce it. A stage whose lock entry still matches the workspace is skipped.
"""

from __future__ import annotations

import logging
from pathlib import Path

log = logging.getLogger(__name__)


class Ledger:
    """A thin handle on the project's DVC repository (one per flow run; the DVC import costs about a second)."""

    def __init__(self, root: Path) -> None:
        from dvc.repo import Repo

        self.root = root
        self.repo = Repo(str(root))

    def is_current(self, stage: str) -> bool:
        """True when dvc.lock records this stage and its deps, params and outs are unchanged."""
        changes = self.repo.status(targets=[stage])
        return not changes

    def changes(self, stage: str) -> dict:
        return self.repo.status(targets=[stage])

    def record(self, stage: str) -> None:
        """Store the stage's outputs in the DVC cache and its hashes in dvc.lock."""
        self.repo.commit(stage, force=True)

    def close(self) -> None:
        self.repo.close()
