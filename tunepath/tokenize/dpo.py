"""Preference pairs for DPO: prompt, chosen and rejected rendered and tokenized with the same template as SFT.

Columns match what trl 1.15's `DataCollatorForPreference` reads (`prompt_ids`, `chosen_ids`, `rejected_ids`),
plus the rendered strings `prompt`, `chosen`, `rejected`. Caution: trl 1.15's `DPOTrainer` always re-tokenizes
the strings (`_prepare_dataset`), with special-token matching on; use the ids as they are (skip that step) to
keep the injection guard and the exact masks of this stage.
A chosen/rejected span is the assistant content and its end-of-turn token, as in SFT labels.
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

COLUMNS = ("prompt_ids", "chosen_ids", "rejected_ids", "prompt", "chosen", "rejected", "status", "length", "label_tokens")


def dpo_batch(batch: dict, plan: EncodePlan):
    encoder = encoder_for(plan)
    prompts = batch["prompt"]
    tools = batch.get("tools")
    chosen = encoder.encode([p + c for p, c in zip(prompts, batch["chosen"])], tools, with_text=True)
    rejected = encoder.encode([p + r for p, r in zip(prompts, batch["rejected"])], tools, with_text=True)
    out: dict[str, list] = {name: [] for name in COLUMNS}
    for c, r in zip(chosen, rejected):
        row = _pair(c, r, plan)
        for name in COLUMNS:
            out[name].append(row[name])
    return to_table(out)


def _pair(c, r, plan: EncodePlan) -> dict:
    empty = {"prompt_ids": [], "chosen_ids": [], "rejected_ids": [], "prompt": "", "chosen": "", "rejected": "", "length": 0, "label_tokens": 0}
    if c is None or r is None or c.input_ids[: c.prompt_len] != r.input_ids[: r.prompt_len]:
        return {**empty, "status": DROPPED_UNRENDERABLE}
    prompt_ids = c.input_ids[: c.prompt_len]
    chosen_ids = c.input_ids[c.prompt_len : c.prompt_len + c.answer_len]
    rejected_ids = r.input_ids[r.prompt_len : r.prompt_len + r.answer_len]
    length = len(prompt_ids) + max(len(chosen_ids), len(rejected_ids))
    status = KEPT
    if not chosen_ids or not rejected_ids:
        return {**empty, "length": length, "status": DROPPED_NO_LABELS}
    if length > plan.max_length:
        if plan.overlong == "drop":
            return {**empty, "length": length, "status": DROPPED_TOO_LONG}
        room = plan.max_length - len(prompt_ids)
        if room <= 0:
            return {**empty, "length": length, "status": DROPPED_NO_LABELS}
        # Keep the start, as trl's collator does with truncation_mode="keep_start".
        chosen_ids, rejected_ids, status = chosen_ids[:room], rejected_ids[:room], TRUNCATED
    return {
        "prompt_ids": prompt_ids,
        "chosen_ids": chosen_ids,
        "rejected_ids": rejected_ids,
        "prompt": c.prompt_text,
        "chosen": c.answer_text,
        "rejected": r.answer_text,
        "status": status,
        "length": length,
        "label_tokens": len(chosen_ids) + len(rejected_ids),
    }
