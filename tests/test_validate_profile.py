"""The data profile for the route stage, the light import of the package, and the output folder handling."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tunepath.validate import DataValidationError, ValidateConfig, run_validate
from tunepath.validate.profile import build_profile


def test_profile_counts_lengths_and_cjk_share():
    records = [
        {"kind": "conversation", "split": "train", "messages": [
            {"role": "user", "content": "你好吗"}, {"role": "assistant", "content": "good"}]},  # 3 CJK of 7 chars
        {"kind": "text", "split": "eval", "text": "abcdefghij"},
        {"kind": "text", "split": "train", "text": "Привет"},
        {"kind": "preference", "split": "train", "prompt": [{"role": "user", "content": "q"}],
         "chosen": [{"role": "assistant", "content": "yes"}], "rejected": [{"role": "assistant", "content": "no"}]},
    ]
    p = build_profile(records)
    assert (p["conversations"], p["turns"], p["assistant_turns"], p["documents"], p["preference_pairs"]) == (1, 2, 1, 2, 1)
    assert p["characters"] == {"conversation": 7, "text": 16, "preference": 6, "feedback": 0}
    assert p["cjk_share"] == round(3 / 29, 4)
    assert p["scripts"]["cyrillic"] == round(6 / 29, 4)
    assert p["lengths"]["text"] == {"min": 6, "mean": 8.0, "p50": 6, "p95": 10, "max": 10}
    assert p["splits"]["eval"] == {"conversation": 0, "text": 1, "preference": 0, "feedback": 0}


def test_importing_the_package_loads_neither_pandas_nor_gx():
    code = ("import sys, tunepath.validate; "
            "print([m for m in ('pandas', 'great_expectations', 'pyarrow') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_stale_outputs_are_removed_and_the_input_folder_is_protected(tmp_path):
    raw, out = tmp_path / "raw", tmp_path / "out"
    raw.mkdir()
    (raw / "docs.txt").write_text("A first document of the corpus.\n\nA second document of the corpus.\n")
    out.mkdir()
    (out / "stale.json").write_text("{}")
    summary = run_validate(ValidateConfig(), raw, out)
    assert summary["accepted"] == 2 and not (out / "stale.json").exists()
    assert sorted(p.name for p in out.iterdir()) == [
        "gx_results.json", "profile.json", "records", "rejects.jsonl", "report.json", "report.md"]
    assert json.loads((out / "report.json").read_text())["splits"] == {"train": 1, "eval": 1}  # min one eval per kind
    with pytest.raises(DataValidationError, match="contains the input data"):
        run_validate(ValidateConfig(), raw, tmp_path)
    assert (raw / "docs.txt").exists()
