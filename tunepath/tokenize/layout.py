"""Where a chat template puts markup, message contents and the assistant's learnt spans.

A conversation shape (its sequence of roles) is rendered once with placeholder contents: private-use
sentinels that no template alters. That placeholder render tells, without looking at any data:

- which characters are template markup and which are message content (content is later tokenized with
  special-token matching off, so data text can never become a control token);
- the learnt spans, from prefix renders: for the assistant message i, the span starts where
  render(messages[:i], add_generation_prompt=True) ends and runs to where render(messages[:i+1]) ends,
  cut after the first control token that follows the content (the end-of-turn token; what the template
  adds after it, like ChatML's newline, is markup the model never generates).

The layout is a list of parts: control tokens (an id) and text runs (markup strings and content slots) with
a learnt flag. A text run is tokenized as one string, so the ids equal the tokenizer's own ids for the same
text except at the learnt-span edges, where the split is forced to a token boundary.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from tunepath.tokenize.templates import TemplateError

_OPEN, _CLOSE = "\ue000", "\ue001"  # Unicode private use area: never rewritten by a template
_SENTINEL = re.compile(f"{_OPEN}(\\d+){_CLOSE}")


def _sentinel(index: int) -> str:
    return f"{_OPEN}{index}{_CLOSE}"


CONTROL, MARKUP, TEXT = 0, 1, 2


@dataclass(frozen=True)
class Part:
    """One piece of a rendered conversation: a control token, a markup-only text run, or a run holding contents."""

    labeled: bool
    kind: int = TEXT
    token_id: int | None = None  # CONTROL: the token the template emits
    text: str = ""  # CONTROL and MARKUP: the fixed text
    pieces: tuple[str | int, ...] = ()  # TEXT: markup strings and message indices, in order


@dataclass(frozen=True)
class ChatLayout:
    """How one conversation shape renders (see the module docstring)."""

    parts: tuple[Part, ...]
    prompt_part: int  # parts before this index are the prompt of the last assistant turn
    slots: tuple[tuple[int, int, int], ...]  # (start, end, message index) in the placeholder render
    placeholder: str


class ChatRenderer:
    """Renders conversations with one template and builds (and caches) their layouts."""

    def __init__(self, tokenizer, template: str) -> None:
        self.template = template
        # apply_chat_template passes the same variables: bos_token, eos_token, ...
        self.variables = dict(tokenizer.special_tokens_map)
        added = {tok.content: i for i, tok in tokenizer.added_tokens_decoder.items()}
        self.control_ids = added
        names = sorted(added, key=len, reverse=True)
        self._control = re.compile("|".join(re.escape(n) for n in names)) if names else None
        self._layouts: dict[tuple, ChatLayout] = {}
        try:
            from transformers.utils.chat_template_utils import _compile_jinja_template

            self._compiled = _compile_jinja_template(template)
            self._globals = {**self._compiled.globals, "tools": None, "documents": None, **self.variables}
        except ImportError:  # a transformers without the private helper: the public path, slower
            self._compiled = None

    def render(self, messages: list[dict], add_generation_prompt: bool = False) -> str:
        """The template's text for `messages`, exactly as `tokenizer.apply_chat_template(tokenize=False)` gives it."""
        if self._compiled is None:
            from transformers.utils.chat_template_utils import render_jinja_template

            rendered, _ = render_jinja_template(
                conversations=[messages], chat_template=self.template, add_generation_prompt=add_generation_prompt, **self.variables
            )
            return rendered[0]
        # The same compiled template and variables as transformers uses, minus its per-call setup (a third of the time).
        from jinja2.runtime import new_context

        compiled = self._compiled
        names = {**self._globals, "messages": messages, "add_generation_prompt": add_generation_prompt}
        context = new_context(compiled.environment, compiled.name, compiled.blocks, names, shared=True, globals=compiled.globals)
        return compiled.environment.concat(compiled.root_render_func(context))

    def layout(self, roles: tuple[str, ...], last_turn_only: bool) -> ChatLayout:
        key = (roles, last_turn_only)
        if key not in self._layouts:
            self._layouts[key] = self._build(roles, last_turn_only)
        return self._layouts[key]

    def _build(self, roles: tuple[str, ...], last_turn_only: bool) -> ChatLayout:
        placeholders = [{"role": role, "content": _sentinel(k)} for k, role in enumerate(roles)]
        full = self.render(placeholders)
        slots = self._slots(full, roles)
        controls = self._controls(full, slots)
        spans = self._learnt_spans(full, placeholders, slots, controls)
        prompt_start = spans[-1][0] if spans else len(full)
        if last_turn_only:
            spans = spans[-1:]
        parts, prompt_part = self._parts(full, slots, controls, spans, prompt_start)
        return ChatLayout(tuple(parts), prompt_part, tuple(slots), full)

    def _slots(self, full: str, roles: tuple[str, ...]) -> list[tuple[int, int, int]]:
        slots = [(m.start(), m.end(), int(m.group(1))) for m in _SENTINEL.finditer(full)]
        indices = [k for _, _, k in slots]
        if indices != sorted(set(indices)) or any(k >= len(roles) for k in indices):
            raise TemplateError(
                "the chat template renders a message content more than once or out of order; "
                "masks cannot be derived from it: use template chatml/llama2 or a custom template"
            )
        return slots

    def _controls(self, full: str, slots: list[tuple[int, int, int]]) -> list[tuple[int, int, int]]:
        """Control tokens inside the template's markup (never inside content slots)."""
        if self._control is None:
            return []
        found, start = [], 0
        for s, e, _ in [*slots, (len(full), len(full), -1)]:
            found += [(m.start() + start, m.end() + start, self.control_ids[m.group()]) for m in self._control.finditer(full[start:s])]
            start = e
        return found

    def _learnt_spans(self, full, placeholders, slots, controls) -> list[tuple[int, int]]:
        spans = []
        for i, message in enumerate(placeholders):
            if message["role"] != "assistant":
                continue
            prompt = self.render(placeholders[:i], add_generation_prompt=True)
            turn = self.render(placeholders[: i + 1])
            if not (turn.startswith(prompt) and full.startswith(turn)):
                raise TemplateError(
                    f"the chat template is not prefix-stable at assistant message {i}: rendering the first messages "
                    "does not give a prefix of the whole conversation, so the learnt span is undefined; "
                    "use template chatml/llama2 or a custom template"
                )
            start, end = len(prompt), len(turn)
            content_end = max([e for s, e, k in slots if k == i] + [start])
            after = [e for s, e, _ in controls if s >= content_end and e <= end]
            spans.append((start, after[0] if after else end))
        return spans

    def _parts(self, full, slots, controls, spans, prompt_start) -> tuple[list[Part], int]:
        cuts = {0, len(full), prompt_start}
        for s, e in spans:
            cuts |= {s, e}
        for s, e, _ in [*slots, *controls]:
            inside = [c for c in cuts if s < c < e]
            if inside:
                raise TemplateError("a learnt-span edge falls inside a message content or a control token; the template is not supported")
            cuts |= {s, e}
        control_at = {s: (e, tid) for s, e, tid in controls}
        slot_at = {s: (e, k) for s, e, k in slots}
        edges = sorted(cuts)
        parts: list[Part] = []
        prompt_part = None
        for a, b in zip(edges, edges[1:]):
            if a == prompt_start and prompt_part is None:
                prompt_part = len(parts)
            labeled = any(s <= a and b <= e for s, e in spans)
            if a in control_at:
                parts.append(Part(labeled, CONTROL, token_id=control_at[a][1], text=full[a:b]))
                continue
            piece = slot_at[a][1] if a in slot_at else full[a:b]
            last = parts[-1] if parts else None
            starts_here = a == prompt_start
            if last is not None and last.kind == TEXT and last.labeled == labeled and not starts_here:
                parts[-1] = Part(labeled, pieces=_merge(last.pieces, piece))
            else:
                parts.append(Part(labeled, pieces=(piece,)))
        if prompt_part is None:
            prompt_part = len(parts)
        # Runs of markup alone repeat in every conversation of this shape: mark them to tokenize them once.
        parts = [Part(p.labeled, MARKUP, text=p.pieces[0]) if p.kind == TEXT and all(isinstance(x, str) for x in p.pieces) else p for p in parts]
        return parts, prompt_part


