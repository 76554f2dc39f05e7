"""Detect the format of a row and normalise it into the canonical fields of its kind (see `tunepath.records`).

Only structural problems are found here (not an object, missing fields, wrong types, invalid Unicode); content
rules (empty turns, turn order, lengths, duplicates, control tokens, tool calls) are the Great Expectations
suites' job. Every problem of a row is reported, not only the first.
"""

from __future__ import annotations

import fnmatch
import json
import re
from dataclasses import dataclass, field

from tunepath.validate.config import MAPPABLE_FIELDS, ValidateConfig
from tunepath.validate.jsontext import PARSE_ERRORS, huge_integer_reason
from tunepath.validate.messages import (
    CALL_TURN,
    canonical_json,
    check_str,
    content_parts,
    fold_calls,
    parse_call_text,
    parse_tools,
    split_think,
    tool_call,
    type_name,
)
from tunepath.validate.readers import RawRow, has_invalid_utf8

FORMAT_KIND = {"text": "text", "alpaca": "conversation", "sharegpt": "conversation", "openai": "conversation",
               "preference": "preference", "feedback": "feedback"}

# Role spellings seen in public data sets (ShareGPT, OpenAssistant, Gemini, LLaMA-Factory, ...); unknown roles
# pass through lower-cased so that the contract reports them by name.
ROLE_VARIANTS = {
    "system": "system", "sys": "system",
    "user": "user", "human": "user", "prompter": "user", "question": "user",
    "assistant": "assistant", "gpt": "assistant", "bot": "assistant", "model": "assistant", "chatgpt": "assistant",
    "bard": "assistant", "bing": "assistant", "ai": "assistant", "answer": "assistant",
    "tool": "tool", "observation": "tool", "function": "tool", "ipython": "tool", "function_response": "tool",
    "function_call": CALL_TURN, "tool_call": CALL_TURN,
}
# Columns that say a row carries media the text pipeline cannot use (LLaMA-Factory's multimodal layout).
MEDIA_COLUMNS = ("images", "videos", "audios")
# Message keys the fast path may ignore: anything else (tool calls, reasoning, ids) takes the full path.
_PLAIN_KEYS = {"role", "content", "from", "value", "loss_weight", "weight"}
_HH_TURN = re.compile(r"\n\n(Human|Assistant): ")


@dataclass(slots=True)
class Normalised:
    """The canonical content of one row (`fields`), or the reasons it has none."""

    fmt: str | None = None
    kind: str | None = None
    fields: dict | None = None
    reasons: list[str] = field(default_factory=list)


