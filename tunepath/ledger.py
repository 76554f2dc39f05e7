"""DVC as the ledger of a flow run: which stages are up to date, and recording what a stage produced.

The Prefect flow runs the same core functions as `dvc repro`; after each stage it records the stage's deps,
params and outs into dvc.lock (`dvc commit`), so right after a flow run `dvc status` is clean and `dvc repro`
would reproduce it. A stage whose lock entry still matches the workspace is skipped.

Runs with identical inputs reuse each other's stages through DVC's run cache (`.dvc/cache/runs`, in the cache
every working copy of the project shares): a stage whose deps and params match an entry there is restored from it
(`restore`) instead of computed. DVC leaves a stage with a persistent output out of its run cache; train's
checkpoints are one, so train is cached without them (they only serve to resume that one training). A run that
reaches a stage another run is computing with the same inputs waits for it (`first_with_these_inputs`), then
restores what it made: two runs started together compute each shared stage once.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
from collections.abc import Iterator
from pathlib import Path

log = logging.getLogger(__name__)

# register records a version in the MLflow registry for this run: never taken from another run
NOT_REUSED = ("register",)


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

    def restore(self, stage: str) -> bool:
        """The stage's outputs from DVC's run cache, when a run with the same deps and params made them, then
        recorded in dvc.lock; False when the run cache has none (or they cannot be checked out: the stage runs)."""
        if stage in NOT_REUSED:
            return False
        from dvc.stage.cache import RunCacheNotFoundError

        with _inside(self.root), self._repo() as repo, repo.lock:
            st = self._cacheable(repo, stage)
            try:  # as `dvc repro` does before it runs a stage: the deps are hashed inside, after the lock entry is compared
                repo.stage_cache.restore(st)
            except RunCacheNotFoundError:
                return False
            except Exception as e:  # noqa: BLE001  (outputs that cannot be checked out: the stage runs, as without a cache)
                log.info("%s: not restored from DVC's run cache (%s); it runs", stage, e)
                return False
        for out in self._persistent(stage):
            out.mkdir(parents=True, exist_ok=True)  # train's checkpoints: not cached, and not needed for the weights
        self.record(stage)
        log.info("%s: restored from DVC's run cache (a run with the same deps and params made it), skipped", stage)
        return True

    def remember(self, stage: str) -> None:
        """Put a recorded stage into DVC's run cache where DVC itself does not (train: without its checkpoints)."""
        if stage in NOT_REUSED or not self._persistent(stage):
            return  # `record` saved it already (DVC's commit writes the run-cache entry of a cacheable stage)
        with _inside(self.root), self._repo() as repo, repo.lock:
            st = self._cacheable(repo, stage)
            st.save(run_cache=False)
            repo.stage_cache.save(st)

    def inputs_key(self, stage: str) -> str:
        """A digest of the stage's command, deps (as they are now) and params: equal for runs with identical inputs."""
        from dvc.stage.serialize import to_single_stage_lockfile
        from dvc.utils import dict_sha256

        with _inside(self.root), self._repo() as repo:
            st = self._cacheable(repo, stage)
            st.save_deps()
            entry = to_single_stage_lockfile(st)
        entry.pop("outs", None)
        return dict_sha256(entry)

    @contextlib.contextmanager
    def first_with_these_inputs(self, stage: str, lock_dir: Path) -> Iterator[bool]:
        """Hold the stage's inputs for the block, so that no other run computes the same stage from the same inputs
        meanwhile. Yields True when the outputs were restored from the run cache (another run made them, maybe while
        this one waited): the caller then skips the stage; False: the caller computes it, and records it in the run
        cache before the block ends (`record`, `remember`), so a run waiting on the lock finds it there."""
        if stage in NOT_REUSED:
            yield False
            return
        try:
            key = self.inputs_key(stage)
        except Exception as e:  # noqa: BLE001  (a missing dep: the stage itself says what is wrong, in its words)
            log.debug("%s: no inputs digest (%s)", stage, e)
            yield False
            return
        path = Path(lock_dir) / f"stage-{key[:20]}.lock"
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                other = os.pread(fd, 4096, 0).decode(errors="replace").strip() or "another run"
                log.info("%s: %s computes it from the same inputs; waiting to reuse its outputs", stage, other)
                fcntl.flock(fd, fcntl.LOCK_EX)
            # looked up under the lock, never before it: a run that finished between a look and the lock (two
            # runs started at the same instant) leaves the lock free and its work done
            if self.restore(stage):
                yield True
                return
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"pid {os.getpid()} (in {self.root})\n".encode(), 0)
            yield False
        finally:
            os.close(fd)

    def _cacheable(self, repo, stage: str):
        """The stage as DVC's run cache takes it: without its persistent outputs (which DVC never caches a run of)."""
        [st] = repo.stage.collect(stage)
        st.outs = [o for o in st.outs if not o.persist]
        return st

    def _persistent(self, stage: str) -> list[Path]:
        with _inside(self.root), self._repo() as repo:
            [st] = repo.stage.collect(stage)
            return [Path(o.fs_path) for o in st.outs if o.persist]

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