def _merge(pieces: tuple[str | int, ...], piece: str | int) -> tuple[str | int, ...]:
    if isinstance(piece, str) and pieces and isinstance(pieces[-1], str):
        return (*pieces[:-1], pieces[-1] + piece)
    return (*pieces, piece)


def fill(layout: ChatLayout, contents: list[str]) -> list[str]:
    """The text of every part with the contents in place; their concatenation is the rendered conversation."""
    return [
        "".join(p if isinstance(p, str) else contents[p] for p in part.pieces) if part.kind == TEXT else part.text
        for part in layout.parts
    ]


def rendered_contents(renderer: ChatRenderer, layout: ChatLayout, messages: list[dict]) -> list[str] | None:
    """Contents as the template writes them (some templates strip or trim them), or None when markup depends on content.

    Each message is rendered alone among placeholders; what lies between the markup before and after its slot
    is its rendered content.
    """
    contents = [m["content"] for m in messages]
    placeholders = [{"role": m["role"], "content": _sentinel(k)} for k, m in enumerate(messages)]
    full = layout.placeholder
    for start, end, k in layout.slots:
        probe = list(placeholders)
        probe[k] = messages[k]
        text = renderer.render(probe)
        before, after = full[:start], full[end:]
        if not (text.startswith(before) and text.endswith(after) and len(text) >= len(before) + len(after)):
            return None
        contents[k] = text[len(before) : len(text) - len(after)]
    return contents
