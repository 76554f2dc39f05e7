"""Packing: best-fit decreasing, position ids, and the loss of a packed batch equal to the samples one by one."""

from __future__ import annotations

import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from test_tokenize_helpers import CONVERSATIONS, chatml_model, write_records  # noqa: F401

from tunepath.sections import ModelConfig
from tunepath.tokenize import TokenizeConfig
from tunepath.tokenize.packing import best_fit_decreasing, build_rows, take_rows


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(1, 64), max_size=60), st.integers(64, 100))
def test_best_fit_decreasing_places_every_sample_once_within_capacity(lengths, capacity):
    bins = best_fit_decreasing(lengths, capacity)
    assert sorted(i for b in bins for i in b) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in b) <= capacity for b in bins)
    # Best fit never leaves two bins that could have been one.
    loads = sorted(sum(lengths[i] for i in b) for b in bins)
    assert len(loads) < 2 or loads[0] + loads[1] > capacity


def test_best_fit_decreasing_refuses_oversized_samples():
    with pytest.raises(ValueError, match="longer than the row capacity"):
        best_fit_decreasing([3, 9], 8)


def test_take_rows_copies_only_the_span_of_its_rows():
    """pyarrow's take concatenates a chunked list column whole first (the memory-mapped split at 3M
    conversations: 11.6 GB); take_rows slices to the rows' span, with the same result."""
    import numpy as np
    import pyarrow.compute as pc

    chunks = [pa.array([[c * 1000 + r] * 50 for r in range(1000)], type=pa.list_(pa.int32())) for c in range(40)]
    table = pa.table({"input_ids": pa.chunked_array(chunks)})
    rows = np.array([20_010, 20_002, 20_500, 21_999])  # within two of the 40 chunks
    whole, span = pa.proxy_memory_pool(pa.default_memory_pool()), pa.proxy_memory_pool(pa.default_memory_pool())
    expected = pc.take(table, pa.array(rows), memory_pool=whole)
    taken = take_rows(table, rows, memory_pool=span)
    assert taken.to_pylist() == expected.to_pylist()
    assert [r[0] for r in taken["input_ids"].to_pylist()] == [20_010, 20_002, 20_500, 21_999]
    assert whole.max_memory() > table.nbytes * 0.9  # the reason for take_rows: a plain take copies the column
    assert span.max_memory() < table.nbytes / 10
    assert take_rows(table, np.array([], dtype=np.int64)).num_rows == 0
    del expected, taken  # before their pools: a proxy pool freed under live buffers crashes the interpreter


def test_rows_restart_position_ids_at_each_sample():
    table = pa.table({"input_ids": [[1, 2, 3], [4, 5], [6]], "labels": [[-100, 2, 3], [-100, 5], [-100]]})
    rows = build_rows(table, [[0, 2], [1]]).to_pylist()
    assert rows[0] == {"input_ids": [1, 2, 3, 6], "labels": [-100, 2, 3, -100], "position_ids": [0, 1, 2, 0]}
    assert rows[1] == {"input_ids": [4, 5], "labels": [-100, 5], "position_ids": [0, 1]}


def _conversations(n: int) -> list[list[dict]]:
    """Varied lengths: the fixture conversations with answers repeated a few times."""
    out = []
    for i in range(n):
        base = CONVERSATIONS[i % len(CONVERSATIONS)]
        out.append([{**m, "content": m["content"] * (1 + i % 3)} if m["role"] == "assistant" else m for m in base])
    return out


@pytest.fixture(scope="module")
def tokenized(chatml_model, tmp_path_factory):
    from datasets import load_from_disk

    from tunepath.tokenize import run_tokenize

    root = tmp_path_factory.mktemp("packing")
    validate = write_records(root / "validate", [{"kind": "conversation", "split": "train", "messages": m} for m in _conversations(12)])
    out = {}
    for pack in (True, False):
        cfg = TokenizeConfig(max_length=192, pack=pack, cache_dir=str(root / "cache"))
        run_tokenize(cfg, ModelConfig(base=str(chatml_model)), validate, root / f"out-{pack}")
        out[pack] = load_from_disk(str(root / f"out-{pack}" / "sft" / "train"))
    return out


def _model(path, use_cache: bool):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32, attn_implementation="sdpa").eval()
    model.config.use_cache = use_cache
    return model


def _batch(rows: list[dict], pad_id: int):
    """Right-padded as one more segment (position ids restarting at 0, labels -100), no attention mask."""
    import torch

    width = max(len(r["input_ids"]) for r in rows)
    def padded(r, key, fill):
        extra = width - len(r["input_ids"])
        return list(r[key]) + (list(range(extra)) if key == "position_ids" else [fill] * extra)
    return {
        key: torch.tensor([padded(r, key, fill) for r in rows])
        for key, fill in (("input_ids", pad_id), ("labels", -100), ("position_ids", 0))
    }


def test_packed_batch_loss_equals_samples_one_by_one(chatml_model, tokenized):
    import torch

    packed, single = tokenized[True], tokenized[False]
    assert len(packed) < len(single) and sum(len(r) for r in packed["input_ids"]) == sum(len(r) for r in single["input_ids"])
    model = _model(chatml_model, use_cache=False)
    with torch.no_grad():
        packed_loss = model(**_batch(list(packed), model.config.pad_token_id)).loss.item()
        total, count = 0.0, 0
        for row in single:
            n = sum(1 for x in row["labels"][1:] if x != -100)
            total += model(**_batch([row], model.config.pad_token_id)).loss.item() * n
            count += n
    assert packed_loss == pytest.approx(total / count, abs=1e-5)


def test_packed_samples_do_not_attend_to_each_other(chatml_model, tokenized):
    import torch

    row = next(r for r in tokenized[True] if r["position_ids"].count(0) >= 2)
    second = row["position_ids"].index(0, 1)
    alone = {"input_ids": row["input_ids"][second:], "labels": row["labels"][second:], "position_ids": row["position_ids"][second:]}
    with torch.no_grad():
        model = _model(chatml_model, use_cache=False)
        packed_logits = model(**_batch([row], 0)).logits[0, second:]
        alone_logits = model(**_batch([alone], 0)).logits[0]
        assert (packed_logits - alone_logits).abs().max().item() < 1e-4
        # transformers skips the block-diagonal mask when a cache object exists (use_cache=True, the Qwen2
        # default): training and evaluation on packed rows must switch the cache off.
        leaky = _model(chatml_model, use_cache=True)(**_batch([row], 0)).logits[0, second:]
        assert (leaky - alone_logits).abs().max().item() > 1e-3
