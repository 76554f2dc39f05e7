"""Detect the format of a row and normalise it into the canonical fields of its kind (see `tunepath.records`).

Only structural problems are found here (not an object, missing fields, wrong types, invalid Unicode); content
rules (empty turns, turn order, lengths, duplicates, control tokens) are the Great Expectations suites' job.
Every problem of a row is reported, not only the first.
"""

from __future__ import annotations

import fnmatch
import json
from dataclasses import dataclass, field

from tunepath.validate.config import MAPPABLE_FIELDS, ValidateConfig
from tunepath.validate.readers import RawRow, has_invalid_utf8

FORMAT_KIND = {"text": "text", "alpaca": "conversation", "sharegpt": "conversation", "openai": "conversation",
               "preference": "preference"}

# Role spellings seen in public data sets (ShareGPT, OpenAssistant, Gemini, ...); unknown roles pass through
# lower-cased so that the contract reports them by name.
ROLE_VARIANTS = {
    "system": "system", "sys": "system",
    "user": "user", "human": "user", "prompter": "user", "question": "user",
    "assistant": "assistant", "gpt": "assistant", "bot": "assistant", "model": "assistant", "chatgpt": "assistant",
    "bard": "assistant", "bing": "assistant", "ai": "assistant", "answer": "assistant",
}


@dataclass(slots=True)
class Normalised:
    """The canonical content of one row (`fields`), or the reasons it has none."""

    fmt: str | None = None
    kind: str | None = None
    fields: dict | None = None
    reasons: list[str] = field(default_factory=list)


def _type_name(v: object) -> str:
    if v is None:
        return "null"
    return {str: "a string", list: "a list", dict: "an object", bool: "a boolean", int: "a number",
            float: "a number"}.get(type(v), type(v).__name__)


