"""The loss curve and learning rate as a PNG (artifacts/train/loss.png): for `dvc plots` (an image plot needs no
JavaScript from a CDN, so `dvc plots show` renders offline), the Prefect run page and the MLflow run.

matplotlib's object API (a `Figure` with no pyplot) draws it: no GUI backend, no global state in the process.
"""

from __future__ import annotations

import logging
from pathlib import Path

log = logging.getLogger(__name__)


def write_loss_plot(steps: list[dict], path: Path, title: str = "training") -> Path | None:
    """Loss (top) and learning rate (bottom) against the step across plan stages, one colour per stage;
    None (and no file) when no step was logged."""
    if not steps:
        return None
    try:
        from matplotlib.figure import Figure
    except ImportError:  # a training machine with only the training libraries: the run stands without its picture
        log.warning("%s not written: matplotlib is not installed here (pip install matplotlib)", path.name)
        return None

    fig = Figure(figsize=(7.5, 4.8), dpi=100, layout="constrained")
    loss_ax, lr_ax = fig.subplots(2, 1, sharex=True, height_ratios=(3, 1.4))
    stages: dict[str, list[dict]] = {}
    for s in steps:
        stages.setdefault(s["stage"], []).append(s)
    for stage, rows in stages.items():
        x = [r.get("global_step", r["step"]) for r in rows]
        loss_ax.plot(x, [r["loss"] for r in rows], marker="." if len(rows) < 40 else None, linewidth=1.4, label=stage)
        lr_ax.plot(x, [r.get("learning_rate", 0.0) for r in rows], linewidth=1.2)
    first, last = steps[0]["loss"], steps[-1]["loss"]
    loss_ax.set_title(f"{title}: loss {first:.3f} -> {last:.3f} over {len(steps)} logged steps", fontsize=10)
    loss_ax.set_ylabel("loss")
    loss_ax.grid(alpha=0.3)
    if len(stages) > 1:
        loss_ax.legend(title="plan stage", fontsize=8)
    lr_ax.set_ylabel("learning rate")
    lr_ax.set_xlabel("step")
    lr_ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))
    lr_ax.grid(alpha=0.3)
    path.parent.mkdir(parents=True, exist_ok=True)
    # no timestamps in the file: the same curve gives the same bytes, so DVC sees no change where there is none
    fig.savefig(path, format="png", metadata={"Software": None})
    return path
