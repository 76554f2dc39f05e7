"""A run in its own working copy of the project, landing as a DVC experiment.

A second run in a busy project (`tunepath run`, a deployment run) works in a git worktree of the project under
.tunepath/workspaces/NAME, as `dvc exp run --temp` works in .dvc/tmp/exps: the project's HEAD plus its
uncommitted changes, with the run's own params.yaml, artifacts/ and dvc.lock. What it shares with the project:

- the DVC cache (`cache.dir` in the copy's .dvc/config.local), so stages with unchanged inputs are checked out
  from the cache and skipped, and what this run makes is there for `dvc exp apply`;
- the MLflow store: the copy's mlflow.db is a link to the project's, so its MLflow run and registry version
  land in the project's one registry (SQLite follows the link for its journal too);
- read-only inputs that neither git nor DVC hold (a local base model under models/): linked, not copied.

    copy = open_copy(home, name)           # worktree, changes, shared cache and registry
    ... write params, bring_inputs(copy, home), run the stages in `copy` ...
    land(copy, home, name)                 # `dvc exp save -n NAME`: refs/exps/... shared with the project
    close_copy(copy, home)

An interrupted or failed run keeps its copy, and its rerun resumes there (tunepath.workspaces).

The project's own params.yaml, dvc.lock and artifacts/ are never written. Git worktrees share refs, so the
experiment is visible to `dvc exp show` in the project at once; `dvc exp apply NAME` brings it into the project.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import time
from pathlib import Path

from tunepath.errors import StageError

log = logging.getLogger(__name__)

STATE = Path(".tunepath")
WORKSPACES = STATE / "workspaces"
HOME_FILE = Path(".tunepath") / "home"  # in a copy: the project it belongs to
SHARED_LINKS = ("mlflow.db",)
# SQLite's files beside a database while a writer works on it: a run killed mid-write leaves the journal until the
# next connection rolls it back. Never a change of the project: not carried into a copy, not part of a run's key.
SQLITE_SIDECARS = tuple(f"{name}{suffix}" for name in SHARED_LINKS for suffix in ("-journal", "-wal", "-shm"))
LOCKS = Path(".tunepath") / "locks"


class IsolationError(StageError):
    """A working copy could not be made or landed; the message names the folder and the cause."""


def home_of(root: Path) -> Path:
    """The project a working copy belongs to; the folder itself when it is not a copy."""
    marker = Path(root) / HOME_FILE
    try:
        return Path(marker.read_text(encoding="utf-8").strip())
    except OSError:
        return Path(root)


def shared_lock_path(home: Path, what: str) -> Path:
    """A flock file for a short step that every run of the project takes in turn (tunepath.runlock.file_lock)."""
    return Path(home) / LOCKS / f"{what}.lock"


def _git(cwd: Path, *args: str) -> str:
    try:
        done = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, check=True)
    except FileNotFoundError as e:
        raise IsolationError("an isolated run needs git (it works in a git worktree of the project)") from e
    except subprocess.CalledProcessError as e:
        raise IsolationError(f"{cwd}: `git {' '.join(args[:3])}` failed: {e.stderr.strip().splitlines()[-1:] or e}") from e
    return done.stdout


def cannot_isolate(home: Path) -> str | None:
    """Why a run in `home` cannot have a working copy of its own (None: it can). Cheap: before anything starts."""
    try:
        _git(Path(home), "rev-parse", "--verify", "-q", "HEAD")
    except IsolationError:
        return "the project is not in git with a commit, so a run cannot work in a copy of its own (git init and commit it)"
    if not (Path(home) / ".dvc").is_dir():
        return "the project is not a DVC repository, so a run cannot land as a DVC experiment (dvc init)"
    return None


def open_copy(home: Path, name: str) -> Path:
    """A worktree of the project at HEAD with its uncommitted changes, the DVC cache and MLflow store shared."""
    home = Path(home).resolve()
    reason = cannot_isolate(home)
    if reason:
        raise IsolationError(f"{home}: {reason}; or run with --wait")
    copy = home / WORKSPACES / name
    if copy.exists():
        raise IsolationError(f"{copy}: a working copy of that name exists already")
    copy.parent.mkdir(parents=True, exist_ok=True)
    _git(home, "worktree", "prune")  # folders of earlier copies removed by hand
    _git(home, "worktree", "add", "--detach", "--quiet", str(copy), "HEAD")
    carried = _carry_changes(home, copy)
    (copy / HOME_FILE).parent.mkdir(parents=True, exist_ok=True)
    (copy / HOME_FILE).write_text(f"{home}\n", encoding="utf-8")
    for name_ in SHARED_LINKS:
        os.symlink(home / name_, copy / name_)
    _share_dvc(home, copy)
    log.info("working copy %s (HEAD %s, %d uncommitted file(s) carried over)", copy,
             _git(home, "rev-parse", "--short", "HEAD").strip(), carried)
    return copy


def _carry_changes(home: Path, copy: Path) -> int:
    """What differs from HEAD in the project (edited, staged, new, deleted files git sees), as `dvc exp run
    --temp` carries the workspace's changes into its temporary folder."""
    changed = changed_files(home)
    for rel in changed:
        src, dst = home / rel, copy / rel
        if not src.exists() and not src.is_symlink():
            dst.unlink(missing_ok=True)
            continue
        dst.parent.mkdir(parents=True, exist_ok=True)
        if rel in ("dvc.lock", "params.yaml"):
            _copy_whole_yaml(src, dst)
        else:
            shutil.copy2(src, dst, follow_symlinks=False)
    return len(changed)


