"""Resume after SIGKILL: a training process is killed mid-way through DPO (after SFT) and rerun; it ends where an
uninterrupted run ends, with the same loss curve."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.test_train_support import curve, project, single_thread, small_config, train  # noqa: F401  (module fixtures)

REPO = Path(__file__).resolve().parents[1]
SETTINGS = {"max_steps": 30, "save_steps": 5, "keep_checkpoints": True}
STAGES = ["sft", "dpo"]

# The killed process: the same run_train as the stage, slowed by its progress hook so the kill lands mid-way.
SCRIPT = """
import sys, time
from pathlib import Path
from tests.test_train_support import small_config, train
train(Path(sys.argv[1]), Path(sys.argv[2]), {stages!r}, "lora", cfg=small_config(**{settings!r}),
      on_progress=lambda row: time.sleep(0.2))
"""


def _complete_steps(stage_dir: Path) -> list[int]:
    return sorted(int(p.parent.name.split("-")[1]) for p in stage_dir.glob("checkpoint-*/COMPLETE"))


@pytest.mark.slow
def test_a_sigkilled_training_resumes_to_the_same_end(project, tmp_path):
    whole = tmp_path / "whole"
    train(project, whole, STAGES, "lora", cfg=small_config(**SETTINGS))

    cut = tmp_path / "cut"
    script = tmp_path / "train_once.py"
    script.write_text(SCRIPT.format(settings=SETTINGS, stages=STAGES))
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}  # same thread count as this process
    errors = tmp_path / "stderr.txt"
    with open(errors, "wb") as err:  # a file, not a pipe: a full pipe would stall the child
        proc = subprocess.Popen([sys.executable, str(script), str(project), str(cut)], cwd=REPO, env=env,
                                stdout=subprocess.DEVNULL, stderr=err)
    stage_dir = cut / "checkpoints" / "train" / "dpo"
    deadline = time.monotonic() + 300
    while not [s for s in _complete_steps(stage_dir) if s >= 10]:
        assert proc.poll() is None, errors.read_text(errors="replace")[-3000:]
        assert time.monotonic() < deadline, "no checkpoint after 300 s"
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not (cut / "train" / "metrics.json").exists()
    last = max(_complete_steps(stage_dir))
    assert last < 30, "the run finished before the kill; slow it down"
    # a save cut off by a kill: the folder is there, its marker is not; it must never be loaded
    torn = stage_dir / f"checkpoint-{last + 1}"
    shutil.copytree(stage_dir / f"checkpoint-{last}", torn)
    (torn / "COMPLETE").unlink()
    (torn / "adapter_model.safetensors").write_bytes(b"torn")

    summary = train(project, cut, STAGES, "lora", cfg=small_config(**SETTINGS))
    assert [s["resumed_from_step"] for s in summary["stages"]] == [30, last]  # SFT had finished
    assert [s["steps"] for s in summary["stages"]] == [30, 30]
    state = json.loads((cut / "train" / "stages" / "dpo" / "trainer_state.json").read_text())
    assert state["global_step"] == 30
    assert curve(cut) == curve(whole)
