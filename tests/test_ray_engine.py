"""`data.engine: ray`: validate and tokenize on Ray actors give the bytes the local pools give.

The slow test runs both stages twice on the same input (some thousand chats with bad rows and duplicates,
cut into many chunks and shards): with the local process pools and on a local Ray instance of 2 CPUs. Every
output file must be the same, timings aside. The fast tests need no Ray: an address where nothing listens
fails at once with one line naming it.
"""

from __future__ import annotations

import json
import random
import shutil
import socket
import time
from pathlib import Path

import pytest
from test_tokenize_helpers import chatml_model  # noqa: F401

from tunepath.errors import StageError
from tunepath.sections import DataConfig, ModelConfig
from tunepath.validate import LengthBounds, ValidateConfig, run_validate
from tunepath.validate import parts, stream


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("form", ["127.0.0.1:{port}", "ray://127.0.0.1:{port}"])
def test_an_address_where_nothing_listens_fails_at_once_naming_it(tmp_path, form):
    address = form.format(port=_free_port())
    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / "a.jsonl").write_text(json.dumps({"messages": [{"role": "user", "content": "hi there"},
                                                          {"role": "assistant", "content": "hello to you"}]}) + "\n")
    clock = time.monotonic()
    with pytest.raises(StageError) as caught:
        run_validate(ValidateConfig(), raw, tmp_path / "out", data=DataConfig(engine="ray", ray_address=address, num_proc=1))
    assert time.monotonic() - clock < 30
    message = str(caught.value)
    assert "\n" not in message and f"data.ray_address {address!r}" in message and "nothing answers" in message


def test_a_malformed_address_is_named():
    from tunepath.engine import _host_port

    with pytest.raises(StageError, match="data.ray_address 'ray://head:port'"):
        _host_port("ray://head:port")
    assert _host_port("ray://head") == ("head", 10001) and _host_port("head:6380") == ("head", 6380)
    assert _host_port("auto") is None


class _BusyHead:
    """What `ray` does against a head that aborts the first `aborts` Ray Client connections (its server for the
    client did not come up in time)."""

    def __init__(self, aborts: int) -> None:
        self.aborts, self.calls, self.shutdowns = aborts, 0, 0

    def init(self, **kwargs) -> None:
        self.calls += 1
        if self.calls <= self.aborts:
            raise ConnectionAbortedError("Initialization failure from server:\nTraceback ...")

    def shutdown(self) -> None:
        self.shutdowns += 1


def test_a_connection_the_head_aborts_is_tried_again_then_fails(monkeypatch):
    import tunepath.engine as engine

    monkeypatch.setattr("time.sleep", lambda s: None)
    head = _BusyHead(aborts=engine.CLIENT_ATTEMPTS - 1)
    engine._connect(head, "ray://head:10001", {})
    assert head.calls == engine.CLIENT_ATTEMPTS and head.shutdowns == engine.CLIENT_ATTEMPTS - 1
    with pytest.raises(ConnectionAbortedError):
        engine._connect(_BusyHead(aborts=engine.CLIENT_ATTEMPTS), "ray://head:10001", {})


def test_the_engine_is_a_checked_param():
    with pytest.raises(ValueError, match="engine"):
        DataConfig(engine="spark")


# -- the slow tier: a local Ray instance -------------------------------------------------------------------------


def _chat(rng: random.Random, i: int) -> dict:
    messages = [{"role": "system", "content": "Answer briefly."}] if i % 4 == 0 else []
    for turn in range(rng.randint(1, 3)):
        messages += [{"role": "user", "content": f"question {i}.{turn} " + "word " * rng.randint(1, 30)},
                     {"role": "assistant", "content": "answer " * rng.randint(2, 40)}]
    return {"messages": messages}


