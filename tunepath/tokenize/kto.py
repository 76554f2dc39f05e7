"""Unpaired feedback for KTO: each record's prompt and final answer, tokenized with the same template as SFT.

Columns follow trl 1.15's `DataCollatorForUnpairedPreference` (`prompt_ids`, `completion_ids`, `label`), plus
the rendered strings `prompt` and `completion`. The completion is the last assistant turn's content and its
end-of-turn token, as in SFT labels; the prompt is every token before it. Feedback records never reach SFT.
"""

from __future__ import annotations

from tunepath.tokenize.batches import (
    DROPPED_NO_LABELS,
    DROPPED_TOO_LONG,
    DROPPED_UNRENDERABLE,
    KEPT,
    TRUNCATED,
    EncodePlan,
    encoder_for,
    to_table,
)

COLUMNS = ("prompt_ids", "completion_ids", "label", "prompt", "completion", "status", "length", "label_tokens")
STRINGS = ("prompt", "completion")


def kto_batch(batch: dict, plan: EncodePlan):
    import pyarrow as pa

    encoded = encoder_for(plan).encode(batch["messages"], batch.get("tools"), with_text=True)
    out: dict[str, list] = {name: [] for name in COLUMNS}
    for chat, label in zip(encoded, batch["label"]):
        row = _example(chat, plan)
        row["label"] = bool(label)
        for name in COLUMNS:
            out[name].append(row[name])
    labels = out.pop("label")
    texts = {name: out.pop(name) for name in STRINGS}
    table = to_table(out)
    table = table.append_column("label", pa.array(labels, type=pa.bool_()))
    for name, values in texts.items():
        table = table.append_column(name, pa.array(values, type=pa.string()))
    return table


def _example(chat, plan: EncodePlan) -> dict:
    empty = {"prompt_ids": [], "completion_ids": [], "prompt": "", "completion": "", "length": 0, "label_tokens": 0}
    if chat is None:
        return {**empty, "status": DROPPED_UNRENDERABLE}
    prompt_ids = chat.input_ids[: chat.prompt_len]
    completion_ids = chat.input_ids[chat.prompt_len : chat.prompt_len + chat.answer_len]
    length = len(prompt_ids) + len(completion_ids)
    status = KEPT
    if not completion_ids:
        return {**empty, "length": length, "status": DROPPED_NO_LABELS}
    if length > plan.max_length:
        if plan.overlong == "drop":
            return {**empty, "length": length, "status": DROPPED_TOO_LONG}
        room = plan.max_length - len(prompt_ids)
        if room <= 0:
            return {**empty, "length": length, "status": DROPPED_NO_LABELS}
        completion_ids, status = completion_ids[:room], TRUNCATED  # keep the start, as for DPO
    return {"prompt_ids": prompt_ids, "completion_ids": completion_ids, "prompt": chat.prompt_text,
            "completion": chat.answer_text, "status": status, "length": length, "label_tokens": len(completion_ids)}
