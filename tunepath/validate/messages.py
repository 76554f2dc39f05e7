"""One message of any supported layout -> its canonical form (see `tunepath.records`).

Handles what plain {role, content} messages do not have: content given as a list of parts, reasoning (a field
or a leading <think> block), OpenAI `tool_calls` and `tool` messages, ShareGPT `function_call` and
`observation` turns. Structural problems become reasons naming the field; whether a call names a declared tool,
its arguments form a JSON object and every tool result follows a call are checked by the contracts.
"""

from __future__ import annotations

import json
import re

from tunepath.validate.jsontext import PARSE_ERRORS, huge_integer_reason
from tunepath.validate.readers import has_invalid_utf8

TEXT_PARTS = ("text", "input_text", "output_text")
REASONING_PARTS = ("reasoning", "thinking")
CALL_PARTS = ("tool_call", "function_call")
# Internal role of a ShareGPT function_call turn before it is folded into an assistant message.
CALL_TURN = "function_call"
_THINK = re.compile(r"\s*<think>(.*?)</think>\s*", re.DOTALL)


def type_name(v: object) -> str:
    if v is None:
        return "null"
    return {str: "a string", list: "a list", dict: "an object", bool: "a boolean", int: "a number",
            float: "a number"}.get(type(v), type(v).__name__)


def canonical_json(value: object) -> str:
    """The one spelling of a JSON value in records, so equal content gives equal ids."""
    return json.dumps(value, ensure_ascii=False, sort_keys=False)


def check_str(v: object, where: str, reasons: list[str]) -> str | None:
    if not isinstance(v, str):
        reasons.append(f"wrong_type: '{where}' is {type_name(v)}, expected a string")
        return None
    if has_invalid_utf8(v):
        reasons.append(f"invalid_utf8: '{where}' contains a lone surrogate escape, which is not valid Unicode text")
        return None
    return v


def split_think(content: str) -> tuple[str, str | None]:
    """A leading <think>...</think> block is the assistant's reasoning, not its answer."""
    m = _THINK.match(content)
    if m is None:
        return content, None
    return content[m.end():].strip(), m.group(1).strip()


def content_parts(parts: list, at: str, reasons: list[str]) -> tuple[str, list[str], list[dict]]:
    """Text, reasoning and tool-call parts of a content list; any other part type (image, audio) is a reason."""
    texts, thoughts, calls = [], [], []
    for i, part in enumerate(parts):
        where = f"{at}[{i}]"
        if not isinstance(part, dict):
            reasons.append(f"wrong_type: '{where}' is {type_name(part)}, expected a content part object")
            continue
        kind = part.get("type") or "text"
        # Parquet gives every part every key of the column's schema, the unused ones null
        key = "text" if part.get("text") is not None or "value" not in part else "value"
        value = part.get(key)
        if kind in TEXT_PARTS or kind in REASONING_PARTS:
            text = check_str(value, f"{where}.{key}", reasons)
            if text is not None:
                (texts if kind in TEXT_PARTS else thoughts).append(text)
        elif kind in CALL_PARTS:
            call = parse_call_text(value, f"{where}.value", reasons)
            calls += call
        else:
            reasons.append(f"non_text_content: '{where}' is a {kind!r} part; only text parts are supported "
                           "(multimodal data is out of scope)")
    return "".join(texts), thoughts, calls


