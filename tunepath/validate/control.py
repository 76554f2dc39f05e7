"""Which strings count as chat-template control text: the base model's own added tokens.

Read from the model folder's tokenizer files with the standard library (no tokenizer is loaded): every added
token of `tokenizer.json` and `tokenizer_config.json`, special or not (R1's `<｜User｜>`, Qwen's `<tool_call>`
and `<think>`, Phi-3's `</s>`), but those made of whitespace alone (Gemma's indentation runs are text).
"""

from __future__ import annotations

import json
from pathlib import Path


def tokenizer_control_strings(model_dir: str | Path | None) -> list[str] | None:
    """The added tokens' texts of the tokenizer in `model_dir`, longest first; None when it has no tokenizer files."""
    if model_dir is None:
        return None
    folder = Path(model_dir)
    found: set[str] = set()
    seen_file = False
    for name, read in (("tokenizer.json", _from_tokenizer_json), ("tokenizer_config.json", _from_config)):
        path = folder / name
        if not path.is_file():
            continue
        seen_file = True
        try:
            found |= read(json.loads(path.read_text(encoding="utf-8")))
        except (ValueError, OSError) as e:
            raise ValueError(f"{path}: cannot read its added tokens ({e})") from e
    if not seen_file:
        return None
    return sorted((t for t in found if t.replace("\u2581", " ").strip()), key=lambda t: (-len(t), t))


def _from_tokenizer_json(data: dict) -> set[str]:
    return {t.get("content", "") for t in data.get("added_tokens") or ()}


def _from_config(data: dict) -> set[str]:
    tokens = {t.get("content", "") for t in (data.get("added_tokens_decoder") or {}).values()}
    for key in ("bos_token", "eos_token", "unk_token", "pad_token"):
        value = data.get(key)
        tokens.add(value.get("content", "") if isinstance(value, dict) else value or "")
    return tokens