def head_commit(home: Path) -> str:
    return _git(Path(home), "rev-parse", "HEAD").strip()


def changed_files(home: Path) -> list[str]:
    """What git sees differing from HEAD in the project: edited, staged, deleted and new (not ignored) files."""
    changed = [p for p in _git(home, "diff", "--name-only", "-z", "HEAD").split("\0") if p]
    changed += [p for p in _git(home, "ls-files", "--others", "--exclude-standard", "-z").split("\0") if p]
    state = f"{Path(STATE).as_posix()}/"
    # a project that does not ignore .tunepath/: not the copies
    return sorted({p for p in changed if not p.startswith(state) and p not in SQLITE_SIDECARS})


def _copy_whole_yaml(src: Path, dst: Path, tries: int = 20) -> None:
    """A YAML file the project's own run may be rewriting this moment (DVC writes dvc.lock in place): a copy
    that parses; HEAD's version (already in the worktree) when none does within a few seconds."""
    import yaml

    for _ in range(tries):
        text = src.read_text(encoding="utf-8")
        try:
            yaml.safe_load(text)
        except yaml.YAMLError:
            time.sleep(0.2)
            continue
        dst.write_text(text, encoding="utf-8")
        return
    log.warning("%s kept changing while it was copied; the working copy starts from HEAD's version", src)


def _share_dvc(home: Path, copy: Path) -> None:
    """The copy's DVC config: the project's local config (remotes, credentials) with the project's cache."""
    from dvc.config import Config
    from dvc.repo import Repo

    with Repo(str(home)) as repo:
        cache_dir = repo.cache.local_cache_dir
        local = repo.config.read("local")
    config = Config(dvc_dir=str(copy / ".dvc"))
    with config.edit("local") as conf:
        conf.update(local)
        conf.setdefault("cache", {})["dir"] = str(Path(cache_dir).resolve())


def bring_inputs(copy: Path, home: Path, outputs: bool = True) -> dict[str, list[str]]:
    """Make the stages' inputs that git does not hold present in the copy, then check out every stage's outputs
    that dvc.lock names and the cache holds (so DVC finds unchanged stages up to date and the run skips them).

    Data folders DVC tracks (data/raw.dvc) come from the shared cache, or are copied when the cache lacks them;
    other inputs outside git (a local base model) are linked to the project's. Call it after the run's
    params.yaml is written: dvc.yaml's paths depend on it (${model.base}). outputs=False (a resumed copy): the
    copy's own outputs and checkpoints stay as its interrupted run left them."""
    from dvc.repo import Repo

    from tunepath.logs import adopt_dvc_loggers

    adopt_dvc_loggers()
    done: dict[str, list[str]] = {"checked out": [], "copied": [], "linked": []}
    before = Path.cwd()
    os.chdir(copy)  # DVC resolves paths against the working directory
    try:
        _bring(Repo, copy, home, done, outputs)
    finally:
        os.chdir(before)
    return done


