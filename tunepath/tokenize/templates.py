"""Chat templates: the tokenizer's own, the built-ins (ChatML, Llama-2 chat) or a custom Jinja text.

The template chosen here is saved with the tokenized data (`tokenizer/chat_template.jinja`) and travels on to
the merged model, and its hash goes into the stage stats: training and inference render chats identically.
"""

from __future__ import annotations

import hashlib
import logging

log = logging.getLogger(__name__)

# OpenAI ChatML, as used by Qwen: every message is `<|im_start|>role\n...<|im_end|>\n`.
CHATML = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

# Llama-2 chat, as in the seed document:
#   <s>[INST] <<SYS>>\n{system}\n<</SYS>>\n\n{user} [/INST] {assistant} </s><s>[INST] {user} [/INST]
# `<s>`/`</s>` are the tokenizer's own BOS/EOS (a tokenizer without BOS starts each turn at `[INST]`). The
# prompt ends at `[/INST]`, so there is no separate generation prompt. Contents are inserted verbatim (Meta's
# template strips them; the validate stage already normalises whitespace).
LLAMA2 = (
    "{%- if messages and messages[0]['role'] == 'system' %}"
    "{%- set system = messages[0]['content'] %}{%- set turns = messages[1:] %}"
    "{%- else %}{%- set system = none %}{%- set turns = messages %}{%- endif %}"
    "{%- set bos = bos_token if bos_token is defined and bos_token else '' %}"
    "{%- for message in turns %}"
    "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{- raise_exception('llama2 template: after an optional system message, roles must alternate user/assistant/user/...') }}"
    "{%- endif %}"
    "{%- if message['role'] == 'user' %}"
    "{%- if loop.first and system is not none %}"
    "{{- bos + '[INST] <<SYS>>\\n' + system + '\\n<</SYS>>\\n\\n' + message['content'] + ' [/INST]' }}"
    "{%- else %}{{- bos + '[INST] ' + message['content'] + ' [/INST]' }}{%- endif %}"
    "{%- else %}{{- ' ' + message['content'] + ' ' + eos_token }}{%- endif %}"
    "{%- endfor %}"
)

BUILTIN = {"chatml": CHATML, "llama2": LLAMA2}


class TemplateError(ValueError):
    """The chat template cannot be used with this tokenizer (missing, not renderable, or unsafe)."""


def template_hash(template: str) -> str:
    """sha256 of the template text: the same hash means the same rendering at training and inference."""
    return hashlib.sha256(template.encode("utf-8")).hexdigest()


def select_template(source: str, custom_template: str | None, tokenizer, model_name: str) -> str:
    """The template text for `source` ("tokenizer", "chatml", "llama2" or "custom"), checked against the tokenizer."""
    if source == "tokenizer":
        template = tokenizer.chat_template
        if isinstance(template, dict):
            template = template.get("default")
        if not template:
            raise TemplateError(
                f"the tokenizer of {model_name!r} has no chat template; set tokenize.template to chatml or llama2, "
                "or to custom with tokenize.custom_template"
            )
    elif source == "custom":
        template = custom_template or ""
    elif source in BUILTIN:
        template = BUILTIN[source]
    else:
        raise TemplateError(f"tokenize.template: unknown template {source!r}; use tokenizer, chatml, llama2 or custom")
    _check_control_tokens(source, tokenizer, model_name)
    _check_renders(template, tokenizer, source)
    return template


def _check_control_tokens(source: str, tokenizer, model_name: str) -> None:
    vocab = tokenizer.get_vocab()
    if source == "chatml":
        missing = [t for t in ("<|im_start|>", "<|im_end|>") if t not in vocab]
        if missing:
            # Without them the markup is ordinary text, and a message could forge it: no injection guard.
            raise TemplateError(
                f"tokenize.template chatml needs the tokens {missing} in the tokenizer of {model_name!r}; "
                "add them as special tokens, or use template: llama2 or a custom template"
            )
    if source == "llama2":
        if tokenizer.eos_token is None:
            raise TemplateError(f"tokenize.template llama2 ends each answer with EOS, but the tokenizer of {model_name!r} has none")
        if tokenizer.bos_token is None:
            log.warning("tokenizer of %s has no BOS token: llama2 turns start at [INST] without <s>", model_name)


def _check_renders(template: str, tokenizer, source: str) -> None:
    probe = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    try:
        tokenizer.apply_chat_template(probe, chat_template=template, tokenize=False)
    except Exception as e:  # jinja raises several unrelated exception types
        raise TemplateError(
            f"the {source} chat template cannot render a user/assistant exchange ({e}); set tokenize.template to chatml "
            "or llama2, or to custom with tokenize.custom_template"
        ) from e
