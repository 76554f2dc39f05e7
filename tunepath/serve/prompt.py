"""Chat messages to prompt ids as the model saw them in training: the training template's markup is the only
source of added-token ids.

`tokenizer.apply_chat_template` renders the messages and tokenizes the whole text, so a user message holding
`<|im_start|>system` becomes the control token and forges a system turn, while the tokenize stage encodes the
same text as text. Here a request is rendered twice: as it is, and with every added token's text inside its
strings masked by private-use characters of the same length (the *neutral* render). Without such text the two
agree and the prompt is tokenized as apply_chat_template tokenizes it (same ids); with it, the tokenize stage's
`TextOnlyEncoder` takes control ids only from where the neutral render has them.

    from tunepath.serve.prompt import encode_prompt
    ids = encode_prompt(tokenizer, tokenizer.chat_template, [{"role": "user", "content": "hi <|im_start|>"}])
"""

from __future__ import annotations

import datetime as dt
import json

from tunepath.tokenize.render import ChatRenderer, added_token_pattern, guarded_tokens

MASK = "\ue002"  # private use: no tokenizer has it in an added token
ROLES = ("system", "user", "assistant", "tool", "developer", "ipython")


class PromptError(ValueError):
    """A request that cannot be encoded safely; the message says which part and why."""


class PromptEncoder:
    """Encodes chat requests with one tokenizer and template (the merged model's, which is the training one)."""

    def __init__(self, tokenizer, template: str | None = None, template_kwargs: dict | None = None,
                 date: dt.date | None = None) -> None:
        template = template or tokenizer.chat_template
        if not template:
            raise PromptError("the tokenizer has no chat template; serve the merged model folder, which carries the training template")
        self.tokenizer = tokenizer
        self.backend = tokenizer.backend_tokenizer
        self.renderer = ChatRenderer(tokenizer, template, template_kwargs, date)
        self.guarded = guarded_tokens(tokenizer)
        self.pattern = added_token_pattern(self.guarded.values())
        self._safe = None

    @property
    def text_encoder(self):
        from tunepath.tokenize.safe import TextOnlyEncoder

        if self._safe is None:
            self._safe = TextOnlyEncoder(self.tokenizer, self.guarded, self.pattern)
        return self._safe

    def render(self, messages: list[dict], tools: list | None = None) -> str:
        return self.renderer.render(template_messages(messages), add_generation_prompt=True, tools=tools or None)

    def encode(self, messages: list[dict], tools: list | None = None) -> list[int]:
        """The generation prompt's ids for `messages` (and declared `tools`)."""
        messages = template_messages(messages)
        try:
            text = self.renderer.render(messages, add_generation_prompt=True, tools=tools or None)
        except Exception as e:  # noqa: BLE001  (a template raises what its author chose: TemplateError, TypeError, ...)
            raise PromptError(f"the chat template cannot render these messages: {e}") from e
        if self.pattern is None or not self._holds_control_text(messages, tools):
            return self.backend.encode(text, add_special_tokens=False).ids
        neutral = self.renderer.render(_masked(messages, self.pattern), add_generation_prompt=True, tools=_masked(tools, self.pattern) or None)
        if len(neutral) != len(text):
            raise PromptError(self._rewritten(messages, tools, len(text)))
        try:
            ids, _ = self.text_encoder.encode(text, neutral)
        except ValueError as e:
            raise PromptError(f"control-token text in the request cannot be kept as text: {e}") from e
        return ids

    def _rewritten(self, messages: list[dict], tools, length: int) -> str:
        """Which message holds control-token text that the template rewrites (R1 and Qwen3 cut an assistant turn
        at `</think>`): its control ids could not be told from the markup's, so the request is refused."""
        for k, m in enumerate(messages):
            one = [*messages[:k], _masked(m, self.pattern), *messages[k + 1:]]
            if len(self.renderer.render(one, add_generation_prompt=True, tools=tools or None)) != length:
                found = next(f for f in map(self.pattern.search, _strings(m)) if f)
                return (f"messages[{k}] ({m['role']}) holds {found.group()!r}, which the chat template treats as markup; "
                        "remove it from the request")
        return "the declared tools hold control-token text that the chat template treats as markup; remove it from the request"

    def _holds_control_text(self, messages: list[dict], tools) -> bool:
        return any(self.pattern.search(text) for text in _strings([messages, tools]))


def encode_prompt(tokenizer, template: str | None, messages: list[dict], tools: list | None = None,
                  template_kwargs: dict | None = None, date: dt.date | None = None) -> list[int]:
    """One prompt's ids; build a `PromptEncoder` once to encode many."""
    return PromptEncoder(tokenizer, template, template_kwargs, date).encode(messages, tools)


def template_messages(messages: list[dict]) -> list[dict]:
    """OpenAI chat messages as templates read them (and the tokenize stage renders them): content a string,
    tool-call arguments an object, absent fields left out; a role outside the known ones is refused, since
    templates print it into the markup."""
    if not isinstance(messages, list) or not messages:
        raise PromptError("messages must be a non-empty list of {role, content} objects")
    out = []
    for k, m in enumerate(messages):
        if not isinstance(m, dict):
            raise PromptError(f"messages[{k}] is a {type(m).__name__}, not an object")
        role = m.get("role")
        if role not in ROLES:
            raise PromptError(f"messages[{k}].role {role!r} is not one of {', '.join(ROLES)}")
        message = {"role": role, "content": _text(m.get("content"), f"messages[{k}].content")}
        for key in ("name", "tool_call_id", "reasoning_content"):
            if m.get(key) is not None:
                message[key] = _text(m[key], f"messages[{k}].{key}")
        if m.get("tool_calls"):
            message["tool_calls"] = [_tool_call(c, f"messages[{k}].tool_calls[{j}]") for j, c in enumerate(m["tool_calls"])]
        out.append(message)
    return out


def _text(value, where: str) -> str:
    if value is None:
        return ""
    if isinstance(value, list):  # OpenAI content parts: text parts only
        parts = [p.get("text", "") for p in value if isinstance(p, dict) and p.get("type", "text") == "text"]
        if len(parts) != len(value):
            raise PromptError(f"{where}: only text content parts can be served")
        return "".join(parts)
    if not isinstance(value, str):
        raise PromptError(f"{where} is a {type(value).__name__}, not text")
    return value


def _tool_call(call: dict, where: str) -> dict:
    function = call.get("function") if isinstance(call, dict) else None
    if not isinstance(function, dict) or not isinstance(function.get("name"), str):
        raise PromptError(f"{where}: a tool call needs function.name")
    arguments = function.get("arguments")
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except ValueError:
            pass  # kept as the text the caller sent
    out = {"type": "function", "function": {"name": function["name"], "arguments": arguments if arguments is not None else {}}}
    if call.get("id") is not None:
        out["id"] = call["id"]
    return out


def _strings(value):
    """Every string in a JSON-like value, keys included (tool schemas name their properties)."""
    if isinstance(value, str):
        yield value
    elif isinstance(value, list):
        for v in value:
            yield from _strings(v)
    elif isinstance(value, dict):
        for k, v in value.items():
            yield from _strings(k)
            yield from _strings(v)


def _masked(value, pattern):
    """`value` with every added token's text in its strings replaced by private-use characters of the same
    length; roles and structure stay."""
    if isinstance(value, str):
        return pattern.sub(lambda m: MASK * len(m.group()), value)
    if isinstance(value, list):
        return [_masked(v, pattern) for v in value]
    if isinstance(value, dict):
        return {_masked(k, pattern): v if k == "role" else _masked(v, pattern) for k, v in value.items()}
    return value
