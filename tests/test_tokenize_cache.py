"""The tokenize cache's size bound: least recently used entries are evicted after a run, never the run's own."""

from __future__ import annotations

import logging
import os
import time

from test_tokenize_helpers import CONVERSATIONS, chatml_model, write_records  # noqa: F401

from tunepath.sections import ModelConfig
from tunepath.tokenize import TokenizeConfig, run_tokenize
from tunepath.tokenize import cache


def _entry(root, name: str, size: int, age_s: float):
    path = root / name
    path.mkdir(parents=True)
    (path / "data.arrow").write_bytes(b"x" * size)
    used = time.time() - age_s
    os.utime(path, (used, used))
    return path


def test_least_recently_used_go_first_down_to_the_bound(tmp_path):
    hour = 3600
    oldest = _entry(tmp_path, "a" * 32, 1000, 5 * hour)
    old = _entry(tmp_path / "finished", "b" * 32, 1000, 4 * hour)
    mine = _entry(tmp_path, "c" * 32, 1000, 3 * hour)  # this run's: kept however old
    newer = _entry(tmp_path / "records", "d" * 32, 1000, 2 * hour)
    recent = _entry(tmp_path, "e" * 32, 1000, 60)  # used a minute ago, by a run beside this one: kept
    (tmp_path / "splits").mkdir()
    (tmp_path / "splits" / "index.json").write_text("[]")  # not an entry
    result = cache.evict(tmp_path, 2500, keep={mine})
    assert (result.entries, result.size, result.evicted, result.freed) == (5, 5000, 3, 3000)
    assert not oldest.exists() and not old.exists() and not newer.exists()
    assert mine.exists() and recent.exists() and (tmp_path / "splits" / "index.json").exists()
    assert not result.kept_over
    assert not list(tmp_path.rglob("*.evicted-*"))  # moved aside, then deleted whole


def test_kept_entries_past_the_bound_are_said(tmp_path, caplog):
    mine = _entry(tmp_path, "a" * 32, 4000, 10 * 3600)
    with caplog.at_level(logging.INFO, logger="tunepath.tokenize.cache"):
        result = cache.bound(tmp_path, 1e-6, keep={mine})  # about 1 KB
    assert mine.exists() and result.kept_over and result.evicted == 0
    assert "stays over tokenize.cache_max_gb" in caplog.text


def test_hard_links_count_once(tmp_path):
    entry = _entry(tmp_path, "a" * 32, 1000, 10 * 3600)
    os.link(entry / "data.arrow", entry / "copy.arrow")
    assert cache.evict(tmp_path, 10_000, keep=set()).size == 1000


def test_a_run_evicts_the_entries_of_older_settings_and_keeps_its_own(chatml_model, tmp_path, caplog):
    records = [{"kind": "conversation", "split": "eval" if i % 5 == 0 else "train", "messages": m}
               for i, m in enumerate(CONVERSATIONS * 6)]
    validate = write_records(tmp_path / "v", records)
    model = ModelConfig(base=str(chatml_model))
    root = tmp_path / "cache"
    cfg = TokenizeConfig(max_length=64, cache_dir=str(root), cache_max_gb=None)
    run_tokenize(cfg, model, validate, tmp_path / "out")
    first = set(cache.entries(root))
    assert first
    past = time.time() - 2 * cache.GRACE_S
    for path in first:
        os.utime(path, (past, past))
    bounded = cfg.model_copy(update={"max_length": 96, "cache_max_gb": 1e-6})  # new token ids: new entries
    with caplog.at_level(logging.INFO):
        run_tokenize(bounded, model, validate, tmp_path / "out")
    left = set(cache.entries(root))
    assert first.isdisjoint(left) and left  # the older settings' entries went, this run's stayed
    assert "least recently used first" in caplog.text and f"evicted {len(first)} of" in caplog.text
    again = run_tokenize(bounded, model, validate, tmp_path / "out")
    assert again["cached"]  # what the run kept serves its rerun
    back = run_tokenize(cfg, model, validate, tmp_path / "out-2")
    assert not back["cached"]  # the evicted settings tokenize again, without an error


def test_an_unreadable_map_output_is_named_dropped_and_mapped_again(chatml_model, tmp_path, caplog):
    """A truncated Arrow file in the cache (a disk that filled, a copy cut short): the rerun says which file,
    removes its entry, maps that shard again and writes the same rows as before."""
    import json

    from datasets import load_from_disk

    records = [{"kind": "conversation", "split": "eval" if i % 5 == 0 else "train", "messages": m}
               for i, m in enumerate(CONVERSATIONS * 6)]
    validate = write_records(tmp_path / "v", records)
    model = ModelConfig(base=str(chatml_model))
    root = tmp_path / "cache"
    cfg = TokenizeConfig(max_length=64, cache_dir=str(root), cache_max_gb=None)
    run_tokenize(cfg, model, validate, tmp_path / "out")
    before = load_from_disk(str(tmp_path / "out" / "sft" / "train"))["input_ids"]
    entry = next(p for p in cache.entries(root) if (p / "files.json").exists())
    broken = entry / json.loads((entry / "files.json").read_text())[0]
    broken.write_bytes(broken.read_bytes()[:14])
    import shutil

    shutil.rmtree(root / "finished")  # the packed outputs' cache: without it the rerun packs from the map outputs
    with caplog.at_level(logging.WARNING, logger="tunepath.tokenize.stage"):
        result = run_tokenize(cfg, model, validate, tmp_path / "out-2")  # a fresh output folder: built from the cache
    assert str(broken) in caplog.text and "mapping its shard again" in caplog.text
    assert not result["cached"]
    assert load_from_disk(str(tmp_path / "out-2" / "sft" / "train"))["input_ids"] == before
    assert run_tokenize(cfg, model, validate, tmp_path / "out-3")["cached"]  # the entry written again serves the next run
