"""The functions `datasets.map(batched=True, num_proc=...)` runs: records in, token ids and a status per record out.

They receive an `EncodePlan` (small and picklable) and load the tokenizer once per worker process.
Dropped records stay in the output with empty ids and their status, so the stage can count them.
"""

from __future__ import annotations

from dataclasses import dataclass

from tunepath.tokenize.masks import IGNORE_INDEX

KEPT, TRUNCATED, DROPPED_TOO_LONG, DROPPED_NO_LABELS, DROPPED_UNRENDERABLE = 0, 1, 2, 3, 4
STATUS_NAMES = {
    TRUNCATED: "truncated",
    DROPPED_TOO_LONG: "dropped_too_long",
    DROPPED_NO_LABELS: "dropped_no_labels",
    DROPPED_UNRENDERABLE: "dropped_unrenderable",
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


_ENCODERS: dict = {}


def encoder_for(plan: EncodePlan):
    from transformers import AutoTokenizer

    from tunepath.tokenize.masks import ChatEncoder

    key = (plan.tokenizer_dir, plan.tokenizer_hash, plan.template, plan.last_turn_only)
    if key not in _ENCODERS:
        _ENCODERS.clear()
        tokenizer = AutoTokenizer.from_pretrained(plan.tokenizer_dir, trust_remote_code=plan.trust_remote_code)
        _ENCODERS[key] = ChatEncoder(tokenizer, plan.template, plan.last_turn_only)
    return _ENCODERS[key]


def fit_length(chat, max_length: int, overlong: str) -> tuple[list[int], list[int], int, int]:
    """Apply the length policy: (input_ids, labels, learnt tokens, status); a sample left with no learnt token is
    dropped, never trained on.

    The first label is always -100: no token predicts it inside the sample, and in a packed row it would be
    predicted from the previous sample.
    """
    ids, labels, count = chat.input_ids, chat.labels, chat.label_count
    if labels and labels[0] != IGNORE_INDEX:
        labels, count = [IGNORE_INDEX, *labels[1:]], count - 1
    status = KEPT
    if len(ids) > max_length:
        if overlong == "drop":
            return [], [], 0, DROPPED_TOO_LONG
        ids, labels, status = ids[:max_length], labels[:max_length], TRUNCATED
        count = sum(1 for x in labels if x != IGNORE_INDEX)
    if count == 0:
        return [], [], 0, DROPPED_NO_LABELS
    return ids, labels, count, status


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


def sft_batch(batch: dict, plan: EncodePlan, with_prompt: bool):
    encoder = encoder_for(plan)
    out: dict[str, list] = {"input_ids": [], "labels": [], "status": [], "length": [], "label_tokens": []}
    if with_prompt:
        out["prompt_ids"] = []
    for chat in encoder.encode(batch["messages"]):
        if chat is None:
            ids, labels, count, status, length = [], [], 0, DROPPED_UNRENDERABLE, 0
        else:
            length = len(chat.input_ids)
            ids, labels, count, status = fit_length(chat, plan.max_length, plan.overlong)
        out["input_ids"].append(ids)
        out["labels"].append(labels)
        out["status"].append(status)
        out["length"].append(length)
        out["label_tokens"].append(count)
        if with_prompt:
            out["prompt_ids"].append(chat.input_ids[: chat.prompt_len] if chat is not None and ids else [])
    return to_table(out)


def cpt_batch(batch: dict, plan: EncodePlan):
    encoder = encoder_for(plan)
    eos = encoder.eos_id
    # Special-token matching is off in this backend: document text never becomes a control token.
    encoded = encoder.backend.encode_batch_fast(batch["text"], add_special_tokens=False)
    return to_table({"input_ids": [e.ids + [eos] for e in encoded]})