def parse_call_text(value: object, where: str, reasons: list[str]) -> list[dict]:
    """A call written as JSON text {"name", "arguments"} (or a list of them), as ShareGPT and LLaMA-Factory do."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except PARSE_ERRORS as e:
            reasons.append(huge_integer_reason(e, value, where)
                           or f"bad_tool_call: '{where}' is not valid JSON, expected {{\"name\", \"arguments\"}}")
            return []
    items = value if isinstance(value, list) else [value]
    calls = []
    for i, item in enumerate(items):
        call = tool_call(item, where if len(items) == 1 else f"{where}[{i}]", reasons)
        if call is not None:
            calls.append(call)
    return calls


def tool_call(item: object, where: str, reasons: list[str]) -> dict | None:
    """{"id", "name", "arguments"} from an OpenAI call ({"id", "type", "function": {...}}) or a flat one."""
    if not isinstance(item, dict):
        reasons.append(f"wrong_type: '{where}' is {type_name(item)}, expected a tool call object")
        return None
    function = item.get("function")
    body = function if isinstance(function, dict) else item
    at = f"{where}.function" if body is function else where
    name = body.get("name")
    if not isinstance(name, str) or not name.strip():
        reasons.append(f"bad_tool_call: '{at}.name' is {type_name(name) if not isinstance(name, str) else 'empty'}, "
                       "expected the tool's name")
        return None
    if "arguments" not in body and "parameters" not in body:
        reasons.append(f"missing_field: '{at}' has no 'arguments'")
        return None
    arguments = body.get("arguments", body.get("parameters"))
    if isinstance(arguments, str):
        try:  # canonical text when it parses; kept as written when not, so the contract can name it
            arguments = canonical_json(json.loads(arguments))
        except PARSE_ERRORS as e:
            huge = huge_integer_reason(e, arguments, f"{at}.arguments")
            if huge:  # kept as written, it would crash whatever parses it next (tokenize, the contract)
                reasons.append(huge)
                return None
    else:
        arguments = canonical_json(arguments)
    call_id = item.get("id")
    if call_id is not None and not isinstance(call_id, str):
        call_id = str(call_id)
    return {"id": call_id, "name": name, "arguments": arguments}


def parse_tools(value: object, key: str, reasons: list[str]) -> str | None:
    """Row-level tool schemas -> canonical JSON text of OpenAI-style {"type": "function", "function": {...}}."""
    if value is None or value == "" or value == []:
        return None
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except PARSE_ERRORS as e:
            reasons.append(huge_integer_reason(e, value, key)
                           or f"bad_tools: '{key}' is a string that is not valid JSON, expected a list of tool schemas")
            return None
    if isinstance(value, dict):
        value = [value]
    if not isinstance(value, list):
        reasons.append(f"bad_tools: '{key}' is {type_name(value)}, expected a list of tool schemas")
        return None
    tools = []
    for i, tool in enumerate(value):
        if not isinstance(tool, dict):
            reasons.append(f"bad_tools: '{key}[{i}]' is {type_name(tool)}, expected a tool schema object")
            continue
        function = tool.get("function") if isinstance(tool.get("function"), dict) else tool
        if not isinstance(function.get("name"), str) or not function["name"].strip():
            reasons.append(f"bad_tools: '{key}[{i}]' has no function name")
            continue
        tools.append(tool if function is not tool else {"type": "function", "function": tool})
    return canonical_json(tools) if tools else None


def tool_names(tools: str | None) -> set[str] | None:
    if tools is None:
        return None
    return {t["function"]["name"] for t in json.loads(tools)}


def fold_calls(messages: list[dict]) -> list[dict]:
    """ShareGPT layout -> canonical: function_call turns join the assistant message before them (or become one),
    and each tool result gets the name and id of the call it answers (in order)."""
    out: list[dict] = []
    pending: list[dict] = []
    for m in messages:
        role = m["role"]
        if role == CALL_TURN:
            last = out[-1] if out else None
            if last is not None and last["role"] == "assistant":
                last.setdefault("tool_calls", []).extend(m["tool_calls"])
            else:
                m = {**m, "role": "assistant"}
                out.append(m)
                last = m
            pending = list(last["tool_calls"])
            continue
        if role == "tool":
            call = pending.pop(0) if pending else None
            if m.get("name") is None and call is not None:
                m["name"] = call["name"]
            if m.get("tool_call_id") is None and call is not None:
                m["tool_call_id"] = call["id"]
        else:
            pending = list(m.get("tool_calls") or ())
        out.append(m)
    return out
