"""Conversations to token ids and labels: -100 everywhere except the assistant's output and its end-of-turn token.

Control tokens come only from the template's markup (inserted by id); every text run, which holds the
message contents, is tokenized with special-token matching off, so `<|im_start|>` typed by a user stays text.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from tunepath.tokenize.layout import CONTROL, MARKUP, TEXT, ChatLayout, ChatRenderer, fill, rendered_contents
from tunepath.tokenize.templates import TemplateError

log = logging.getLogger(__name__)

IGNORE_INDEX = -100


@dataclass
class EncodedChat:
    """One conversation, untruncated; `prompt_len` tokens precede the last assistant turn's learnt span."""

    input_ids: list[int]
    labels: list[int]
    prompt_len: int
    label_count: int = 0  # tokens whose label is not -100
    answer_len: int = 0  # tokens of the last learnt span (its content and end-of-turn token)
    prompt_text: str = ""
    answer_text: str = ""


class ChatEncoder:
    """Encodes batches of conversations with one tokenizer and template."""

    def __init__(self, tokenizer, template: str, last_turn_only: bool = False) -> None:
        self.renderer = ChatRenderer(tokenizer, template)
        self.backend = tokenizer.backend_tokenizer
        # This encoder owns its tokenizer instance: switch special-token matching off for all text it encodes.
        self.backend.encode_special_tokens = True
        self.last_turn_only = last_turn_only
        self.eos_id = tokenizer.eos_token_id
        self._fixed: dict[int, list[list[int] | None]] = {}  # per layout: ids of its control and markup parts

    def encode(self, conversations: list[list[dict]], with_text: bool = False) -> list[EncodedChat | None]:
        """One EncodedChat per conversation; None where the template cannot render it (logged).

        `with_text` adds the rendered prompt and last answer as strings (for preference pairs).
        """
        prepared = [self._fill(messages) for messages in conversations]
        pending = [
            text
            for item in prepared
            if item is not None
            for part, text in zip(item[0].parts, item[1])
            if part.kind == TEXT and text
        ]
        encoded = iter([e.ids for e in self.backend.encode_batch_fast(pending, add_special_tokens=False)] if pending else [])
        return [self._assemble(item[0], item[1], encoded, with_text) if item is not None else None for item in prepared]

    def _fill(self, messages: list[dict]) -> tuple[ChatLayout, list[str]] | None:
        roles = tuple(m["role"] for m in messages)
        try:
            layout = self.renderer.layout(roles, self.last_turn_only)
            rendered = self.renderer.render(messages)
        except Exception as e:  # jinja raises TemplateError, UndefinedError, TypeError...
            log.debug("conversation with roles %s cannot be rendered: %s", roles, e)
            return None
        texts = fill(layout, [m["content"] for m in messages])
        if "".join(texts) != rendered:
            # The template rewrites contents (strip, trim): take them as it writes them.
            contents = rendered_contents(self.renderer, layout, messages)
            texts = fill(layout, contents) if contents is not None else None
            if texts is None or "".join(texts) != rendered:
                log.debug("conversation with roles %s: the template's markup depends on the content", roles)
                return None
        return layout, texts

    def _fixed_ids(self, layout: ChatLayout) -> list[list[int] | None]:
        key = id(layout)  # layouts live as long as the renderer's cache, which never evicts
        if key not in self._fixed:
            self._fixed[key] = [
                [p.token_id] if p.kind == CONTROL
                else self.backend.encode(p.text, add_special_tokens=False).ids if p.kind == MARKUP
                else None
                for p in layout.parts
            ]
        return self._fixed[key]

    def _assemble(self, layout: ChatLayout, texts: list[str], encoded, with_text: bool) -> EncodedChat:
        ids: list[int] = []
        labels: list[int] = []
        prompt_len = answer_end = label_count = 0
        prompt_part = layout.prompt_part
        for index, (part, fixed, text) in enumerate(zip(layout.parts, self._fixed_ids(layout), texts)):
            if index == prompt_part:
                prompt_len = len(ids)
            piece = fixed if fixed is not None else next(encoded) if text else []
            ids += piece
            if part.labeled:
                labels += piece
                label_count += len(piece)
                if index >= prompt_part:
                    answer_end = len(ids)
            else:
                labels += [IGNORE_INDEX] * len(piece)
        if prompt_part >= len(layout.parts):
            prompt_len = len(ids)
        chat = EncodedChat(ids, labels, prompt_len, label_count, max(answer_end - prompt_len, 0))
        if with_text:
            last = max([i for i, p in enumerate(layout.parts) if p.labeled and i >= prompt_part], default=prompt_part - 1)
            chat.prompt_text = "".join(texts[:prompt_part])
            chat.answer_text = "".join(texts[prompt_part : last + 1])
        return chat


def check_encoder(encoder: ChatEncoder) -> None:
    """Fail early on a template whose two-message layout cannot be built."""
    try:
        encoder.renderer.layout(("user", "assistant"), encoder.last_turn_only)
    except TemplateError:
        raise
    except Exception as e:
        raise TemplateError(f"the chat template cannot render a user/assistant exchange: {e}") from e
