"""Generation samples: greedy answers to held-out prompts, rendered with the chat template and without it.

The templated prompt is the tokenize stage's `prompt_ids` (control tokens only from the template's markup, so a
user message containing `<|im_start|>system` stays text). The untemplated prompt is the last user message as
plain text, tokenized with added-token matching off (special or not): the seed's point is that a model tuned on a template
answers well only when it sees that template.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass

from tunepath.collate import IGNORE_INDEX

log = logging.getLogger(__name__)


@dataclass
class Prompt:
    id: str | None
    prompt: str
    reference: str
    templated_ids: list[int]
    raw_ids: list[int] | None


def is_degenerate(text: str, n: int) -> bool:
    """Empty, or looping: one n-gram of words, or of characters (CJK text, digit runs), 4+ times in a row."""
    if not text.strip():
        return True
    return _loops(text.split(), n) or _loops(list(text.replace(" ", "")), n)


def _loops(units: list[str], n: int) -> bool:
    for size in range(1, n + 1):
        for i in range(len(units) - 4 * size + 1):
            gram = units[i : i + size]
            if all(units[i + k * size : i + (k + 1) * size] == gram for k in range(1, 4)):
                if size > 1 or units[i : i + 8] == gram * 8:  # one unit counts from 8 in a row ("!!!!", "2000" are text)
                    return True
    return False


def end_of_turn_ids(rows, tokenizer) -> list[int]:
    """The token that ends an assistant turn: the last label of the SFT rows (the template's end-of-turn token,
    which the labels include), plus the tokenizer's EOS. A base model whose EOS is not the template's end-of-turn
    token (Qwen2.5 base: `<|endoftext|>` vs `<|im_end|>`) would otherwise never be seen to stop."""
    last = Counter(next((x for x in reversed(r["labels"]) if x != IGNORE_INDEX), None) for r in rows)
    last.pop(None, None)
    ids = [last.most_common(1)[0][0]] if last else []
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(tokenizer.eos_token_id)
    return ids


def conversation_prompts(rows, records: list[dict], tokenizer, limit: int) -> list[Prompt]:
    """The first `limit` (0: every) SFT eval rows with a prompt, each matched to its record for the plain-text variant.

    A row names its record (`record`, written by tokenize); rows of older tokenize outputs are matched to the
    next record whose last assistant answer starts like the row's answer.
    """
    out: list[Prompt] = []
    j = 0
    as_text = plain_text_encoder(tokenizer)
    for row in rows:
        if limit and len(out) >= limit:
            break
        prompt_ids = list(row.get("prompt_ids") or [])
        if not prompt_ids:
            continue
        reference = reference_text(row, tokenizer)
        index = row.get("record")
        if index is not None and 0 <= index < len(records):
            match = records[index]  # tokenize recorded which record the row came from
        else:
            match, j = _match(records, j, reference)
        if match is None:
            log.warning("held-out row %d has no matching record; its untemplated sample is skipped", len(out))
            out.append(Prompt(None, tokenizer.decode(prompt_ids), reference, prompt_ids, None))
            continue
        user = _user_before(match["messages"], reference)
        out.append(Prompt(match["id"], user, reference, prompt_ids, as_text(user + "\n")))
    return out


def plain_text_encoder(tokenizer):
    """Text to ids with no added token matched: `split_special_tokens` stops only the special ones, and a user
    message holding Qwen's `<tool_call>` or R1's `<think>` (added, not special) would still yield their ids."""
    from tunepath.tokenize.render import added_token_pattern, guarded_tokens

    guarded = guarded_tokens(tokenizer)
    pattern = added_token_pattern(guarded.values())
    if pattern is None:
        return lambda text: list(tokenizer(text, add_special_tokens=False)["input_ids"])
    from tunepath.tokenize.safe import TextOnlyEncoder

    encoder = TextOnlyEncoder(tokenizer, guarded, pattern)
    return lambda text: encoder.encode_texts([text])[0]


def reference_text(row, tokenizer) -> str:
    """The learnt answer after the generation prompt: label tokens only, special tokens dropped."""
    start = len(row["prompt_ids"])
    ids = [t for t, label in zip(row["input_ids"][start:], row["labels"][start:]) if label != IGNORE_INDEX]
    return tokenizer.decode(ids, skip_special_tokens=True).strip()


def _user_before(messages: list[dict], reference: str) -> str:
    """The user message the row's answer replies to: the one before the assistant turn it teaches (a template that
    rewrites history gives one row per turn), else the last one."""
    turns = [i for i, m in enumerate(messages) if m["role"] == "assistant" and (m.get("content") or "").strip()
             and (m.get("content") or "").strip() in reference]
    end = turns[-1] if turns else len(messages)
    return next((m["content"] for m in reversed(messages[:end]) if m["role"] == "user"), "")


def _match(records: list[dict], start: int, reference: str) -> tuple[dict | None, int]:
    head = reference[:40].rstrip("\ufffd").strip()  # a truncated answer may end inside a character
    for k in range(start, len(records)):
        msgs = records[k]["messages"]
        answer = next((m["content"] for m in reversed(msgs) if m["role"] == "assistant"), "")
        if answer.strip().startswith(head):
            return records[k], k + 1
    return None, start


def text_prompts(rows, tokenizer, limit: int, head: int = 32) -> list[Prompt]:
    """CPT only (no conversations held out): continue the first `head` tokens of each held-out block."""
    out = []
    for row in rows[: limit or None]:
        ids = list(row["input_ids"][:head])
        out.append(Prompt(None, tokenizer.decode(ids), tokenizer.decode(row["input_ids"][head : head * 2]), ids, None))
    return out


def generate_batch(model, prompts: list[list[int]], max_new_tokens: int, stop_ids: list[int], pad_id: int,
                   device: str = "cpu", batch_size: int = 8, do_sample: bool = False, temperature: float = 1.0,
                   seed: int = 0, what: str = "generate") -> list[tuple[list[int], bool]]:
    """Continuations of many prompts, `batch_size` at a time, left-padded so every prompt ends where generation starts.

    Returns per prompt the new ids (up to and including the stop token) and whether it ended on one of `stop_ids`.
    Greedy unless `do_sample`. Progress (prompts, ETA, new tokens/s) is shown as `what`.
    """
    import torch

    from tunepath.progress import Progress

    out: list[tuple[list[int], bool]] = []
    sampling = {"do_sample": True, "temperature": temperature} if do_sample else {"do_sample": False}
    if do_sample:
        torch.manual_seed(seed)
    # longest first: rows of a batch have similar lengths, so little padding is computed
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    results: dict[int, tuple[list[int], bool]] = {}
    with torch.no_grad(), Progress(len(prompts), what, unit="prompt", lines=4, logger=log) as progress:
        for start in range(0, len(order), batch_size):
            chunk = order[start : start + batch_size]
            width = max(len(prompts[i]) for i in chunk)
            ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
            mask = torch.zeros((len(chunk), width), dtype=torch.long)
            for row, i in enumerate(chunk):
                ids[row, width - len(prompts[i]) :] = torch.tensor(prompts[i])
                mask[row, width - len(prompts[i]) :] = 1
            generated = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), max_new_tokens=max_new_tokens,
                                       eos_token_id=stop_ids, pad_token_id=pad_id, **sampling)
            for row, i in enumerate(chunk):
                new = generated[row, width:].tolist()
                end = next((k for k, t in enumerate(new) if t in stop_ids), None)
                results[i] = (new[: end + 1], True) if end is not None else (new, False)
            progress.update(len(chunk), tokens=sum(len(results[i][0]) for i in chunk))
    out = [results[i] for i in range(len(prompts))]
    return out


def answer_prompts(model, tokenizer, prompts: list[Prompt], cfg, eot_ids: list[int], device: str = "cpu",
                   untemplated: int = 0, label: str = "model") -> list[dict]:
    """One answer per prompt: text, whether it stopped at the end-of-turn token, whether it is degenerate; the first
    `untemplated` prompts are also answered from the plain user text (no template). `label` names the model in
    the progress lines ('evaluate: tuned answers')."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eot_ids[0]
    run = lambda ids, what: generate_batch(model, ids, cfg.max_new_tokens, eot_ids, pad, device, cfg.generation_batch_size,  # noqa: E731
                                           cfg.do_sample, cfg.temperature, cfg.bootstrap_seed, what=what)
    answers = []
    for p, (ids, stopped) in zip(prompts, run([p.templated_ids for p in prompts], f"evaluate: {label} answers")):
        text = tokenizer.decode(ids, skip_special_tokens=True).strip()
        answers.append({"text": text, "stopped_at_eot": stopped, "degenerate": is_degenerate(text, cfg.repeat_ngram)})
    raw = [(k, p.raw_ids) for k, p in enumerate(prompts[:untemplated]) if p.raw_ids]
    for (k, _), (ids, _) in zip(raw, run([r for _, r in raw], f"evaluate: {label} answers without the template") if raw else []):
        answers[k]["untemplated"] = tokenizer.decode(ids, skip_special_tokens=True).strip()
    return answers


def sample_summary(answers: list[dict]) -> dict:
    n = len(answers)
    return {
        "samples": n,
        "degenerate_share": sum(a["degenerate"] for a in answers) / n if n else 0.0,
        "stopped_at_eot_share": sum(a["stopped_at_eot"] for a in answers) / n if n else 0.0,
    }
