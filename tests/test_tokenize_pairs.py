"""Preference pairs and feedback are written in windows of rows, as SFT rows are: the same outputs as one table."""

from __future__ import annotations

import json

from test_tokenize_helpers import chatml_model, write_records  # noqa: F401

from tunepath.sections import ModelConfig
from tunepath.tokenize import TokenizeConfig, run_tokenize
from tunepath.tokenize import stage as stage_module


def _records() -> list[dict]:
    out = []
    for i in range(23):
        prompt = [{"role": "user", "content": f"question {i} " + "word " * (i % 5)}]
        out.append({"kind": "preference", "split": "eval" if i % 7 == 0 else "train", "prompt": prompt,
                    "chosen": [{"role": "assistant", "content": f"a good answer {i}"}],
                    "rejected": [{"role": "assistant", "content": f"bad {i}"}]})
        out.append({"kind": "feedback", "split": "eval" if i % 7 == 0 else "train", "label": i % 3 != 0,
                    "messages": [*prompt, {"role": "assistant", "content": f"feedback answer {i}"}]})
    # too long for max_length: dropped, so the kept rows are not all rows
    out.append({"kind": "preference", "split": "train", "prompt": [{"role": "user", "content": "long " * 400}],
                "chosen": [{"role": "assistant", "content": "x"}], "rejected": [{"role": "assistant", "content": "y"}]})
    return out


def test_pairs_and_feedback_in_small_windows_equal_one_table(chatml_model, tmp_path, monkeypatch):
    from datasets import load_from_disk

    validate = write_records(tmp_path / "v", _records())
    model = ModelConfig(base=str(chatml_model))
    cfg = TokenizeConfig(max_length=96, overlong="drop", cache_dir=str(tmp_path / "cache-1"))
    whole = run_tokenize(cfg, model, validate, tmp_path / "whole")
    monkeypatch.setattr(stage_module, "SAVE_WINDOW_ROWS", 4)
    windows = run_tokenize(cfg.model_copy(update={"cache_dir": str(tmp_path / "cache-2")}), model, validate, tmp_path / "windows")
    assert whole["preference_pairs"] == windows["preference_pairs"] == 19  # 20 train pairs, one too long
    assert whole["feedback_examples"] == windows["feedback_examples"] == 19
    for folder in ("dpo", "kto"):
        for split in ("train", "eval"):
            a, b = load_from_disk(str(tmp_path / "whole" / folder / split)), load_from_disk(str(tmp_path / "windows" / folder / split))
            assert a.to_dict() == b.to_dict() and len(a)
    stats = [json.loads((tmp_path / name / "stats.json").read_text()) for name in ("whole", "windows")]
    for s in stats:
        s.pop("seconds"), s.pop("timings"), s.pop("fingerprint")
    assert stats[0] == stats[1]
    assert stats[0]["kto"]["train"]["desirable"] == sum(1 for i in range(23) if i % 7 and i % 3)
