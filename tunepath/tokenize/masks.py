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
    answer_len: int  # tokens of the last learnt span (its content and end-of-turn token)
    prompt_text: str = ""
    answer_text: str = ""


@dataclass
class EncodedBatch:
    """Conversations of one batch, concatenated (numpy arrays): conversation i is ids[offsets[i]:offsets[i+1]]."""

    ids: object  # int32
    learnt: object  # bool: the label is the token itself, else -100
    offsets: object  # int64, one more than conversations
    prompt_lens: object  # int64
    answer_lens: object  # int64
    rendered: list[bool]  # False where the template cannot render the conversation (it then has no tokens)
    prompt_texts: list[str] | None = None
    answer_texts: list[str] | None = None

    def chat(self, i: int) -> EncodedChat | None:
        if not self.rendered[i]:
            return None
        a, b = int(self.offsets[i]), int(self.offsets[i + 1])
        ids = self.ids[a:b].tolist()
        labels = [t if m else IGNORE_INDEX for t, m in zip(ids, self.learnt[a:b].tolist())]
        texts = (self.prompt_texts[i], self.answer_texts[i]) if self.prompt_texts is not None else ("", "")
        return EncodedChat(ids, labels, int(self.prompt_lens[i]), int(self.answer_lens[i]), *texts)


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
        """One EncodedChat per conversation; None where the template cannot render it (logged)."""
        batch = self.encode_batch(conversations, with_text)
        return [batch.chat(i) for i in range(len(conversations))]

    def encode_batch(self, conversations: list[list[dict]], with_text: bool = False) -> EncodedBatch:
        """All conversations at once; `with_text` adds the rendered prompt and last answer (for preference pairs)."""
        import numpy as np

        prepared = [self._fill(messages) for messages in conversations]
        pending = [text for item in prepared if item is not None for part, text in zip(item[0].parts, item[1]) if part.kind == TEXT and text]
        encoded = iter([e.ids for e in self.backend.encode_batch_fast(pending, add_special_tokens=False)] if pending else [])

        flat: list[int] = []
        piece_lengths: list[int] = []
        piece_learnt: list[bool] = []
        offsets, prompt_lens, answer_lens = [0], [], []
        for item in prepared:
            start = prompt_end = answer_end = len(flat)
            if item is not None:
                layout, texts = item
                for index, (part, fixed, text) in enumerate(zip(layout.parts, self._fixed_ids(layout), texts)):
                    if index == layout.prompt_part:
                        prompt_end = len(flat)
                    piece = fixed if fixed is not None else next(encoded) if text else ()
                    flat += piece
                    piece_lengths.append(len(piece))
                    piece_learnt.append(part.labeled)
                    if part.labeled and index >= layout.prompt_part:
                        answer_end = len(flat)
                if layout.prompt_part >= len(layout.parts):
                    prompt_end = len(flat)
            offsets.append(len(flat))
            prompt_lens.append(prompt_end - start)
            answer_lens.append(max(answer_end - prompt_end, 0))
        batch = EncodedBatch(
            ids=np.array(flat, dtype=np.int32),
            learnt=np.repeat(np.array(piece_learnt, dtype=bool), piece_lengths),
            offsets=np.array(offsets, dtype=np.int64),
            prompt_lens=np.array(prompt_lens, dtype=np.int64),
            answer_lens=np.array(answer_lens, dtype=np.int64),
            rendered=[item is not None for item in prepared],
        )
        if with_text:
            batch.prompt_texts, batch.answer_texts = zip(*[_texts(item) for item in prepared]) if prepared else ((), ())
        return batch

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


def _texts(item) -> tuple[str, str]:
    """The rendered prompt of the last assistant turn and that turn's learnt text."""
    if item is None:
        return "", ""
    layout, texts = item
    cut = layout.prompt_part
    last = max([i for i, p in enumerate(layout.parts) if p.labeled and i >= cut], default=cut - 1)
    return "".join(texts[:cut]), "".join(texts[cut : last + 1])


def check_encoder(encoder: ChatEncoder) -> None:
    """Fail early on a template whose two-message layout cannot be built."""
    try:
        encoder.renderer.layout(("user", "assistant"), encoder.last_turn_only)
    except TemplateError:
        raise
    except Exception as e:
        raise TemplateError(f"the chat template cannot render a user/assistant exchange: {e}") from e