class Normaliser:
    """Turns parsed rows into canonical fields; holds the field and role mappings of the config."""

    def __init__(self, cfg: ValidateConfig):
        self.cfg = cfg
        self.names = {name: cfg.field_map.get(name, name) for name in MAPPABLE_FIELDS}
        self.roles = {**ROLE_VARIANTS, **{k.strip().lower(): v for k, v in cfg.role_map.items()}}
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
                f"not_an_object: the row is {_type_name(value)}, expected a JSON object with the fields of one format"])
        if row.origin == "text":
            fmt = "text"
        elif fmt == "auto":
            fmt = self._detect(value)
            if fmt is None:
                keys = ", ".join(repr(k)[:40] for k in list(value)[:12]) or "none"
                return Normalised(reasons=[
                    f"missing_field: no known format: the row has keys [{keys}]; expected 'text', "
                    "'instruction'+'output' (Alpaca), 'conversations' (ShareGPT), 'messages' (OpenAI) or "
                    "'prompt'/'chosen'/'rejected' (preference); other names can be mapped with validate.field_map"])
        out = Normalised(fmt=fmt, kind=FORMAT_KIND[fmt])
        row_csv = row.origin == "csv"
        builder = {"text": self._text, "alpaca": self._alpaca, "sharegpt": self._sharegpt, "openai": self._openai,
                   "preference": self._preference}[fmt]
        fields = builder(value, out.reasons, row_csv)
        if not out.reasons:
            out.fields = fields
        return out

    def _detect(self, value: dict) -> str | None:
        """Format by the first telling key with a value; keys that are only null or empty (Parquet/CSV columns of
        other formats in a mixed file) count only when no key has a value, so `{"messages": null}` is a wrong type."""
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
        return self._check_str(v, key, reasons)

    @staticmethod
    def _check_str(v: object, where: str, reasons: list[str]) -> str | None:
        if not isinstance(v, str):
            reasons.append(f"wrong_type: '{where}' is {_type_name(v)}, expected a string")
            return None
        if has_invalid_utf8(v):
            reasons.append(f"invalid_utf8: '{where}' contains a lone surrogate escape, which is not valid Unicode text")
            return None
        return v

    @staticmethod
    def _list(v: object, where: str, reasons: list[str], csv: bool) -> list | None:
        if csv and isinstance(v, str) and v.lstrip().startswith("["):
            try:  # a CSV cell can only hold a message list as JSON text
                v = json.loads(v)
            except (json.JSONDecodeError, RecursionError):
                reasons.append(f"bad_json: '{where}' holds a string that is not valid JSON, expected a list")
                return None
        if not isinstance(v, list):
            reasons.append(f"wrong_type: '{where}' is {_type_name(v)}, expected a list of messages")
            return None
        return v

    def _messages(self, items: list, where: str, reasons: list[str]) -> list[dict]:
        role_key, from_key, content_key, value_key = (self.names[k] for k in ("role", "from", "content", "value"))
        roles = self.roles
        messages = []
        for i, m in enumerate(items):
            # fast path for the common well-formed message; anything else gets the detailed diagnosis
            if type(m) is dict:
                role = m.get(role_key, m.get(from_key))
                content = m.get(content_key, m.get(value_key))
                if (type(role) is str and type(content) is str and role.isascii()
                        and (content.isascii() or not has_invalid_utf8(content))):
                    mapped = roles.get(role)
                    if mapped is None:
                        mapped = role.strip().lower()
                        mapped = roles.get(mapped, mapped)
                    messages.append({"role": mapped, "content": content})
                    continue
            self._diagnose_message(m, f"{where}[{i}]", messages, reasons)
        if not items:
            reasons.append(f"empty_content: '{where}' is an empty list")
        return messages

    def _diagnose_message(self, m: object, at: str, messages: list[dict], reasons: list[str]) -> None:
        n = self.names
        if not isinstance(m, dict):
            reasons.append(f"wrong_type: '{at}' is {_type_name(m)}, expected an object with role and content")
            return
        role_key = n["role"] if n["role"] in m else n["from"]
        content_key = n["content"] if n["content"] in m else n["value"]
        if role_key not in m:
            reasons.append(f"missing_field: '{at}' has no '{n['role']}' (or '{n['from']}') field")
        if content_key not in m:
            reasons.append(f"missing_field: '{at}' has no '{n['content']}' (or '{n['value']}') field")
        if role_key not in m or content_key not in m:
            return
        role = self._check_str(m[role_key], f"{at}.{role_key}", reasons)
        content = self._check_str(m[content_key], f"{at}.{content_key}", reasons)
        if role is not None and content is not None:
            key = role.strip().lower()
            messages.append({"role": self.roles.get(key, key), "content": content})

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
        system = self._string(value, "system", reasons, csv, required=False)
        if system and not (messages and messages[0]["role"] == "system"):
            messages.insert(0, {"role": "system", "content": system})
        return {"messages": messages}

    def _alpaca(self, value: dict, reasons: list[str], csv: bool) -> dict:
        instruction = self._string(value, "instruction", reasons, csv)
        extra = self._string(value, "input", reasons, csv, required=False)
        output = self._string(value, "output", reasons, csv)
        system = self._string(value, "system", reasons, csv, required=False)
        messages = [{"role": "system", "content": system}] if system else []
        history_key = self.names["history"]
        history = value.get(history_key)
        if history not in (None, ""):
            pairs = self._list(history, history_key, reasons, csv) or []
            for i, pair in enumerate(pairs):
                at = f"{history_key}[{i}]"
                if not isinstance(pair, list) or len(pair) != 2:
                    what = f"a list of {len(pair)}" if isinstance(pair, list) else _type_name(pair)
                    reasons.append(f"wrong_type: '{at}' is {what}, expected a [user, assistant] pair")
                    continue
                user = self._check_str(pair[0], f"{at}[0]", reasons)
                answer = self._check_str(pair[1], f"{at}[1]", reasons)
                messages += [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]
        prompt = "\n\n".join(p for p in (instruction, extra) if p)
        messages += [{"role": "user", "content": prompt}, {"role": "assistant", "content": output}]
        return {"messages": messages}

    def _preference(self, value: dict, reasons: list[str], csv: bool) -> dict:
        n = self.names
        sides = {}
        for name in ("chosen", "rejected"):
            key = n[name]
            if key not in value:
                reasons.append(f"missing_field: the row has no '{key}' field")
                continue
            sides[name] = self._turns(value[key], key, "assistant", reasons, csv)
        if n["prompt"] in value:
            prompt = self._turns(value[n["prompt"]], n["prompt"], "user", reasons, csv)
        elif all(isinstance(value.get(n[s]), list) for s in ("chosen", "rejected")) and len(sides) == 2:
            prompt = self._split_implicit_prompt(sides, reasons)
        else:
            reasons.append(f"missing_field: the row has no '{n['prompt']}' field")
            prompt = []
        return {"prompt": prompt, "chosen": sides.get("chosen", []), "rejected": sides.get("rejected", [])}

    def _turns(self, v: object, key: str, role: str, reasons: list[str], csv: bool) -> list[dict]:
        """A prompt or answer given as a plain string (one turn of `role`), one message, or a message list."""
        if isinstance(v, str) and not (csv and v.lstrip().startswith("[")):
            text = self._check_str(v, key, reasons)
            return [] if text is None else [{"role": role, "content": text}]
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
