"""Bad input at the entry point: one line naming what is wrong, a non-zero exit, no traceback."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO


def tunepath(project: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tunepath.cli", "--project", str(project), *args],
                          capture_output=True, text=True, cwd=project, timeout=120)


@pytest.fixture
def bare(tmp_path) -> Path:
    (tmp_path / "params.yaml").write_text((REPO / "params.yaml").read_text())
    (tmp_path / "data" / "raw").mkdir(parents=True)
    (tmp_path / "data" / "raw" / "chat.jsonl").write_text('{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}\n')
    return tmp_path


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--set", "train.lerning_rate=0.1"], "train.lerning_rate: unknown key"),
        (["--set", "train.max_steps=many"], "train.max_steps"),
        (["--set", "model.base=/no/such/model"], "model.base"),
        (["--set", "data.raw_dir=nowhere"], "data.raw_dir"),
        (["--set", "oops"], "expected section.key=value"),
    ],
)
def test_bad_parameters_give_one_line_errors(bare, args, expected):
    out = tunepath(bare, "run", *args)
    assert out.returncode == 2
    assert expected in out.stderr
    assert "Traceback" not in out.stderr
    assert len([l for l in out.stderr.splitlines() if l.startswith("tunepath: error")]) == 1


def test_malformed_params_file_names_the_line(bare):
    (bare / "params.yaml").write_text("train:\n  max_steps: [1,\n")
    out = tunepath(bare, "run")
    assert out.returncode == 2 and "params.yaml" in out.stderr and "line" in out.stderr


def test_missing_params_file(tmp_path):
    out = tunepath(tmp_path, "run")
    assert out.returncode == 2 and "params.yaml: not found" in out.stderr


def test_params_yaml_holds_exactly_the_documented_defaults():
    from tunepath.params import render_defaults

    assert (REPO / "params.yaml").read_text() == render_defaults(), "params.yaml drifted from the config: run `make params`"


def test_help_is_fast():
    out = subprocess.run([sys.executable, "-X", "importtime", "-m", "tunepath.cli", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "run" in out.stdout
    heavy = [m for m in ("torch", "transformers", "prefect", "mlflow", "great_expectations", "dvc.repo") if f"| {m}\n" in out.stderr]
    assert heavy == [], f"--help imported {heavy}"


@pytest.mark.parametrize(("error", "one_line"), [("StageError", True), ("RuntimeError", False), ("ValueError", True)])
def test_stage_errors_are_one_line_and_bugs_keep_their_traceback(bare, error, one_line):
    """A stage stopping for a reason the user can act on is one line; a RuntimeError from anywhere else (torch,
    a bug) shows its traceback (tunepath/errors.py)."""
    driver = (
        "import sys, tunepath.stages as stages\n"
        "from tunepath.errors import StageError\n"
        f"def fail(*a, **k): raise {error}('the evaluation gates did not pass')\n"
        "stages.run_stage = fail\n"
        "from tunepath.cli import main\n"
        "sys.exit(main(sys.argv[1:]))\n"
    )
    out = subprocess.run([sys.executable, "-c", driver, "--project", str(bare), "stage", "validate"],
                         capture_output=True, text=True, cwd=bare, timeout=120)
    assert ("Traceback" not in out.stderr) is one_line, out.stderr[-2000:]
    if one_line:
        assert out.returncode == 2 and "tunepath: error: the evaluation gates did not pass" in out.stderr
    else:
        assert out.returncode == 1 and "RuntimeError: the evaluation gates did not pass" in out.stderr
