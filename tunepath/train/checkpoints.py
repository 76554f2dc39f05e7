"""Checkpoints that survive SIGKILL: a checkpoint counts only once its COMPLETE marker exists.

Layout (outside `artifacts/train/`: DVC cannot track a folder inside another stage output, and this one must
persist across `dvc repro`, which deletes a stage's other outputs before running it):

    artifacts/checkpoints/train/
        run.json                       fingerprint of everything that shapes the training, MLflow run id
        <plan stage>/checkpoint-<N>/   Trainer checkpoint (weights, optimizer, scheduler, RNG, trainer_state.json)
        <plan stage>/checkpoint-<N>/COMPLETE   written last, after every file of the checkpoint is on disk

transformers.Trainer writes a checkpoint straight into its folder, so a kill mid-save leaves a folder that
looks like a checkpoint; the marker is what tells them apart. `CompleteMarker` writes it in `on_save` (which
the Trainer calls after the checkpoint is fully written) and only then deletes older checkpoints, so there is
always one complete checkpoint to fall back to. The last step of every plan stage is checkpointed too: on a
rerun, a finished plan stage "resumes" from it, which loads its weights and loss history and trains nothing.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from pathlib import Path

log = logging.getLogger(__name__)

MARKER = "COMPLETE"
RUN_FILE = "run.json"
_STEP = re.compile(r"^checkpoint-(\d+)$")


def default_root(out_dir: Path) -> Path:
    """`artifacts/checkpoints/train` beside `artifacts/train`."""
    return Path(out_dir).parent / "checkpoints" / Path(out_dir).name


def complete_checkpoints(stage_dir: Path) -> list[Path]:
    """Complete checkpoints of one plan stage, oldest step first."""
    if not stage_dir.is_dir():
        return []
    found = []
    for child in stage_dir.iterdir():
        m = _STEP.match(child.name)
        if m and child.is_dir() and (child / MARKER).exists():
            found.append((int(m.group(1)), child))
    return [p for _, p in sorted(found)]


def last_complete(stage_dir: Path) -> Path | None:
    found = complete_checkpoints(stage_dir)
    return found[-1] if found else None


def step_of(checkpoint: Path) -> int:
    return int(_STEP.match(checkpoint.name).group(1))


def open_run(root: Path, fingerprint: dict, resumable: bool) -> dict:
    """Keep `root` when it holds checkpoints of the same training (same fingerprint), else empty it.

    Returns the run record (fingerprint, and the MLflow run id once tracking started).
    """
    run_file = root / RUN_FILE
    if resumable and run_file.exists():
        try:
            record = json.loads(run_file.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            record = {}
        if record.get("fingerprint") == fingerprint:
            stages = sorted(p.name for p in root.iterdir() if p.is_dir() and complete_checkpoints(p))
            log.info("checkpoints in %s match this training (plan stages with checkpoints: %s); resuming", root, stages or "none")
            return record
        log.info("checkpoints in %s come from other inputs or settings; starting over", root)
    if root.exists():
        shutil.rmtree(root)
    root.mkdir(parents=True)
    record = {"fingerprint": fingerprint}
    write_run(root, record)
    return record


def write_run(root: Path, record: dict) -> None:
    tmp = root / (RUN_FILE + ".tmp")
    tmp.write_text(json.dumps(record, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    os.replace(tmp, root / RUN_FILE)


def clear(root: Path) -> None:
    """Delete every checkpoint and the run record, keeping the (empty) folder: DVC expects the output to exist."""
    if not root.is_dir():
        return
    for child in root.iterdir():
        if child.is_dir():
            shutil.rmtree(child)
        else:
            child.unlink()


def _sync_tree(folder: Path) -> None:
    """fsync every file so the marker never names data still in the page cache (power loss, not just kill)."""
    for path in folder.rglob("*"):
        if path.is_file():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)


def mark_complete(checkpoint: Path) -> None:
    _sync_tree(checkpoint)
    marker = checkpoint / MARKER
    with open(marker, "w", encoding="utf-8") as f:
        f.write("complete\n")
        f.flush()
        os.fsync(f.fileno())


def prune(stage_dir: Path, keep: int) -> None:
    """Delete checkpoints without a marker (a save that was cut off) and all but the newest `keep` complete ones."""
    complete = complete_checkpoints(stage_dir)
    for old in complete[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    for child in stage_dir.iterdir():
        if _STEP.match(child.name) and child.is_dir() and not (child / MARKER).exists():
            shutil.rmtree(child, ignore_errors=True)


def marker_callback(keep: int):
    """A TrainerCallback that marks each saved checkpoint complete and forces a save at a stage's last step."""
    from transformers import TrainerCallback

    class CompleteMarker(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step >= state.max_steps:
                control.should_save = True
            return control

        def on_save(self, args, state, control, **kwargs):
            from accelerate import PartialState

            PartialState().wait_for_everyone()  # every process has written its part (its RNG state) of the checkpoint
            if state.is_world_process_zero:
                checkpoint = Path(args.output_dir) / f"checkpoint-{state.global_step}"
                mark_complete(checkpoint)
                prune(Path(args.output_dir), keep)
                log.info("checkpoint %s complete", checkpoint)
            return control

    return CompleteMarker()
