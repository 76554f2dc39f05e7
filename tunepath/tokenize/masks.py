"""Conversations to token ids and labels: -100 everywhere except the assistant's output and its end-of-turn token.

Control tokens come only from the template's markup (inserted by id); every text run, which holds the
message contents, is tokenized with special-token matching off, so `<|im_start|>` typed by a user stays text.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from tunepath.tokenize.layout import ChatRenderer, fill, filled_text, rendered_contents
from tunepath.tokenize.templates import TemplateError

log = logging.getLogger(__name__)

IGNORE_INDEX = -100


@dataclass
class EncodedChat:
    """One conversation, untruncated; `prompt_len` tokens precede the last assistant turn's learnt span."""

    input_ids: list[int]
    labels: list[int]
    prompt_len: int
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
        self._markup_ids: dict[str, list[int]] = {}

    def encode(self, conversations: list[list[dict]], with_text: bool = False) -> list[EncodedChat | None]:
        """One EncodedChat per conversation; None where the template cannot render it (logged).

        `with_text` adds the rendered prompt and last answer as strings (for preference pairs).
        """
        filled_all: list[tuple | None] = []
        pending: list[str] = []
        for messages in conversations:
            filled_all.append(self._fill(messages))
            if filled_all[-1] is not None:
                layout, filled = filled_all[-1]
                for part, value in zip(layout.parts, filled):
                    if part.token_id is None and not _is_markup(part) and value:
                        pending.append(value)
        for text in {p.pieces[0] for f in filled_all if f for p in f[0].parts if _is_markup(p)} - self._markup_ids.keys():
            self._markup_ids[text] = self.backend.encode(text, add_special_tokens=False).ids
        encoded = iter(e.ids for e in self.backend.encode_batch_fast(pending, add_special_tokens=False)) if pending else iter(())
        return [self._assemble(f, encoded, with_text) if f is not None else None for f in filled_all]

    def _fill(self, messages: list[dict]):
        roles = tuple(m["role"] for m in messages)
        try:
            layout = self.renderer.layout(roles, self.last_turn_only)
            rendered = self.renderer.render(messages)
        except Exception as e:  # jinja raises TemplateError, UndefinedError, TypeError...
            log.debug("conversation with roles %s cannot be rendered: %s", roles, e)
            return None
        contents = [m["content"] for m in messages]
        filled = fill(layout, contents)
        if filled_text(layout, filled) != rendered:
            # The template rewrites contents (strip, trim): take them as it writes them.
            contents = rendered_contents(self.renderer, layout, messages)
            filled = fill(layout, contents) if contents is not None else None
            if filled is None or filled_text(layout, filled) != rendered:
                log.debug("conversation with roles %s: the template's markup depends on the content", roles)
                return None
        return layout, filled

    def _assemble(self, layout_filled, encoded, with_text: bool) -> EncodedChat:
        layout, filled = layout_filled
        ids: list[int] = []
        labels: list[int] = []
        prompt_len = answer_end = 0
        for index, (part, value) in enumerate(zip(layout.parts, filled)):
            if index == layout.prompt_part:
                prompt_len = len(ids)
            if part.token_id is not None:
                piece = [part.token_id]
            elif not value:
                continue
            elif _is_markup(part):
                piece = self._markup_ids[value]
            else:
                piece = next(encoded)
            ids += piece
            labels += piece if part.labeled else [IGNORE_INDEX] * len(piece)
            if part.labeled and index >= layout.prompt_part:
                answer_end = len(ids)
        if layout.prompt_part >= len(layout.parts):
            prompt_len = len(ids)
        chat = EncodedChat(ids, labels, prompt_len, max(answer_end - prompt_len, 0))
        if with_text:
            texts = [part.text if part.token_id is not None else value for part, value in zip(layout.parts, filled)]
            last = max([i for i, p in enumerate(layout.parts) if p.labeled and i >= layout.prompt_part], default=layout.prompt_part - 1)
            chat.prompt_text = "".join(texts[: layout.prompt_part])
            chat.answer_text = "".join(texts[layout.prompt_part : last + 1])
        return chat


def _is_markup(part) -> bool:
    """A text run of template markup only (repeats across conversations: tokenized once and cached)."""
    return part.token_id is None and len(part.pieces) == 1 and isinstance(part.pieces[0], str)


def check_encoder(encoder: ChatEncoder) -> None:
    """Fail early on a template whose two-message layout cannot be built."""
    try:
        encoder.renderer.layout(("user", "assistant"), encoder.last_turn_only)
    except TemplateError:
        raise
    except Exception as e:
        raise TemplateError(f"the chat template cannot render a user/assistant exchange: {e}") from e
