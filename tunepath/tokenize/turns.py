"""Training samples of a conversation, each rendered exactly as the model sees it at the turn it teaches.

For every learnt assistant turn i, the template renders two texts from the real messages:

- the prompt P_i = render(history_i, add_generation_prompt=True): what the model is given at inference;
- the turn text S_i = render(history_i + [turn i]), where turn i is the last message.

The learnt span of turn i runs from the end of P_i to the end-of-turn token that closes it in S_i. History is
rendered as the template renders history (earlier reasoning dropped unless `keep_history_reasoning`).

Turns then share samples where they can: when S_i is a prefix of S_j, turn i is learnt inside S_j. A
prefix-stable template (ChatML, Llama-3, Mistral, Gemma, Phi) gives one sample per conversation; a template
that renders earlier turns differently from the last one (R1 and Qwen3 drop earlier reasoning) gives one sample
per assistant turn, each as the model sees it at that turn.

Reasoning (`reasoning` on a canonical assistant message) is learnt in the form the template generates it. A
template that strips it from the final turn too (DeepSeek-R1's drops everything up to `</think>`), or whose
generation prompt opens a `<think>` block that its rendered turn lacks, gets the turn put back together from
its own pieces: header + `<think>\\n{reasoning}\\n</think>\\n\\n` + the rest of the turn. An answer with no
reasoning after a generation prompt that opens a block gets an empty block (Qwen3's non-thinking form).

A template whose full render moves history text (Mistral v0.3 shows the system prompt only when a user message
is last) gets the generation prompt followed by the turn as the template renders it: what the model is given
and what it should answer, at that turn.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from tunepath.tokenize.render import EMPTY_THINK, THINK_OPEN, THINK_CLOSE, ChatRenderer

# Why a conversation yields no sample (kept in stats.json with an example line).
UNRENDERABLE = "unrenderable"  # the template raised (a role it refuses, an order it forbids)
HISTORY_MISMATCH = "history_mismatch"  # the generation prompt is not a prefix of the turn, even rebuilt
REASONING_LOST = "reasoning_lost"  # the template drops the turn's reasoning and it cannot be put back
TOOLS_UNSUPPORTED = "tools_unsupported"  # the record declares tools the template does not render


class SampleError(ValueError):
    """A conversation this template cannot turn into samples; `reason` is one of the codes above."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass
class Sample:
    """One training sample: its text, learnt character spans, and the prompt of its last learnt turn."""

    text: str
    spans: list[tuple[int, int]] = field(default_factory=list)
    prompt_end: int = 0  # text[:prompt_end] is the generation prompt of the last learnt turn
    restored: bool = False  # a learnt turn was rebuilt (the template's own render of it differs)
    history: list[dict] = field(default_factory=list)  # template messages before the last learnt turn
    turn: dict | None = None  # that turn, as the template reads it


