"""Log-likelihood scores on pre-tokenized rows: held-out loss and perplexity, and preference accuracy.

Rows are what the tokenize stage wrote (`input_ids`, `labels` with -100 on unscored tokens, optional
`position_ids` restarting per packed sample). Only label tokens are scored: assistant output for SFT, every
token for CPT.
"""

from __future__ import annotations

import math

from tunepath.collate import IGNORE_INDEX, PadCollator


def row_logprobs(model, rows, pad_id: int, batch_size: int, device: str = "cpu") -> list[tuple[float, int]]:
    """Per row: the summed log-probability of its label tokens and how many there are."""
    import torch
    import torch.nn.functional as F

    collate = PadCollator(pad_id)
    out: list[tuple[float, int]] = []
    model.eval()
    with torch.no_grad():
        for start in range(0, len(rows), batch_size):
            batch = {k: v.to(device) for k, v in collate(rows[start : start + batch_size]).items()}
            # use_cache=False: with a cache the model ignores packed/padded segment boundaries
            logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits
            labels = batch["labels"][:, 1:]
            nll = F.cross_entropy(
                logits[:, :-1].float().reshape(-1, logits.size(-1)), labels.reshape(-1), ignore_index=IGNORE_INDEX, reduction="none"
            ).view(labels.shape)
            counts = (labels != IGNORE_INDEX).sum(1)
            out += [(-float(s), int(c)) for s, c in zip(nll.sum(1).tolist(), counts.tolist())]
    return out


def mean_loss(scores: list[tuple[float, int]]) -> tuple[float, int]:
    """Token-weighted mean cross-entropy and the token count."""
    tokens = sum(c for _, c in scores)
    if tokens == 0:
        raise ValueError("held-out split has no label tokens to score; add eval data (validate.eval_share) or more records")
    return -sum(s for s, _ in scores) / tokens, tokens


def perplexity(loss: float) -> float:
    return math.exp(min(loss, 700.0))  # exp overflows past ~709: a broken model reads as huge, not as an error


def prompt_swapped_rows(rows, shift: int) -> list[dict]:
    """Each SFT row's answer (the tokens after its `prompt_ids`) after the prompt of the row `shift` places on
    (cyclically); shift 0 gives the row's own prompt. Only the answer is labelled, so every variant of a row scores
    the same tokens."""
    n = len(rows)
    out = []
    for i, row in enumerate(rows):
        start = len(row["prompt_ids"])
        prompt = list(rows[(i + shift) % n]["prompt_ids"])
        out.append({"input_ids": prompt + list(row["input_ids"][start:]), "labels": [IGNORE_INDEX] * len(prompt) + list(row["labels"][start:])})
    return out


def prompt_dependence(model, rows, pad_id: int, batch_size: int, device: str = "cpu", shifts: int = 3) -> list[float]:
    """Per SFT row with a prompt: how much its own prompt raises the reference answer's log-probability, in nats per
    answer token, against the prompts of the next `shifts` rows (a pointwise mutual information of question and
    answer). A model trained on shuffled answers learns to ignore the question and loses it; a briefly trained one
    keeps what its base had. Likelihoods of the same tokens, so it varies far less than scores of generated text."""
    rows = [r for r in rows if r.get("prompt_ids")]
    if len(rows) < 2:
        return []
    own = row_logprobs(model, prompt_swapped_rows(rows, 0), pad_id, batch_size, device)
    gaps = [0.0] * len(rows)
    steps = range(1, min(shifts, len(rows) - 1) + 1)
    for k in steps:
        other = row_logprobs(model, prompt_swapped_rows(rows, k), pad_id, batch_size, device)
        for i, ((lo, n), (lx, _)) in enumerate(zip(own, other)):
            gaps[i] += (lo - lx) / max(n, 1) / len(steps)
    return gaps


def preference_rows(pairs) -> list[dict]:
    """Two rows per pair, prompt + chosen and prompt + rejected, labels on the answer tokens only."""
    rows = []
    for pair in pairs:
        prompt = list(pair["prompt_ids"])
        for answer in (pair["chosen_ids"], pair["rejected_ids"]):
            answer = list(answer)
            rows.append({"input_ids": prompt + answer, "labels": [IGNORE_INDEX] * len(prompt) + answer})
    return rows


def preference_scores(model, pairs, pad_id: int, batch_size: int, device: str = "cpu") -> list[tuple]:
    """Per pair: (chosen log-prob, chosen tokens, rejected log-prob, rejected tokens), answers given the prompt."""
    flat = row_logprobs(model, preference_rows(pairs), pad_id, batch_size, device)
    return [(c[0], c[1], r[0], r[1]) for c, r in zip(flat[0::2], flat[1::2])]


def feedback_scores(model, examples, pad_id: int, batch_size: int, device: str = "cpu") -> list[tuple]:
    """Per held-out KTO example: (completion log-prob, completion tokens, desirable), the completion given its prompt."""
    rows = []
    for ex in examples:
        prompt, completion = list(ex["prompt_ids"]), list(ex["completion_ids"])
        rows.append({"input_ids": prompt + completion, "labels": [IGNORE_INDEX] * len(prompt) + completion})
    scored = row_logprobs(model, rows, pad_id, batch_size, device)
    return [(lp, n, bool(ex["label"])) for (lp, n), ex in zip(scored, examples)]


def preference_summary(base: list[tuple], tuned: list[tuple]) -> dict:
    """For both models: accuracy (summed log-prob of chosen above rejected, as DPO scores answers), the same per
    token (long chosen answers lose on sums), the mean margin; and the DPO-style reward accuracy of tuned over
    base: the tuned model raised the chosen answer's log-probability more than the rejected one's."""
    n = len(tuned)
    if n == 0:
        return {"pairs": 0}

    def acc(scores, per_token=False):
        return sum((c / max(cn, 1) > r / max(rn, 1)) if per_token else (c > r) for c, cn, r, rn in scores) / n

    reward = sum((t[0] - b[0]) > (t[2] - b[2]) for b, t in zip(base, tuned))
    return {
        "pairs": n,
        "base_accuracy": acc(base),
        "tuned_accuracy": acc(tuned),
        "base_accuracy_per_token": acc(base, True),
        "tuned_accuracy_per_token": acc(tuned, True),
        "base_margin": sum(c - r for c, _, r, _ in base) / n,
        "tuned_margin": sum(c - r for c, _, r, _ in tuned) / n,
        "reward_accuracy": reward / n,
    }
