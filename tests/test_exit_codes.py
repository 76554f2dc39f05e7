"""A failed pipeline is a failed command: `make run`, `tunepath run` and `tunepath stage` exit non-zero on a failed gate.

Slow tier: the real pipeline runs end to end on the demo (about a minute on two cores).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO, make_project

pytestmark = pytest.mark.slow

# A gain no model can reach: the primary gate must fail.
FAIL_GATE = "--set evaluate.min_primary_gain=1"


def test_make_run_and_tunepath_stage_exit_non_zero_when_a_gate_fails(tmp_path, demo_assets):
    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    root = make_project(tmp_path / "project", demo_assets)
    for name in ("Makefile", "pyproject.toml"):
        shutil.copy(REPO / name, root / name)
    for name in ("tasks", "flows"):
        shutil.copytree(REPO / name, root / name, ignore=shutil.ignore_patterns("__pycache__"))
    # the Makefile's install target is satisfied by the environment running the tests
    (root / ".venv").mkdir()
    (root / ".venv" / ".installed").touch()
    subprocess.run([sys.executable, "-m", "dvc", "remote", "add", "-q", "-d", "local", str(tmp_path / "remote")], cwd=root, check=True)
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}", "PYTHONPATH": str(root)}
    run = subprocess.run(["make", "run", f"ARGS={FAIL_GATE}"], cwd=root, env=env, capture_output=True, text=True, timeout=900)
    assert run.returncode != 0, run.stdout[-2000:] + run.stderr[-2000:]
    assert "evaluation gate failed (primary:" in run.stderr and "pipeline:" in run.stdout
    # one line: no traceback from Prefect's task or flow records, and the error said once
    assert "Traceback" not in run.stderr, run.stderr[-3000:]
    assert run.stderr.count("evaluation gate failed (primary:") == 1, run.stderr[-3000:]
    assert not (root / "artifacts" / "register" / "model.json").exists()

    # the stage alone, as `dvc repro` runs it, fails the same way (params.yaml now holds the failing value)
    stage = subprocess.run([sys.executable, "-m", "tunepath.cli", "--project", str(root), "stage", "evaluate"],
                           cwd=root, env=env, capture_output=True, text=True, timeout=600)
    assert stage.returncode == 2 and "evaluation gate failed (primary:" in stage.stderr, stage.stderr[-2000:]
    assert "Traceback" not in stage.stderr
