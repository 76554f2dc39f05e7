"""The parity checks of the merge stage: logits, evaluated losses, chat template."""

from __future__ import annotations

from pathlib import Path

from tunepath.errors import StageError

GOLDEN = [
    {"role": "system", "content": "You are a helpful support agent."},
    {"role": "user", "content": "Where is my order #1234?"},
    {"role": "assistant", "content": "It ships tomorrow."},
    {"role": "user", "content": "我的退款什么时候到账？"},
    {"role": "assistant", "content": "退款将在3-5个工作日内到账。"},
]


class ParityError(StageError):
    """The merged model does not behave like base + adapter, or its tokenizer renders differently."""


def logits_of(model, rows, device: str = "cpu") -> list:
    import torch

    model.eval()
    with torch.no_grad():
        return [model(input_ids=torch.tensor([list(r["input_ids"])], device=device), use_cache=False).logits.float().cpu() for r in rows]


def relative_gap(a: list, b: list) -> float:
    """max |a - b| / max |b| over all compared logits."""
    worst = max(float((x - y).abs().max()) for x, y in zip(a, b))
    scale = max(float(y.abs().max()) for y in b)
    return worst / scale if scale else worst


def evaluated_gap(merged_scores: list[tuple[float, int]], evaluated: list[dict]) -> float:
    """Largest relative difference of a row's mean loss, merged vs evaluated (rows in the same order)."""
    worst = 0.0
    for (logprob, tokens), ref in zip(merged_scores, evaluated):
        if tokens != ref["tokens"]:
            raise ParityError(f"held-out row scored {tokens} tokens now but {ref['tokens']} at evaluation: the data changed; re-run evaluate")
        if tokens:
            mine, theirs = -logprob / tokens, -ref["logprob"] / ref["tokens"]
            worst = max(worst, abs(mine - theirs) / max(abs(theirs), 1e-8))
    return worst


def template_parity(tokenize_dir: Path, merged_dir: Path) -> dict:
    """The golden conversation encoded as training encoded it (the tokenize stage's encoder) vs rendered by the
    merged folder's tokenizer with `apply_chat_template`, as serving does; also the generation prompt."""
    from transformers import AutoTokenizer

    from tunepath.tokenize.masks import ChatEncoder

    tokenizer_dir = tokenize_dir / "tokenizer"
    template_file = tokenizer_dir / "chat_template.jinja"
    train_tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    template = template_file.read_text(encoding="utf-8") if template_file.exists() else train_tok.chat_template
    batch = ChatEncoder(train_tok, template).encode_batch([GOLDEN])
    row = len(batch.status) - 1
    encoded = batch.chat(row)
    if encoded is None:
        raise ParityError("the training chat template cannot render the golden conversation (system, user, assistant turns)")
    served = AutoTokenizer.from_pretrained(str(merged_dir))
    full = list(served.apply_chat_template(GOLDEN, tokenize=True, return_dict=False))
    prompt = list(served.apply_chat_template(GOLDEN[:-1], add_generation_prompt=True, tokenize=True, return_dict=False))
    # A turn rebuilt in the form the model generates it (R1's think block), or tokenized in two at the prompt's
    # end, is by design not the full render: its prompt is what must match.
    rebuilt = bool(batch.restored[row] or batch.split[row])
    equal = rebuilt or full == encoded.input_ids
    prompt_equal = prompt == encoded.input_ids[: encoded.prompt_len]
    return {"equal": equal and prompt_equal, "conversation_equal": equal, "prompt_equal": prompt_equal, "rebuilt_turn": rebuilt,
            "tokens": len(encoded.input_ids), "template_file": template_file.name if template_file.exists() else None}
