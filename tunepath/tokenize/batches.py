"""The functions `datasets.map(batched=True, num_proc=...)` runs: records in, token ids and a status per record out.

They receive an `EncodePlan` (small and picklable) and load the tokenizer once per worker process.
Dropped records stay in the output with empty ids and their status, so the stage can count them.
"""

from __future__ import annotations

from dataclasses import dataclass

from tunepath.tokenize.masks import DROPPED_NO_LABELS, DROPPED_TOO_LONG, IGNORE_INDEX, KEPT, REASON_CODES, TRUNCATED

DROPPED_UNRENDERABLE = REASON_CODES["unrenderable"]
STATUS_NAMES = {
    TRUNCATED: "truncated",
    DROPPED_TOO_LONG: "dropped_too_long",
    DROPPED_NO_LABELS: "dropped_no_labels",
    **{code: f"dropped_{reason}" for reason, code in REASON_CODES.items()},
}


@dataclass(frozen=True)
class EncodePlan:
    tokenizer_dir: str
    tokenizer_hash: str  # a new tokenizer or template under the same folder must not reuse a worker's old one
    template: str
    max_length: int
    overlong: str
    last_turn_only: bool
    trust_remote_code: bool = False
    keep_history_reasoning: bool = False
    template_kwargs: str = "{}"  # JSON: the plan stays hashable and picklable
    render_date: str = "2024-07-26"
    parity_checks: int = 0


_ENCODERS: dict = {}


def encoder_for(plan: EncodePlan, tokenizer=None):
    """The worker's encoder for `plan`, built once; `tokenizer` (already loaded from plan.tokenizer_dir) saves a reload.

    Forked map workers inherit the encoder the parent built, so they do not load the tokenizer again either.
    """
    from tunepath.tokenize.masks import ChatEncoder

    import datetime as dt
    import json

    if plan not in _ENCODERS:
        _ENCODERS.clear()
        if tokenizer is None:
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(plan.tokenizer_dir, trust_remote_code=plan.trust_remote_code)
        _ENCODERS[plan] = ChatEncoder(
            tokenizer, plan.template, plan.last_turn_only, plan.keep_history_reasoning, json.loads(plan.template_kwargs),
            dt.date.fromisoformat(plan.render_date), plan.parity_checks,
        )
    return _ENCODERS[plan]


def fit_lengths(encoded, max_length: int, overlong: str) -> dict:
    """Apply the length policy to a batch of samples (numpy, no per-token Python); a sample left with no learnt
    token is dropped, never trained on.

    The first label of every sample is -100: no token predicts it inside the sample, and in a packed row it
    would be predicted from the previous sample. Returns flat ids/labels and per-sample lengths, status, counts.
    """
    import numpy as np

    lengths = np.diff(encoded.offsets)
    n = len(lengths)
    owner = np.repeat(np.arange(n), lengths)
    position = np.arange(len(encoded.ids)) - encoded.offsets[:-1][owner]
    learnt = encoded.learnt & (position > 0)
    status = encoded.status.copy()
    kept = status == KEPT
    too_long = kept & (lengths > max_length)
    status[too_long] = DROPPED_TOO_LONG if overlong == "drop" else TRUNCATED
    keep_len = np.where(status <= TRUNCATED, np.minimum(lengths, max_length), 0)
    counts = np.bincount(owner[learnt & (position < keep_len[owner])], minlength=n)
    no_labels = (status <= TRUNCATED) & (counts == 0)
    status[no_labels] = DROPPED_NO_LABELS
    keep_len[no_labels] = 0
    keep = position < keep_len[owner]
    return {
        "ids": encoded.ids[keep],
        "labels": np.where(learnt, encoded.ids, IGNORE_INDEX)[keep],
        "keep_len": keep_len,
        "status": status,
        "length": lengths,
        "label_tokens": counts,
        "prompt": encoded.ids[position < np.where(status <= TRUNCATED, encoded.prompt_lens, 0)[owner]],
        "prompt_len": np.where(status <= TRUNCATED, encoded.prompt_lens, 0),
    }


def list_column(flat, lengths):
    """A list<int32> Arrow column from concatenated values and per-row lengths."""
    import numpy as np
    import pyarrow as pa

    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(np.asarray(flat, dtype=np.int32)))


def encode_records(batch: dict, indices: list[int], plan: EncodePlan):
    """The encoder's batch for canonical conversation records; a parity failure names the record."""
    from tunepath.tokenize.masks import ParityError

    encoder = encoder_for(plan)
    try:
        return encoder.encode_batch(batch["messages"], batch.get("tools"))
    except ParityError as e:
        raise ParityError(e.row, f"{_where(batch, e.row)}: {e}") from None


def _where(batch: dict, row: int) -> str:
    source = (batch.get("source") or [None] * (row + 1))[row] or {}
    return f"{source.get('file', '?')}, line {source.get('line', '?')}"


def sft_batch(batch: dict, indices: list[int], plan: EncodePlan, with_prompt: bool, offset: int = 0):
    """`offset`: the row of the batch's shard in its kind and split, so `record` counts over the whole split."""
    import numpy as np
    import pyarrow as pa

    encoded = encode_records(batch, indices, plan)
    fitted = fit_lengths(encoded, plan.max_length, plan.overlong)
    columns = {
        "input_ids": list_column(fitted["ids"], fitted["keep_len"]),
        "labels": list_column(fitted["labels"], fitted["keep_len"]),
        "status": pa.array(fitted["status"], type=pa.int32()),
        "length": pa.array(fitted["length"], type=pa.int32()),
        "label_tokens": pa.array(fitted["label_tokens"], type=pa.int32()),
        "record": pa.array(np.asarray(indices, dtype=np.int64)[encoded.owner] + offset, type=pa.int64()),
        "restored": pa.array(encoded.restored),
        "control_text": pa.array(encoded.control_text),
        "detail": pa.array(encoded.details, type=pa.string()),
    }
    if with_prompt:
        columns["prompt_ids"] = list_column(fitted["prompt"], fitted["prompt_len"])
    return pa.table(columns)


STRING_COLUMNS = ("prompt", "chosen", "rejected")


def to_table(columns: dict[str, list]):
    """A pyarrow Table from Python columns: `*ids` and `labels` as list<int32>, the rendered texts as strings, the
    rest (status, counts) as int32.

    Typed Arrow output saves datasets from inferring and converting millions of Python ints itself.
    """
    from itertools import accumulate, chain

    import pyarrow as pa

    arrays = {}
    for name, values in columns.items():
        if name.endswith("ids") or name == "labels":
            offsets = pa.array([0, *accumulate(map(len, values))], type=pa.int32())
            arrays[name] = pa.ListArray.from_arrays(offsets, pa.array(list(chain.from_iterable(values)), type=pa.int32()))
        else:
            arrays[name] = pa.array(values, type=pa.string() if name in STRING_COLUMNS else pa.int32())
    return pa.table(arrays)


def cpt_batch(batch: dict, plan: EncodePlan):
    encoder = encoder_for(plan)
    eos = encoder.eos_id
    # Added-token matching is off for documents: their text never becomes a control token.
    return to_table({"input_ids": [ids + [eos] for ids in encoder.text_encoder.encode_texts(batch["text"])]})