def _bring(Repo, copy: Path, home: Path, done: dict[str, list[str]], outputs: bool) -> None:
    from dvc.lock import LockNoop

    from tunepath.runlock import holds_dvc_lock

    with Repo(str(copy)) as repo:
        if holds_dvc_lock(copy):
            repo.lock = LockNoop()  # the run holds the copy's DVC lock (tunepath.runlock); DVC would wait on it and give up
        stages = list(repo.index.stages)
        made = {_rel(out, copy) for stage in stages if not stage.is_data_source for out in stage.outs}
        for stage in (s for s in stages if s.is_data_source):
            for out in stage.outs:
                rel = _rel(out, copy)
                if (copy / rel).exists():
                    continue
                try:
                    repo.checkout(targets=[stage.relpath])
                    done["checked out"].append(rel)
                except Exception as e:  # noqa: BLE001  (not in the cache: the project's files are the data)
                    log.info("%s: not in the DVC cache (%s); copied from the project", rel, type(e).__name__)
                    _copy_tree(home / rel, copy / rel)
                    done["copied"].append(rel)
        for stage in stages:
            for dep in stage.deps:
                rel = _rel(dep, copy)
                if not rel or rel == "params.yaml" or rel.startswith("..") or _under(rel, made):
                    continue
                if (copy / rel).exists() or not (home / rel).exists():
                    continue
                top = _first_missing(copy, rel)
                top.parent.mkdir(parents=True, exist_ok=True)
                os.symlink(home / top.relative_to(copy), top)
                done["linked"].append(str(top.relative_to(copy)))
        if not outputs:
            return
        try:  # the outputs dvc.lock names: what the project's last runs made, reused where inputs still match
            repo.checkout(allow_missing=True)
        except Exception as e:  # noqa: BLE001  (a missing object only means that stage runs again)
            log.info("not every output of dvc.lock is in the cache (%s); those stages run again", e)


def _rel(item, copy: Path) -> str:
    """A dep's or out's path relative to the copy (a .dvc file's own paths are relative to its folder)."""
    path = getattr(item, "fs_path", None)
    return os.path.relpath(path, copy) if path else ""


def _under(rel: str, outs: set[str]) -> bool:
    return any(rel == o or rel.startswith(o.rstrip("/") + "/") for o in outs)


def _first_missing(copy: Path, rel: str) -> Path:
    """The topmost missing folder on the way to `rel`: link models/ once rather than models/demo/x.json too."""
    path = copy
    for part in Path(rel).parts:
        path = path / part
        if not path.exists():
            return path
    return path


def _copy_tree(src: Path, dst: Path) -> None:
    if src.is_dir():
        shutil.copytree(src, dst, symlinks=True)
    elif src.exists():
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, dst)


def land(copy: Path, home: Path, name: str, message: str | None = None) -> dict:
    """Save the copy's state as DVC experiment `name` (`dvc exp save`): params.yaml, dvc.lock and metrics in a
    commit under refs/exps/, the outputs in the shared cache. One run lands at a time: DVC keeps its
    experiment bookkeeping (refs/exps/exec/...) in refs that every worktree shares."""
    from dvc.repo import Repo

    from tunepath.logs import adopt_dvc_loggers
    from tunepath.runlock import file_lock

    adopt_dvc_loggers()
    before = Path.cwd()
    with file_lock(shared_lock_path(home, "experiments")):
        os.chdir(copy)  # DVC resolves paths against the working directory
        try:
            with Repo(str(copy)) as repo:
                # force: a resumed run whose first try was killed after landing lands again under its name
                rev = repo.experiments.save(name=name, message=message, force=True)
        finally:
            os.chdir(before)
    ref = next((line.split()[1] for line in _git(home, "for-each-ref", "--format=%(objectname) %(refname)", "refs/exps").splitlines()
                if line.split()[1].endswith(f"/{name}") and "/exec/" not in line), None)
    log.info("landed as DVC experiment %s (%s, %s)", name, (rev or "?")[:7], ref)
    return {"name": name, "rev": rev, "ref": ref, "baseline": _git(home, "rev-parse", "HEAD").strip()}


def close_copy(copy: Path, home: Path) -> None:
    """Remove the working copy: its links first (never what they point at), then the worktree."""
    for path in [copy / n for n in SHARED_LINKS] + [p for p in copy.rglob("*") if p.is_symlink()]:
        if path.is_symlink():
            path.unlink()
    shutil.rmtree(copy, ignore_errors=True)
    Path(copy).with_suffix(".json").unlink(missing_ok=True)  # its record, unlinked before the run lets go of it
    _git(home, "worktree", "prune")
