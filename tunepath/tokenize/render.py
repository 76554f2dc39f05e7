"""Render conversations with a chat template exactly as `tokenizer.apply_chat_template(tokenize=False)` does.

The renderer uses transformers' own compiled template and passes the same variables (the tokenizer's special
tokens, `tools`, the caller's template kwargs), so a rendered text is the text the model sees at inference.
Two things differ on purpose, both deterministic:

- the clock is pinned: templates that print a date (`date_string`, `strftime_now`, as Llama-3.x does) get
  `tokenize.render_date`, so the same inputs give the same ids and DVC keeps its cache;
- canonical records (see `tunepath.records`) become the message dicts templates read: tool calls with their
  arguments parsed, reasoning as `reasoning_content` where the template reads it, else as a `<think>` block.
"""

from __future__ import annotations

import datetime as dt
import functools
import json
import re

THINK_OPEN, THINK_CLOSE = "<think>\n", "\n</think>\n\n"  # R1 / Qwen3 reasoning block around a trace
EMPTY_THINK = THINK_OPEN.rstrip("\n") + "\n\n" + THINK_CLOSE.lstrip("\n")  # "<think>\n\n</think>\n\n"

# Prepended to a template that reads `date_string`, so the saved template (merge, serving) renders the same
# date as training unless the caller passes one.
_DATE_PIN = "{%- if date_string is not defined %}{%- set date_string = __DATE__ %}{%- endif %}\n"
# Prepended to a template that calls strftime_now('<format>') itself (Granite): the same date, each format
# looked up in a table made at tokenize time (templates cannot format a date otherwise).
_CLOCK_PIN = "{%- macro strftime_now(format) -%}{{ __TABLE__[format] }}{%- endmacro -%}\n"
_STRFTIME = re.compile(r"strftime_now\(\s*(['\"])(.*?)\1\s*\)")


def pin_date(template: str, date: dt.date) -> str:
    """The template with its clock pinned to `date`: `date_string` defaults to it ('%d %b %Y', Llama-3's
    format) and literal `strftime_now(...)` calls print it."""
    pinned = template
    formats = sorted({m.group(2) for m in _STRFTIME.finditer(template)})
    if formats and not template.startswith("{%- macro strftime_now"):
        moment = dt.datetime.combine(date, dt.time(0, 0))
        table = json.dumps({f: moment.strftime(f) for f in formats}, ensure_ascii=False)
        pinned = _CLOCK_PIN.replace("__TABLE__", table) + pinned
    if "date_string" in template and _DATE_PIN.split("__DATE__")[0] not in template:
        pinned = _DATE_PIN.replace("__DATE__", json.dumps(date.strftime("%d %b %Y"))) + pinned
    return pinned


@functools.lru_cache(maxsize=32)  # as transformers caches its compiles: a stage builds a renderer per worker
def compile_template(template: str):
    """The template compiled as transformers 5.17 compiles it for apply_chat_template (its
    `_compile_jinja_template`: the same sandbox, whitespace options, `tojson`, `raise_exception`, `strftime_now`,
    loop controls and `{% generation %}` blocks), without importing transformers: `tunepath chat` renders prompts
    with it in a process that never loads transformers. The tokenize stage's parity checks compare its renders
    with apply_chat_template's on every run."""
    import jinja2
    import jinja2.ext
    import jinja2.nodes
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class Generation(jinja2.ext.Extension):
        # transformers' AssistantTracker marks these blocks for assistant masks; rendered, a block is its body
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller):
            return caller()

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    def strftime_now(format):
        return dt.datetime.now().strftime(format)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[Generation, jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    return env.from_string(template)


class ChatRenderer:
    """Renders message lists with one template; `variables` are what apply_chat_template passes besides messages."""

    def __init__(self, tokenizer, template: str, template_kwargs: dict | None = None, date: dt.date | None = None) -> None:
        self.template = template
        self.date = date or dt.date(2024, 7, 26)
        moment = dt.datetime.combine(self.date, dt.time(0, 0))
        # What apply_chat_template gets on top of the special tokens it passes itself.
        self.kwargs = {
            "date_string": self.date.strftime("%d %b %Y"),
            "strftime_now": moment.strftime,  # shadows transformers' global of the same name
            **(template_kwargs or {}),
        }
        self.variables = {**tokenizer.special_tokens_map, **self.kwargs}
        self.reads_reasoning = "reasoning_content" in template
        self._compiled = compile_template(template)
        self._globals = {**self._compiled.globals, "tools": None, "documents": None, **self.variables}

    def render(self, messages: list[dict], add_generation_prompt: bool = False, tools: list | None = None) -> str:
        """The template's text for `messages`, as `apply_chat_template(..., tokenize=False, **variables)` gives it."""
        from jinja2.runtime import new_context

        # The compiled template and variables of transformers, minus its per-call setup (a third of the time).
        compiled = self._compiled
        names = {**self._globals, "messages": messages, "add_generation_prompt": add_generation_prompt, "tools": tools}
        # `names` holds the globals already; passing them again only makes jinja copy their keys into a set.
        context = new_context(compiled.environment, compiled.name, compiled.blocks, names, shared=True)
        return compiled.environment.concat(compiled.root_render_func(context))

    def message(self, record: dict, with_reasoning: bool) -> dict:
        """A canonical message as the template reads it; reasoning kept only when `with_reasoning`."""
        out = {"role": record["role"], "content": record.get("content") or ""}
        calls = record.get("tool_calls")
        if calls:
            out["tool_calls"] = [
                {"id": c.get("id"), "type": "function", "function": {"name": c["name"], "arguments": _arguments(c.get("arguments"))}}
                for c in calls
            ]
        for key in ("tool_call_id", "name"):
            if record.get(key):
                out[key] = record[key]
        reasoning = record.get("reasoning")
        if with_reasoning and reasoning:
            if self.reads_reasoning:
                out["reasoning_content"] = reasoning
            else:
                out["content"] = THINK_OPEN + reasoning + THINK_CLOSE + out["content"]
        return out


def _arguments(value):
    """Tool-call arguments as templates expect them: an object (templates apply `tojson` themselves)."""
    if isinstance(value, str):
        try:
            return json.loads(value)
        except ValueError:
            return value
    return value if value is not None else {}


def parse_tools(value) -> list | None:
    """The row-level `tools` of a canonical record (JSON text of a list of schemas), or None."""
    if not value:
        return None
    tools = json.loads(value) if isinstance(value, str) else value
    return tools or None


def guarded_tokens(tokenizer) -> dict[int, str]:
    """The added tokens that content must never produce: all of them, special or not, but those made of
    whitespace alone (Gemma's `\\t\\t` and `▁▁▁▁` runs are how the tokenizer writes indentation, not markup)."""
    return {i: t.content for i, t in tokenizer.added_tokens_decoder.items() if t.content and t.content.replace("\u2581", " ").strip()}


def added_token_pattern(tokens) -> re.Pattern | None:
    """A regex matching any of `tokens` (texts), longest first; None when there is none."""
    names = sorted(set(tokens), key=len, reverse=True)
    return re.compile("|".join(re.escape(n) for n in names)) if names else None
