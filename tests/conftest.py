"""Shared fixtures: the demo assets built once per session, and project folders for end-to-end runs.

The environment is set before anything imports Prefect, MLflow or DVC: offline, and one Prefect home for the
whole session, so every flow in the session shares one temporary Prefect server.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from tunepath.offline import OFFLINE_ENV

REPO = Path(__file__).resolve().parents[1]
_SESSION_HOME = Path(tempfile.mkdtemp(prefix="tunepath-tests-"))
os.environ.update({
    **OFFLINE_ENV,
    "PREFECT_HOME": str(_SESSION_HOME / "prefect"),
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "180",
    "PREFECT_LOGGING_EXTRA_LOGGERS": "tunepath",
    # the temporary server logs its shutdown after pytest has closed the captured streams
    "PREFECT_LOGGING_LEVEL": "WARNING",
    # core functions called outside a flow log through the stdlib; nothing to send to the API then
    "PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW": "ignore",
})
os.environ.pop("MLFLOW_TRACKING_URI", None)
os.environ.pop("PREFECT_API_URL", None)


# Processes this pytest process starts on purpose, for the rest of the session: the shared temporary Prefect
# server (first flow of the session), multiprocessing's helper processes.
SESSION_HELPERS = ("prefect.server.api.server:create_app", "multiprocessing.resource_tracker", "multiprocessing.forkserver")


def strays(marker: Path, before: set[int]) -> list:
    """Processes alive now, not alive in `before`, that these tests started: those whose nearest ancestor of
    `before` is this pytest process, and orphans (handed to init) whose command line, working folder or environment
    names `marker` (the session's temporary folder, where every test's projects live). What a process of `before`
    starts is that process's (a module fixture's browser or worker), and the session's helpers started by pytest
    itself are not strays."""
    import psutil

    me, mark = os.getpid(), str(marker)
    mine = []
    for pid in set(psutil.pids()) - before - {me}:
        try:
            proc = psutil.Process(pid)
            if proc.status() == psutil.STATUS_ZOMBIE:
                continue
            cmdline = " ".join(proc.cmdline())
            if proc.ppid() == me and any(h in cmdline for h in SESSION_HELPERS):
                continue
            known = next((p for p in proc.parents() if p.pid == me or p.pid in before), None)
            if known is not None and known.pid == me:
                mine.append(proc)
            elif known is None or not any(p.pid == me for p in known.parents()):  # outside pytest's tree: an orphan?
                texts = [cmdline, proc.cwd(), *proc.environ().values()]
                if any(t == mark or t.startswith(mark + os.sep) or f"{mark}{os.sep}" in t for t in texts):
                    mine.append(proc)
        except psutil.Error:
            continue
    return mine


def stop_strays(marker: Path, before: set[int], grace_s: float = 5.0) -> list[str]:
    """Wait `grace_s` for strays to end on their own (a server that is shutting down), then SIGTERM and SIGKILL
    them; returns what each one was."""
    import psutil

    deadline = time.monotonic() + grace_s
    found = strays(marker, before)
    while found and time.monotonic() < deadline:
        time.sleep(0.2)
        found = strays(marker, before)
    described = []
    for proc in found:
        with contextlib.suppress(psutil.Error):
            described.append(f"pid {proc.pid} (parent {proc.ppid()}): {' '.join(proc.cmdline())[:300]}")
            proc.terminate()
    _, alive = psutil.wait_procs(found, timeout=5)
    for proc in alive:
        with contextlib.suppress(psutil.Error):
            proc.kill()
    return described


@pytest.fixture(scope="session", autouse=True)
def _no_process_outlives_the_session(tmp_path_factory):
    """What module fixtures (the services' `live`) leave after their teardown: checked once every test ended."""
    import psutil

    base, before = tmp_path_factory.getbasetemp(), set(psutil.pids())
    yield
    left = stop_strays(base, before)
    assert not left, "still running after the session's fixtures stopped (now killed):\n" + "\n".join(left)


@pytest.fixture(autouse=True)
def _no_process_outlives_its_test(tmp_path_factory):
    """Every process a test starts (servers, workers, runs and their children) ends by the end of the test,
    also when it fails; processes started by module fixtures before the test are theirs."""
    import psutil

    base, before = tmp_path_factory.getbasetemp(), set(psutil.pids())
    yield
    left = stop_strays(base, before)
    assert not left, "still running after the test (now killed):\n" + "\n".join(left)


@pytest.fixture(autouse=True)
def _no_tracking_uri_leaks():
    """`mlflow.set_tracking_uri` in one test writes MLFLOW_TRACKING_URI into os.environ, which every later
    subprocess would inherit (a later run would then log into another test's registry). Restored to the session's
    value, not to the value at the test's start: a module fixture that runs a pipeline sets it before this fixture
    starts (the disk-full test's run once logged into the tool-calling module's mlflow.db that way)."""
    yield
    os.environ.pop("MLFLOW_TRACKING_URI", None)


# Small and fast for tests; the pipeline code path is the same as `make run`.
FAST_OVERRIDES = ["evaluate.benchmark_limit=20"]


@pytest.fixture(scope="session")
def demo_assets(tmp_path_factory) -> Path:
    """A folder with `data/raw` (demo data) and `models/demo` (the tiny model), built once."""
    from tunepath.demo import DemoConfig, build_demo_model, generate_demo_data

    root = tmp_path_factory.mktemp("demo-assets")
    cfg = DemoConfig()
    generate_demo_data(root / "data" / "raw", cfg)
    files = sorted((root / "data" / "raw").iterdir())
    build_demo_model(root / "models" / "demo", cfg, files)
    return root


def make_project(dest: Path, assets: Path) -> Path:
    """A fresh tunepath project: the repo's params, dvc.yaml and code, the demo assets, git and DVC initialised."""
    dest.mkdir(parents=True, exist_ok=True)
    for name in ("params.yaml", "dvc.yaml", ".gitignore"):
        shutil.copy(REPO / name, dest / name)
    shutil.copytree(REPO / "tunepath", dest / "tunepath", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(REPO / "evals", dest / "evals")
    shutil.copytree(assets / "data", dest / "data")
    shutil.copytree(assets / "models", dest / "models")
    git = ["git", "-c", "user.email=t@example.invalid", "-c", "user.name=t"]
    subprocess.run(["git", "init", "-q"], cwd=dest, check=True)
    subprocess.run([sys.executable, "-m", "dvc", "init", "-q"], cwd=dest, check=True)
    subprocess.run(git + ["add", "-A"], cwd=dest, check=True)
    subprocess.run(git + ["commit", "-q", "-m", "project"], cwd=dest, check=True)
    return dest


def run_stages(root: Path, config: dict) -> dict:
    """Every stage's core function in order (no Prefect, no DVC) on the project at `root`, with `config` as
    params; returns each stage's summary."""
    from tunepath.config import STAGES
    from tunepath.params import build_config
    from tunepath.stages import Workspace, default_tracking_uri, run_stage

    cfg = build_config(config, "test")
    ws = Workspace(root, default_tracking_uri(root))
    return {stage: run_stage(stage, cfg, ws) for stage in STAGES}


@pytest.fixture
def project(tmp_path, demo_assets) -> Path:
    return make_project(tmp_path / "project", demo_assets)