class TurnBuilder:
    """Builds the samples of conversations for one renderer."""

    def __init__(self, renderer: ChatRenderer, end_of_turn: str | None, added: set[str],
                 last_turn_only: bool = False, keep_history_reasoning: bool = False) -> None:
        self.renderer = renderer
        self.end_of_turn = end_of_turn
        self.added = added
        self.last_turn_only = last_turn_only
        self.keep_history_reasoning = keep_history_reasoning
        self._ignores_tools: bool | None = None
        self._simple: bool | None = None
        self.generation = ""  # a simple template's generation prompt: the assistant turn's header

    def samples(self, messages: list[dict], tools: list | None = None, exact: bool = False) -> list[Sample]:
        """The samples of one canonical conversation (raises SampleError); `exact` takes the renders of every turn
        even for a simple template (content holding control-token text could imitate its markup)."""
        messages = [split_reasoning(m) for m in messages]
        learnt = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
        if self.last_turn_only:
            learnt = learnt[-1:]
        if tools and self.ignores_tools():
            raise SampleError(TOOLS_UNSUPPORTED, "the chat template does not render the declared tools")
        history_form = [self.renderer.message(m, self.keep_history_reasoning) for m in messages]
        if not exact and self.simple and not tools and learnt and learnt[-1] == len(messages) - 1:
            fast = self._one_render(messages, history_form, learnt)
            if fast is not None:
                return fast
        samples: list[Sample] = []
        for i in learnt:
            history = history_form[:i]
            turn = self.renderer.message(messages[i], True)
            text, prompt, restored = self._turn_text(history, turn, messages[i], tools)
            missing = [c["name"] for c in messages[i].get("tool_calls") or () if c["name"] not in text[len(prompt):]]
            if missing:
                raise SampleError(TOOLS_UNSUPPORTED, f"the chat template does not render the assistant's tool calls ({missing[0]})")
            span = (len(prompt), len(prompt) + self._learnt_end(text[len(prompt):]))
            last = samples[-1] if samples else None
            if last is not None and text.startswith(last.text):
                last.text, last.prompt_end = text, len(prompt)
                last.spans.append(span)
                last.restored |= restored
                last.history, last.turn = history, turn
            else:
                samples.append(Sample(text, [span], len(prompt), restored, history, turn))
        return samples

    @property
    def simple(self) -> bool:
        """The template renders every turn alike, last or not, and its generation prompt is the assistant turn's
        header (ChatML, Llama-3, Gemma, Phi): then one render gives every turn's prompt and span.

        Probed once, with placeholder contents, on the shapes data has (system or not, one or two exchanges);
        sampled rows are still checked against apply_chat_template (`parity_checks`).
        """
        if self._simple is None:
            self._simple = self._probe_simple()
        return self._simple

    def _probe_simple(self) -> bool:
        if not self.end_of_turn:
            return False
        try:
            user_only = [{"role": "user", "content": "\ue000q\ue001"}]
            self.generation = self.renderer.render(user_only, True)[len(self.renderer.render(user_only)):]
        except Exception:
            return False
        if not self.generation:
            return False
        shapes = [("user", "assistant"), ("system", "user", "assistant"), ("user", "assistant") * 2,
                  ("system", "user", "assistant", "user", "assistant")]
        tried = 0
        for shape in shapes:
            messages = [{"role": role, "content": f"\ue000{k}\ue001"} for k, role in enumerate(shape)]
            try:
                full = self.renderer.render(messages)
                for i, m in enumerate(messages):
                    if m["role"] != "assistant":
                        continue
                    prompt = self.renderer.render(messages[:i], True)
                    turn = self.renderer.render(messages[: i + 1])
                    if not (full.startswith(turn) and turn.startswith(prompt + m["content"]) and prompt.endswith(self.generation)):
                        return False
            except Exception:
                continue  # a shape the template refuses (Gemma-2's system role): such rows are counted when met
            tried += 1
        return tried > 0

    def _one_render(self, messages, history_form, learnt) -> list[Sample] | None:
        """The single sample of a conversation in a simple template, from one render; None to take the exact path."""
        if any(m.get("reasoning") or m.get("tool_calls") for m in messages):
            return None
        text = self._render(history_form, False, None)
        spans, cursor, start = [], 0, 0
        for i in learnt:
            content = messages[i].get("content") or ""
            if not content:
                return None
            start = text.find(content, cursor)
            if start < len(self.generation) or text[start - len(self.generation) : start] != self.generation:
                return None
            end = text.find(self.end_of_turn, start + len(content))
            if end < 0:
                return None
            cursor = end + len(self.end_of_turn)
            spans.append((start, cursor))
        return [Sample(text, spans, start, False, history_form[: learnt[-1]], history_form[learnt[-1]])]

    def _render(self, messages: list[dict], generation: bool, tools) -> str:
        try:
            return self.renderer.render(messages, generation, tools)
        except Exception as e:  # jinja raises TemplateError, UndefinedError, TypeError...
            raise SampleError(UNRENDERABLE, f"the chat template raised: {e}") from e

    def _turn_text(self, history, turn, message, tools) -> tuple[str, str, bool]:
        prompt = self._render(history, True, tools)
        text = self._render([*history, turn], False, tools)
        reasoning = message.get("reasoning")
        completion = text[len(prompt):] if text.startswith(prompt) else None
        if completion is not None and (not reasoning or reasoning in completion):
            return text, prompt, False
        rebuilt = self._rebuild(history, message, prompt, tools)
        if rebuilt is None and (not reasoning or (completion is None and reasoning in text)):
            rebuilt = self._align(history, prompt, text, turn)
        if rebuilt is None:
            if completion is not None:
                raise SampleError(REASONING_LOST, "the chat template drops the reasoning of the final assistant turn")
            raise SampleError(
                HISTORY_MISMATCH,
                "the generation prompt is not a prefix of the rendered assistant turn: "
                f"prompt ends {prompt[-40:]!r}, turn reads {text[len(prompt) - 40 : len(prompt) + 20]!r}",
            )
        return rebuilt, prompt, True

    def _rebuild(self, history, message, prompt: str, tools) -> str | None:
        """The turn as the model generates it after `prompt`: header, reasoning block, answer, end of turn."""
        before = self._render(history, False, tools)
        plain = self._render([*history, self.renderer.message(message, False)], False, tools)
        if not (prompt.startswith(before) and plain.startswith(before)):
            return None
        generation, turn = prompt[len(before):], plain[len(before):]
        header = self._header(generation, turn)
        reasoning = message.get("reasoning")
        opens_block = generation[len(header):].startswith(THINK_OPEN.rstrip("\n"))
        if reasoning:
            block = THINK_OPEN + reasoning + THINK_CLOSE
        elif opens_block:
            block = EMPTY_THINK
        else:
            return None
        rebuilt = before + header + block + turn[len(header):]
        return rebuilt if rebuilt.startswith(prompt) else None

    def _align(self, history, prompt: str, text: str, turn: dict) -> str | None:
        """The generation prompt followed by the turn as the template renders it, for templates whose full render
        differs from the prompt before the turn (Mistral v0.3 puts the system prompt into the last user message
        only, so the full conversation renders without it): the turn starts in `text` right after the markup
        that closes the last history message, as it does in `prompt`."""
        last = next((m.get("content") for m in reversed(history) if m.get("content")), None)
        content = (turn.get("content") or "").strip()  # templates may trim it
        last = (last or "").strip()
        if not last or last not in prompt:
            return None
        closing = prompt[prompt.rfind(last):]  # the last message's content and the markup after it
        limit = text.rfind(content) if content else len(text)
        at = text.rfind(closing, 0, limit + len(closing) if limit >= 0 else len(text))
        if at < 0:
            return None
        completion = text[at + len(closing):]
        return prompt + completion if content in completion else None

    def _header(self, generation: str, turn: str) -> str:
        """The common start of the generation prompt and the rendered turn, cut back to a whole control token."""
        n = 0
        for a, b in zip(generation, turn):
            if a != b:
                break
            n += 1
        common = generation[:n]
        ends = [common.rfind(t) + len(t) for t in self.added if t and t in common]
        return common[: max(ends)] if ends and n < len(generation) else common

    def _learnt_end(self, completion: str) -> int:
        """Where the learnt part of a turn's completion ends: after its end-of-turn token (the last one: content
        cannot hold a real one), or at the end when the template closes turns without a control token."""
        if self.end_of_turn:
            at = completion.rfind(self.end_of_turn)
            if at >= 0:
                return at + len(self.end_of_turn)
        return len(completion)

    def ignores_tools(self) -> bool:
        """True when declaring a tool does not change the render: the template has no tool support."""
        if self._ignores_tools is None:
            probe = [{"role": "user", "content": "hi"}]
            tool = [{"type": "function", "function": {"name": "probe_tool", "description": "d", "parameters": {"type": "object", "properties": {}}}}]
            try:
                self._ignores_tools = self.renderer.render(probe, True, tool) == self.renderer.render(probe, True, None)
            except Exception:
                self._ignores_tools = True
        return self._ignores_tools


def split_reasoning(message: dict) -> dict:
    """An assistant message whose content opens with a `<think>...</think>` block, as its reasoning and answer
    (records validate wrote before it split them; the reasoning must reach the turn's learnt span)."""
    content = message.get("content") or ""
    if "<think>" not in content or message.get("role") != "assistant" or message.get("reasoning") or not content.lstrip().startswith("<think>"):
        return message
    head, sep, answer = content.partition("</think>")
    if not sep:
        return message
    return {**message, "reasoning": head.lstrip()[len("<think>"):].strip(), "content": answer.strip()}


def find_end_of_turn(renderer: ChatRenderer, added) -> str | None:
    """The control token that closes an assistant turn in this template (None when turns end in plain text).

    Rendered once with placeholder contents: the first added token after the assistant's content.
    """
    marker = "\ue000answer\ue001"
    text = renderer.render([{"role": "user", "content": "\ue000question\ue001"}, {"role": "assistant", "content": marker}])
    at = text.find(marker)
    if at < 0:
        return None
    tail = text[at + len(marker):]
    match = added.search(tail) if added is not None else None
    return match.group() if match else None
