"""Template placeholders ({{name}}) left in data: filled from `validate.placeholders`, the rest counted or rejected.

Data sets such as LLaMA-Factory's identity.json ship answers like "I am {{name}}, made by {{author}}" for the user
to fill; trained literally, the model learns to say "{{name}}".
"""

from __future__ import annotations

import re
from collections import Counter

# a name, as template engines spell one: "{{name}}", "{{ user.name }}"; "{{...}}" in prose is not a placeholder
PLACEHOLDER = re.compile(r"\{\{\s*([A-Za-z_][\w.-]*)\s*\}\}")


def contents(kind: str, fields: dict):
    """(owner, key) of every string a template placeholder may sit in: texts, message contents and reasoning."""
    if kind == "text":
        yield fields, "text"
        return
    for part in ("messages", "prompt", "chosen", "rejected"):
        for m in fields.get(part, ()):
            yield m, "content"
            if "reasoning" in m:
                yield m, "reasoning"


def fill_placeholders(kind: str, fields: dict, values: dict[str, str]) -> Counter:
    """Replace known placeholders in place; returns the names of those left, with their counts."""
    left: Counter = Counter()
    for owner, key in contents(kind, fields):
        text = owner[key]
        if "{{" not in text:
            continue
        if values:
            text = owner[key] = PLACEHOLDER.sub(lambda m: values.get(m.group(1), m.group(0)), text)
        left.update(PLACEHOLDER.findall(text))
    return left
