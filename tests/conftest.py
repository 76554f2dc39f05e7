"""Shared fixtures: the demo assets built once per session, and project folders for end-to-end runs.

The environment is set before anything imports Prefect, MLflow or DVC: offline, and one Prefect home for the
whole session, so every flow in the session shares one temporary Prefect server.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
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


@pytest.fixture(autouse=True)
def _no_tracking_uri_leaks():
    """`mlflow.set_tracking_uri` in one test writes MLFLOW_TRACKING_URI into os.environ, which every later
    subprocess would inherit (a later run would then log into another test's registry)."""
    before = os.environ.get("MLFLOW_TRACKING_URI")
    yield
    if before is None:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    else:
        os.environ["MLFLOW_TRACKING_URI"] = before


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
