"""Load every corpus entry with transformers and show what its template renders.

Run: python -m tests.corpus.templates.verify
"""

from __future__ import annotations

import tempfile
import pathlib

from tests.corpus.templates.load import ENTRIES, has_tokenizer, materialize

CHAT = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]


def _token_text(value: object) -> str | None:
    # tokenizer_config.json writes special tokens either as text or as an AddedToken dict.
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


def _template_only(folder: pathlib.Path) -> None:
    """Render the template with transformers' own renderer; there is no vocabulary to tokenize with."""
    import json

    from transformers.utils.chat_template_utils import render_jinja_template

    config = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
    template = config.get("chat_template")
    if template is None and (folder / "chat_template.jinja").is_file():
        template = (folder / "chat_template.jinja").read_text(encoding="utf-8")
    specials = {key: _token_text(config.get(key)) for key in ("bos_token", "eos_token")}
    # The renderer takes a batch and returns (rendered texts, generation indices).
    full = render_jinja_template([CHAT], chat_template=template, **specials)[0][0]
    prompt = render_jinja_template([CHAT[:1]], chat_template=template, add_generation_prompt=True, **specials)[0][0]
    print(f"  template only (no vocabulary stored); chat_template chars: {len(template)}")
    print(f"  chat:   {full!r}")
    print(f"  prompt: {prompt!r}")


def verify(name: str) -> bool:
    from transformers import AutoTokenizer

    print(f"== {name}")
    with tempfile.TemporaryDirectory() as tmp:
        folder = materialize(name, pathlib.Path(tmp) / name)
        if not has_tokenizer(name):
            _template_only(folder)
            return True
        tok = AutoTokenizer.from_pretrained(folder)
        print(f"  {type(tok).__name__} is_fast={tok.is_fast} vocab_size={tok.vocab_size} "
              f"len={len(tok)} added_tokens={len(tok.added_tokens_decoder)}")
        try:
            full = tok.apply_chat_template(CHAT, tokenize=False)
            prompt = tok.apply_chat_template(CHAT[:1], tokenize=False, add_generation_prompt=True)
        except Exception as err:  # a template may refuse a conversation shape
            print(f"  apply_chat_template raised {type(err).__name__}: {err}")
            return False
        ids = tok.apply_chat_template(CHAT, tokenize=True)
        ids = ids["input_ids"] if hasattr(ids, "keys") else ids
        print(f"  chat:   {full!r}")
        print(f"  prompt: {prompt!r}")
        print(f"  chat ids: {len(ids)} tokens, first {list(ids[:8])}")
    return True


def main() -> int:
    failed = [name for name in ENTRIES if not verify(name)]
    print(f"{len(ENTRIES) - len(failed)} of {len(ENTRIES)} entries verified" + (f"; failed: {failed}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