def _raw(root: Path) -> dict:
    """About 3,000 rows over three files; returns how many are bad and duplicated."""
    rng = random.Random(22)
    chats = [json.dumps(_chat(rng, i)) for i in range(2400)]
    bad = ['{"messages": [{"role": "user", "content": "cut', "[1, 2]", json.dumps({"messages": [{"role": "user", "content": "hi"}]}),
           json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": " "}]})]
    lines = []
    for i, chat in enumerate(chats):
        lines.append(chat)
        if i % 300 == 150:
            lines += bad  # bad rows in many chunks
        if i % 200 == 199:
            lines += chats[i - 150:i - 140]  # duplicates of rows a few chunks back
    (root / "a.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    (root / "b.jsonl").write_text("\n".join(chats[1000:1040]) + "\n", encoding="utf-8")  # duplicates across files
    texts = [{"text": f"Document {i}. " + "A document about the data. " * rng.randint(5, 60)} for i in range(300)]
    (root / "c_docs.jsonl").write_text("\n".join(map(json.dumps, texts)) + "\n", encoding="utf-8")
    pairs = [{"prompt": f"pick {i}", "chosen": "the good answer here", "rejected": "a worse one"} for i in range(20)]
    (root / "d_pairs.jsonl").write_text("\n".join(map(json.dumps, pairs)) + "\n", encoding="utf-8")
    groups = sum(1 for i in range(2400) if i % 300 == 150)
    copies = 10 * sum(1 for i in range(2400) if i % 200 == 199) + 40
    # the two bad rows that parse repeat too: each group after the first also names their first place
    return {"rows": len(lines) + 40 + 300 + 20, "rejected": 4 * groups + copies, "duplicates": copies + 2 * (groups - 1)}


GX_STAMPS = {"id", "validation_id", "ge_load_time", "run_time", "validation_time"}  # GX's own, new on every run


def _unstamped(value):
    if isinstance(value, dict):
        return {k: _unstamped(v) for k, v in value.items() if k not in GX_STAMPS}
    return [_unstamped(v) for v in value] if isinstance(value, list) else value


def _files(folder: Path) -> dict[str, bytes]:
    """Every output file's bytes; the reports without their timings, GX's results without its run ids and times."""
    out = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        name = path.relative_to(folder).as_posix()
        data = path.read_bytes()
        if name == "gx_results.json":
            data = json.dumps(_unstamped(json.loads(data)), sort_keys=True).encode()
        if name in ("report.json", "stats.json"):
            report = json.loads(data)
            for key in ("timings_s", "cpu_s", "timings", "seconds"):
                report.pop(key, None)
            data = json.dumps(report, sort_keys=True).encode()
        if name == "report.md" and folder.name.startswith("tok"):
            data = b"\n".join(line for line in data.splitlines() if b"max_length" not in line)  # its line holds the seconds
        out[name] = data
    return out


def _ray_processes() -> list[str]:
    import psutil

    names = ("raylet", "gcs_server", "ray::", "default_worker", "plasma_store")
    return [p.name() for p in psutil.Process().children(recursive=True) if any(n in p.name() or n in " ".join(p.cmdline()) for n in names)]


@pytest.mark.slow
def test_validate_and_tokenize_on_ray_give_the_local_bytes(tmp_path, monkeypatch, chatml_model):  # noqa: F811
    pytest.importorskip("ray", reason="the ray extra is not installed: pip install -e '.[ray]'")
    from tunepath.tokenize import TokenizeConfig, run_tokenize
    from tunepath.tokenize import stage as tokenize_stage

    raw = tmp_path / "raw"
    raw.mkdir()
    expected = _raw(raw)
    monkeypatch.setattr(stream, "CHUNK_BYTES", 40_000)  # about 25 chunks
    monkeypatch.setattr(stream, "WORKER_BASE", 1)  # the memory rule would otherwise allow one worker for these chunks
    monkeypatch.setattr(stream, "WORKER_EXPANSION", 1)
    monkeypatch.setattr(parts, "SHARD_BYTES", 200_000)  # several records shards
    monkeypatch.setattr(tokenize_stage, "SHARD_BYTES", 150_000)  # several tokenize shards per split
    cfg = ValidateConfig(max_reject_share=0.5, eval_share=0.05, seed=3, text_chars=LengthBounds(min=20, max=20_000))
    # one cache folder, emptied between the runs: the folder is part of the settings the outputs' fingerprints hash
    tokenize = TokenizeConfig(max_length=128, batch_size=64, cache_dir=str(tmp_path / "cache"))
    model = ModelConfig(base=str(chatml_model))
    outputs = {}
    for engine in ("local", "ray"):
        data = DataConfig(engine=engine, num_proc=2)
        run_validate(cfg, raw, tmp_path / f"val-{engine}", data=data)
        shutil.rmtree(tmp_path / "cache", ignore_errors=True)
        run_tokenize(tokenize, model, tmp_path / f"val-{engine}", tmp_path / f"tok-{engine}", data=data)
        outputs[engine] = _files(tmp_path / f"val-{engine}"), _files(tmp_path / f"tok-{engine}")
        assert not _ray_processes(), "Ray processes outlived the stage"

    import ray

    assert not ray.is_initialized()
    report = json.loads((tmp_path / "val-ray" / "report.json").read_text())
    assert report["streaming"]["chunks"] > 10 and report["streaming"]["workers"] == 2
    assert len(report["streaming"]["records_shards"]) > 1
    totals = report["totals"]
    assert totals["read"] == totals["accepted"] + totals["rejected"] == expected["rows"]
    assert totals["rejected"] == expected["rejected"]
    rejects = (tmp_path / "val-ray" / "rejects.jsonl").read_text().splitlines()
    assert sum("duplicate:" in line for line in rejects) == expected["duplicates"]
    stats = json.loads((tmp_path / "tok-ray" / "stats.json").read_text())
    assert stats["labeled_examples"] > 1000 and stats["unlabeled_tokens"] > 0 and not stats["cached"]
    shards = [p for p in (tmp_path / "cache").glob("*/files.json")]
    assert len(shards) > 4  # the splits were mapped shard by shard, on the actors

    (local_validate, local_tokenize), (ray_validate, ray_tokenize) = outputs["local"], outputs["ray"]
    assert sorted(ray_validate) == sorted(local_validate) and sorted(ray_tokenize) == sorted(local_tokenize)
    for name in local_validate:
        assert ray_validate[name] == local_validate[name], f"validate/{name} differs between the engines"
    for name in local_tokenize:
        assert ray_tokenize[name] == local_tokenize[name], f"tokenize/{name} differs between the engines"


@pytest.mark.slow
def test_results_come_in_item_order_and_a_failed_item_raises_its_own_error():
    pytest.importorskip("ray", reason="the ray extra is not installed: pip install -e '.[ray]'")
    import ray

    from tunepath.engine import ray_session, run_ordered

    with ray_session(DataConfig(engine="ray", num_proc=2)) as session:
        assert list(run_ordered(session, int, [str(i) for i in range(25)], workers=2)) == list(range(25))
        with pytest.raises(ValueError, match="invalid literal for int"):  # the item's own exception, not Ray's wrapper
            list(run_ordered(session, int, ["1", "2", "x", "4", "5", "6"], workers=2))
    assert not ray.is_initialized() and not _ray_processes()
