"""Load the base model's tokenizer as its files define it.

transformers 5 builds some tokenizers from their class rather than from tokenizer.json: a folder whose
tokenizer_config.json names `LlamaTokenizerFast` gets Llama's Metaspace pre-tokenizer even when its
tokenizer.json says byte-level BPE (DeepSeek-R1-Distill-Qwen without its config.json), and every id changes
silently. When the loaded tokenizer gives other ids than tokenizer.json itself on a probe text (spaces,
newlines, digits, code, Chinese), it is loaded again through the generic class, which keeps tokenizer.json
as it is, and the log says so. Rebuilt pipelines that give the same ids (Qwen2's) are kept.
"""

from __future__ import annotations

import logging
from pathlib import Path

log = logging.getLogger(__name__)



def load_tokenizer(base: str, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(base, trust_remote_code=trust_remote_code)
    except OSError as e:
        raise FileNotFoundError(f"model.base {base!r}: cannot load its tokenizer: {e}") from e
    file = Path(base) / "tokenizer.json"
    if not (tokenizer.is_fast and file.is_file()):
        return tokenizer
    from tokenizers import Tokenizer

    try:
        published = Tokenizer.from_file(str(file))
    except Exception as e:  # the Rust side raises its own exception type
        raise ValueError(f"{file}: not a tokenizer file ({e})") from e
    ours = tokenizer.backend_tokenizer.encode(PROBE, add_special_tokens=False).ids
    theirs = published.encode(PROBE, add_special_tokens=False).ids
    if ours == theirs:
        return tokenizer
    from transformers import PreTrainedTokenizerFast

    log.warning(
        "model.base %s: transformers built its tokenizer as %s, whose ids differ from its tokenizer.json's; "
        "loading tokenizer.json as it is instead (the ids the model was trained with)", base, type(tokenizer).__name__,
    )
    generic = PreTrainedTokenizerFast.from_pretrained(base)
    if generic.backend_tokenizer.encode(PROBE, add_special_tokens=False).ids != theirs:
        raise ValueError(f"model.base {base!r}: transformers cannot load its tokenizer.json as it is")
    return generic


PROBE = "Hello world!  Two  spaces,\n\nnew lines\tand tabs; 12345 + 3.14 = x_y(z) {'a': [1, 2]}\n 你好，世界。 Ünïcödé — émoji 🙂"
