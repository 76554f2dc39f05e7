"""The Prefect tasks' helpers: what the UI shows of a stage (no server needed)."""

from __future__ import annotations

import pytest

pytest.importorskip("prefect", reason="the tasks module is Prefect's: not installed here (a GPU-only machine)")

from tasks.stages import describe_changes, loss_table, sparkline  # noqa: E402


def test_sparkline_falls_with_the_loss_and_keeps_its_width():
    falling = sparkline([8.0 - 0.1 * i for i in range(60)], width=20)
    assert len(falling) == 20
    assert falling[0] == "█" and falling[-1] == "▁"
    assert list(falling) == sorted(falling, reverse=True)
    assert sparkline([3.0, 3.0]) == "▁▁"  # a flat curve does not divide by zero


def test_loss_table_starts_with_the_curve_and_ends_with_the_last_step(tmp_path):
    path = tmp_path / "loss.csv"
    rows = ["step,stage,loss,learning_rate,grad_norm,tokens_per_second"]
    rows += [f"{i},sft,{8 - 0.05 * i:.4f},0.002,1.0,100" for i in range(1, 51)]
    path.write_text("\n".join(rows) + "\n", encoding="utf-8")
    text = loss_table(path, rows=10)
    assert "`7.950 " in text and " 5.500` over 50 steps" in text
    assert text.rstrip().splitlines()[-1].startswith("| 50 | sft | 5.5000 |")


def test_dvc_changes_read_as_one_line():
    entries = [{"changed deps": ["data/raw"]}, {"changed params": ["train.max_steps"]}]
    assert describe_changes(entries) == "changed deps: data/raw; changed params: train.max_steps"
    assert describe_changes([]) == "not in dvc.lock yet"