class Normaliser:
    """Turns parsed rows into canonical fields; holds the field and role mappings of the config.

    `field_map`/`role_map` extend the config's maps for one file (from a LLaMA-Factory dataset_info.json).
    """

    def __init__(self, cfg: ValidateConfig, field_map: dict[str, str] | None = None,
                 role_map: dict[str, str] | None = None):
        self.cfg = cfg
        fields = {**cfg.field_map, **(field_map or {})}
        self.names = {name: fields.get(name, name) for name in MAPPABLE_FIELDS}
        self.roles = {**ROLE_VARIANTS, **{k.strip().lower(): v for k, v in {**cfg.role_map, **(role_map or {})}.items()}}
        n = self.names
        self._telling_keys = [(n["messages"], "openai"), (n["conversations"], "sharegpt"), (n["chosen"], "preference"),
                              (n["rejected"], "preference"), (n["instruction"], "alpaca"), (n["output"], "alpaca"),
                              (n["text"], "text")]

    def format_for(self, rel_path: str) -> str:
        """The forced format of a file (params `file_formats`, then `format`), or 'auto'."""
        for pattern, fmt in self.cfg.file_formats.items():
            if fnmatch.fnmatch(rel_path, pattern):
                return fmt
        return self.cfg.format

    def normalise(self, row: RawRow, fmt: str = "auto") -> Normalised:
        value = row.value
        if not isinstance(value, dict):
            return Normalised(reasons=[
                f"not_an_object: the row is {type_name(value)}, expected a JSON object with the fields of one format"])
        if row.origin == "text":
            fmt = "text"
        elif fmt == "auto":
            fmt = self._detect(value)
            if fmt is None:
                keys = ", ".join(repr(k)[:40] for k in list(value)[:12]) or "none"
                return Normalised(reasons=[
                    f"missing_field: no known format: the row has keys [{keys}]; expected 'text', "
                    "'instruction'+'output' (Alpaca), 'conversations' (ShareGPT), 'messages' (OpenAI), "
                    "'prompt'/'chosen'/'rejected' (preference) or a conversation with 'label'/'kto_tag' (feedback); "
                    "other names can be mapped with validate.field_map"])
        out = Normalised(fmt=fmt, kind=FORMAT_KIND[fmt])
        row_csv = row.origin == "csv"
        builder = {"text": self._text, "alpaca": self._alpaca, "sharegpt": self._sharegpt, "openai": self._openai,
                   "preference": self._preference, "feedback": self._feedback}[fmt]
        fields = builder(value, out.reasons, row_csv)
        if fmt != "text":
            for media in MEDIA_COLUMNS:
                if value.get(media):
                    out.reasons.append(f"non_text_content: the row has '{media}'; only text data is supported "
                                       "(multimodal data is out of scope)")
            key = self.names["tools"]
            tools = parse_tools(value.get(key), key, out.reasons)
            if tools is not None:
                fields["tools"] = tools
        if not out.reasons:
            out.fields = fields
        return out

    def _has(self, value: dict, name: str) -> bool:
        v = value.get(self.names[name])
        return v is not None and v != ""

    def _detect(self, value: dict) -> str | None:
        """Format by the first telling key with a value; keys that are only null or empty (Parquet/CSV columns of
        other formats in a mixed file) count only when no key has a value, so `{"messages": null}` is a wrong type.

        chosen+rejected come first (the ShareGPT ranking layout also has 'conversations'), then a label makes a
        conversation unpaired feedback."""
        if self._has(value, "chosen") and self._has(value, "rejected"):
            return "preference"
        if "chosen_messages" in value and "rejected_messages" in value:
            return "preference"
        if (self._has(value, "label") or self._has(value, "kto_tag")) and any(
                self._has(value, k) for k in ("messages", "conversations", "instruction")):
            return "feedback"
        for key, fmt in self._telling_keys:
            v = value.get(key)
            if v is not None and v != "":
                return fmt
        for key, fmt in self._telling_keys:
            if key in value:
                return fmt
        return None

    # -- fields ------------------------------------------------------------------------------------------------

    def _string(self, value: dict, name: str, reasons: list[str], csv: bool, required: bool = True) -> str | None:
        key = self.names[name]
        if key not in value:
            if required:
                reasons.append(f"missing_field: the row has no '{key}' field")
            return None
        v = value[key]
        if v is None or (csv and not required and v == ""):
            if required:
                reasons.append(f"wrong_type: '{key}' is null, expected a string")
            return None
        return check_str(v, key, reasons)

    @staticmethod
    def _list(v: object, where: str, reasons: list[str], csv: bool) -> list | None:
        if csv and isinstance(v, str) and v.lstrip().startswith("["):
            try:  # a CSV cell can only hold a message list as JSON text
                v = json.loads(v)
            except PARSE_ERRORS as e:
                reasons.append(huge_integer_reason(e, v, where)
                               or f"bad_json: '{where}' holds a string that is not valid JSON, expected a list")
                return None
        if not isinstance(v, list):
            reasons.append(f"wrong_type: '{where}' is {type_name(v)}, expected a list of messages")
            return None
        return v

    def _messages(self, items: list, where: str, reasons: list[str]) -> list[dict]:
        role_key, from_key, content_key, value_key = (self.names[k] for k in ("role", "from", "content", "value"))
        roles = self.roles
        messages = []
        folded = False
        for i, m in enumerate(items):
            # fast path for the common well-formed message; anything else gets the detailed diagnosis
            if type(m) is dict and (len(m) == 2 or m.keys() <= _PLAIN_KEYS):
                role = m.get(role_key, m.get(from_key))
                content = m.get(content_key, m.get(value_key))
                if (type(role) is str and type(content) is str and role.isascii()
                        and (content.isascii() or not has_invalid_utf8(content))):
                    mapped = roles.get(role)
                    if mapped is None:
                        mapped = role.strip().lower()
                        mapped = roles.get(mapped, mapped)
                    if mapped == "assistant" and "<think>" in content[:64]:
                        pass  # the full path moves the reasoning out
                    elif mapped not in ("tool", CALL_TURN):
                        messages.append({"role": mapped, "content": content})
                        continue
            message = self._message(m, f"{where}[{i}]", reasons)
            if message is not None:
                folded |= message["role"] in (CALL_TURN, "tool")
                messages.append(message)
        if not items:
            reasons.append(f"empty_content: '{where}' is an empty list")
        return fold_calls(messages) if folded else messages

    def _message(self, m: object, at: str, reasons: list[str]) -> dict | None:
        """The full diagnosis of one message: parts, reasoning, tool calls and tool results."""
        n = self.names
        if not isinstance(m, dict):
            reasons.append(f"wrong_type: '{at}' is {type_name(m)}, expected an object with role and content")
            return None
        role_key = n["role"] if n["role"] in m else n["from"]
        content_key = n["content"] if n["content"] in m else n["value"]
        if role_key not in m:
            reasons.append(f"missing_field: '{at}' has no '{n['role']}' (or '{n['from']}') field")
            return None
        raw_role = check_str(m[role_key], f"{at}.{role_key}", reasons)
        key = (raw_role or "").strip().lower()
        role = self.roles.get(raw_role, self.roles.get(key, key)) if raw_role is not None else None
        calls_in = m.get("tool_calls")
        if calls_in is None and isinstance(m.get("function_call"), dict):
            calls_in = [m["function_call"]]  # OpenAI's deprecated single-call field
        content = m.get(content_key)
        thoughts: list[str] = []
        calls: list[dict] = []
        if content_key not in m and not calls_in:
            reasons.append(f"missing_field: '{at}' has no '{n['content']}' (or '{n['value']}') field")
            return None
        if isinstance(content, list):
            content, thoughts, calls = content_parts(content, f"{at}.{content_key}", reasons)
        elif content is None and (calls_in or role == CALL_TURN):
            content = ""
        elif role == CALL_TURN:
            before = len(reasons)
            calls = parse_call_text(content, f"{at}.{content_key}", reasons)
            if len(reasons) > before:
                return None
            content = ""
        else:
            content = check_str(content, f"{at}.{content_key}", reasons)
            if content is None:
                return None
        if calls_in is not None:
            if not isinstance(calls_in, list):
                reasons.append(f"wrong_type: '{at}.tool_calls' is {type_name(calls_in)}, expected a list of calls")
            else:
                for j, item in enumerate(calls_in):
                    call = tool_call(item, f"{at}.tool_calls[{j}]", reasons)
                    if call is not None:
                        calls.append(call)
        for name in ("reasoning_content", "reasoning", "thinking"):
            v = m.get(name)
            if v not in (None, ""):
                text = check_str(v, f"{at}.{name}", reasons)
                if text is not None:
                    thoughts.insert(0, text)
                break
        if raw_role is None:
            return None
        if role == "assistant" and "<think>" in content[:64]:
            content, thought = split_think(content)
            if thought is not None:
                thoughts.append(thought)
        out: dict = {"role": role, "content": content}
        if out["role"] not in ("assistant", CALL_TURN):
            if thoughts:
                reasons.append(f"misplaced_field: '{at}' ({role}) has reasoning; only assistant turns carry reasoning")
                return None
            if calls:
                reasons.append(f"misplaced_field: '{at}' ({role}) has tool calls; only assistant turns call tools")
                return None
        reasoning = "\n\n".join(t.strip() for t in thoughts if t.strip())
        if reasoning:
            out["reasoning"] = reasoning
        if calls or role == CALL_TURN:
            out["tool_calls"] = calls
        if role == "tool":
            call_id, name = m.get("tool_call_id"), m.get("name")
            out["tool_call_id"] = None if call_id is None else str(call_id)
            out["name"] = name if isinstance(name, str) else None
        return out

    def _message_list(self, value: dict, name: str, reasons: list[str], csv: bool) -> list[dict]:
        key = self.names[name]
        if key not in value:
            reasons.append(f"missing_field: the row has no '{key}' field")
            return []
        items = self._list(value[key], key, reasons, csv)
        return [] if items is None else self._messages(items, key, reasons)

    # -- formats -----------------------------------------------------------------------------------------------

    def _text(self, value: dict, reasons: list[str], csv: bool) -> dict:
        return {"text": self._string(value, "text", reasons, csv)}

    def _openai(self, value: dict, reasons: list[str], csv: bool) -> dict:
        return {"messages": self._message_list(value, "messages", reasons, csv)}

    def _sharegpt(self, value: dict, reasons: list[str], csv: bool) -> dict:
        messages = self._message_list(value, "conversations", reasons, csv)
        return {"messages": self._with_system(value, messages, reasons, csv)}

    def _with_system(self, value: dict, messages: list[dict], reasons: list[str], csv: bool) -> list[dict]:
        system = self._string(value, "system", reasons, csv, required=False)
        if system and not (messages and messages[0]["role"] == "system"):
            messages.insert(0, {"role": "system", "content": system})
        return messages

    def _alpaca(self, value: dict, reasons: list[str], csv: bool, answer: bool = True) -> dict:
        instruction = self._string(value, "instruction", reasons, csv)
        extra = self._string(value, "input", reasons, csv, required=False)
        system = self._string(value, "system", reasons, csv, required=False)
        messages = [{"role": "system", "content": system}] if system else []
        history_key = self.names["history"]
        history = value.get(history_key)
        if history not in (None, ""):
            pairs = self._list(history, history_key, reasons, csv) or []
            for i, pair in enumerate(pairs):
                at = f"{history_key}[{i}]"
                if not isinstance(pair, list) or len(pair) != 2:
                    what = f"a list of {len(pair)}" if isinstance(pair, list) else type_name(pair)
                    reasons.append(f"wrong_type: '{at}' is {what}, expected a [user, assistant] pair")
                    continue
                user = check_str(pair[0], f"{at}[0]", reasons)
                reply = check_str(pair[1], f"{at}[1]", reasons)
                messages += [{"role": "user", "content": user}, {"role": "assistant", "content": reply}]
        prompt = "\n\n".join(p for p in (instruction, extra) if p)
        messages.append({"role": "user", "content": prompt})
        if answer:
            output = self._string(value, "output", reasons, csv)
            messages.append({"role": "assistant", "content": output})
        return {"messages": messages}

    def _feedback(self, value: dict, reasons: list[str], csv: bool) -> dict:
        """An unpaired judgement (KTO): a conversation ending with an answer, and whether the answer is desirable."""
        n = self.names
        if n["messages"] in value or n["conversations"] in value:
            which = "messages" if n["messages"] in value else "conversations"
            messages = self._with_system(value, self._message_list(value, which, reasons, csv), reasons, csv)
        else:
            messages = self._alpaca(value, reasons, csv)["messages"]
        key = n["label"] if n["label"] in value else n["kto_tag"]
        if key not in value:
            reasons.append(f"missing_field: the row has no '{n['label']}' (or '{n['kto_tag']}') field")
            return {"messages": messages, "label": None}
        label = value[key]
        if csv and isinstance(label, str) and label.strip().lower() in ("true", "false"):
            label = label.strip().lower() == "true"
        if isinstance(label, (dict, list)):  # the contract names scalars; a structure is a type error here
            reasons.append(f"bad_label: '{key}' is {type_name(label)}, expected true or false")
        return {"messages": messages, "label": label}

    def _preference(self, value: dict, reasons: list[str], csv: bool) -> dict:
        """Pairs in every layout: prompt + answers, ShareGPT ranking (conversations + one chosen and one rejected
        message), Alpaca ranking (instruction + answers), or whole conversations sharing a prefix (HH, as message
        lists or as "\\n\\nHuman: ... \\n\\nAssistant: ..." transcripts)."""
        n = self.names
        names = {"chosen": n["chosen"], "rejected": n["rejected"]}
        if n["chosen"] not in value and "chosen_messages" in value:
            names = {"chosen": "chosen_messages", "rejected": "rejected_messages"}
        raw = {}
        for side, key in names.items():
            if key not in value:
                reasons.append(f"missing_field: the row has no '{key}' field")
            else:
                raw[side] = value[key]
        transcripts = (len(raw) == 2 and n["prompt"] not in value
                       and all(isinstance(v, str) and v.lstrip(" \n").startswith("Human:") for v in raw.values()))
        sides = {}
        for side, v in raw.items():
            if transcripts:
                sides[side] = self._transcript(v, names[side], reasons)
            else:
                sides[side] = self._turns(v, names[side], "assistant", reasons, csv)
        if n["prompt"] in value:
            prompt = self._turns(value[n["prompt"]], n["prompt"], "user", reasons, csv)
        elif n["conversations"] in value or n["messages"] in value:
            which = "conversations" if n["conversations"] in value else "messages"
            prompt = self._with_system(value, self._message_list(value, which, reasons, csv), reasons, csv)
        elif n["instruction"] in value:
            prompt = self._alpaca(value, reasons, csv, answer=False)["messages"]
        elif len(sides) == 2 and (transcripts or all(isinstance(raw[s], list) for s in raw)):
            prompt = self._split_implicit_prompt(sides, reasons)
        else:
            if len(sides) == 2:
                reasons.append(f"missing_field: the row has no '{n['prompt']}' field")
            prompt = []
        return {"prompt": prompt, "chosen": sides.get("chosen", []), "rejected": sides.get("rejected", [])}

    @staticmethod
    def _transcript(text: str, key: str, reasons: list[str]) -> list[dict]:
        """An HH-RLHF transcript: turns start with "\\n\\nHuman: " or "\\n\\nAssistant: "."""
        text = check_str(text, key, reasons)
        if text is None:
            return []
        text = "\n\n" + text.lstrip(" \n")
        parts = _HH_TURN.split(text)
        turns = []
        for speaker, content in zip(parts[1::2], parts[2::2]):
            turns.append({"role": "user" if speaker == "Human" else "assistant", "content": content.strip()})
        return turns

    def _turns(self, v: object, key: str, role: str, reasons: list[str], csv: bool) -> list[dict]:
        """A prompt or answer given as a plain string (one turn of `role`), one message, or a message list."""
        if isinstance(v, str) and not (csv and v.lstrip().startswith("[")):
            text = check_str(v, key, reasons)
            if text is None:
                return []
            turn = {"role": role, "content": text}
            if role == "assistant" and "<think>" in text[:64]:
                content, thought = split_think(text)
                turn = {"role": role, "content": content, **({"reasoning": thought} if thought else {})}
            return [turn]
        if isinstance(v, dict):
            return self._messages([v], key, reasons)
        items = self._list(v, key, reasons, csv)
        return [] if items is None else self._messages(items, key, reasons)

    @staticmethod
    def _split_implicit_prompt(sides: dict, reasons: list[str]) -> list[dict]:
        """Preference rows without 'prompt' whose answers are whole conversations: the shared start is the prompt."""
        chosen, rejected = sides["chosen"], sides["rejected"]
        shared = 0
        while shared < min(len(chosen), len(rejected)) - 1 and chosen[shared] == rejected[shared]:
            shared += 1
        if shared == 0:
            reasons.append("missing_field: the row has no 'prompt' and chosen/rejected share no leading turns")
            return []
        sides["chosen"], sides["rejected"] = chosen[shared:], rejected[shared:]
        return chosen[:shared]


__all__ = ["FORMAT_KIND", "ROLE_VARIANTS", "Normalised", "Normaliser", "canonical_json"]
