"""The exported GGUF read back and compared with the merged folder it came from.

- The tokenizer data, read with llama.cpp's own reader (`gguf.GGUFReader`): every token by id, the added tokens'
  types (control or user-defined: llama.cpp matches those before splitting text), the merges, eos and the chat
  template.
- Plain text through transformers' GGUF tokenizer (vocabulary, merges, pre-tokenizer) gives the same ids. Its
  Qwen2 reader knows only ChatML's three special tokens, so rendered chats are not compared that way.
- The weights through transformers' GGUF loader (its own name mapping and q/k reordering): next-token logits on
  a rendered chat within a tolerance fitting the stored type.
"""

from __future__ import annotations

from pathlib import Path

PROBES = ["Hello, how are you?", "Where is my order #1234?", "你好，请问运费多少？", "  indented\n\ttabs and émojis 🚀"]
# Largest logit difference allowed, relative to the logits' spread, per stored type.
TOLERANCE = {"f32": 1e-4, "f16": 2e-2, "bf16": 5e-2, "q8_0": 1e-1}


def check_gguf(model_dir: Path, gguf_path: Path, dtype: str) -> dict:
    """Figures of the round trip; raises ValueError naming the first mismatch."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir, gguf_path = Path(model_dir), Path(gguf_path)
    source_tok = AutoTokenizer.from_pretrained(str(model_dir))
    gguf_tok = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    _check_vocabulary(source_tok, gguf_path)
    for text in PROBES:
        ours = source_tok(text, add_special_tokens=False)["input_ids"]
        theirs = gguf_tok(text, add_special_tokens=False)["input_ids"]
        if ours != theirs:
            raise ValueError(f"{gguf_path.name}: the GGUF tokenizer splits {text[:40]!r} differently ({ours[:8]} vs {theirs[:8]})")
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Where is my order?"}]
    prompt = source_tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=True) if source_tok.chat_template else PROBES[0]

    source = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    loaded = AutoModelForCausalLM.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name, dtype=torch.float32).eval()
    ids = torch.tensor([source_tok(prompt, add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        a, b = source(ids).logits[0], loaded(ids).logits[0]
    gap = float((a - b).abs().max() / (a.max() - a.min()).clamp_min(1e-6))
    if gap > TOLERANCE[dtype]:
        raise ValueError(f"{gguf_path.name}: logits differ from the merged model by {gap:.3g} of their range (allowed {TOLERANCE[dtype]} for {dtype})")
    return {"probes": len(PROBES), "logit_gap": round(gap, 6), "same_argmax": bool((a.argmax(-1) == b.argmax(-1)).all())}


def _check_vocabulary(tokenizer, gguf_path: Path) -> None:
    import gguf

    reader = gguf.GGUFReader(str(gguf_path))

    def field(name):
        f = reader.fields.get(name)
        return None if f is None else f.contents()

    tokens, types = field("tokenizer.ggml.tokens"), field("tokenizer.ggml.token_type")
    vocab = tokenizer.get_vocab()
    wrong = [t for t, i in vocab.items() if i >= len(tokens) or tokens[i] != t]
    if wrong:
        raise ValueError(f"{gguf_path.name}: token {wrong[0]!r} (id {vocab[wrong[0]]}) is not stored under its id")
    for i, added in tokenizer.added_tokens_decoder.items():
        expected = gguf.TokenType.CONTROL if added.special else gguf.TokenType.USER_DEFINED
        if types[i] != expected:
            raise ValueError(f"{gguf_path.name}: added token {added.content!r} has type {types[i]}, not {int(expected)}")
    if tokenizer.eos_token_id is not None and field("tokenizer.ggml.eos_token_id") != tokenizer.eos_token_id:
        raise ValueError(f"{gguf_path.name}: eos id {field('tokenizer.ggml.eos_token_id')} differs from the folder's {tokenizer.eos_token_id}")
    if (field("tokenizer.chat_template") or None) != (tokenizer.chat_template or None):
        raise ValueError(f"{gguf_path.name}: the chat template in the file differs from the model folder's")
