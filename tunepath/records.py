"""Canonical records: what the validate stage writes and every later stage reads.

`artifacts/validate/records/records-00000.jsonl`, `records-00001.jsonl`, ... (shards of about 128 MB, in
input order; `read_records` reads them) hold one JSON object per accepted input row (a long text document may
give several, see `tunepath.validate.chunks`):

    {"id": "<sha256 of the normalised content, 16 hex>",
     "kind": "conversation" | "text" | "preference" | "feedback",
     "split": "train" | "eval",
     "source": {"file": "data/raw/chat.jsonl", "line": 12},   # plus "chunk": n for a piece of a long document
     # kind == "conversation"
     "messages": [message, ...],
     "tools": "<JSON text>",           # optional, see below; absent when the row declares no tools
     # kind == "text"
     "text": "...",
     # kind == "preference"
     "prompt": [message, ...],         # ends with a user turn (or with tool results)
     "chosen": [message],              # one assistant message
     "rejected": [message],            # one assistant message
     "tools": "<JSON text>",           # optional
     # kind == "feedback" (unpaired, for KTO; never an SFT target)
     "messages": [message, ...],       # ends with the assistant turn that is judged
     "label": true | false,            # true: the last answer is desirable
     "tools": "<JSON text>"}           # optional

A message is {"role": "system" | "user" | "assistant" | "tool", "content": str} plus, only where they apply:

    "reasoning": str        assistant only: from a `reasoning_content`/`reasoning` field, a reasoning content part,
                            or a leading <think>...</think> block of the content (removed from content, stripped)
    "tool_calls": [{"id": str | null, "name": str, "arguments": str}, ...]
                            assistant only; `arguments` is the JSON text of an object; content may then be ""
    "tool_call_id": str | null, "name": str | null
                            tool messages (both keys always present): the call answered and the tool's name

`tools` is the JSON text of a list of OpenAI-style tool schemas
`{"type": "function", "function": {"name", "description", "parameters"}}` (bare ShareGPT/glaive schemas are
wrapped). JSON texts are canonical (`json.dumps(value, ensure_ascii=False)` of the parsed value, key order
kept), so equal content gives equal ids.

Layouts mapped onto this form: OpenAI (`tools` list, assistant `tool_calls` [{"id", "type": "function",
"function": {"name", "arguments": str or object}}], `tool` messages with `tool_call_id`/`name`), ShareGPT
(`tools` as JSON text, `function_call` turns whose value is {"name", "arguments"} become assistant tool calls,
`observation` turns become tool messages named after the call they follow), content parts
([{"type": "text", "text" | "value": ...}] joined in order).

`artifacts/validate/rejects.jsonl` holds one object per rejected row:

    {"source": {"file": ..., "line": ...}, "raw": "<the line as read, decoded with replacement>",
     "reasons": ["<code>: <explanation with the field>", ...]}
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

KINDS = ("conversation", "text", "preference", "feedback")
ROLES = ("system", "user", "assistant", "tool")
Kind = Literal["conversation", "text", "preference", "feedback"]
Split = Literal["train", "eval"]


RECORDS_DIR = "records"  # the validate stage's records folder


def record_files(path: Path) -> list[Path]:
    """The records files, in order, of a validate folder, its records folder, or one JSONL file of records.

    Raises FileNotFoundError naming what is missing (an old validate folder holds records.jsonl: rerun validate)."""
    path = Path(path)
    if path.is_file():
        return [path]
    folder = path / RECORDS_DIR if (path / RECORDS_DIR).is_dir() else path
    files = sorted(folder.glob("records-*.jsonl")) if folder.is_dir() else []
    if not files and folder.name != RECORDS_DIR:
        old = " (records.jsonl is the layout of an older version)" if (path / "records.jsonl").exists() else ""
        raise FileNotFoundError(f"{path}: no canonical records ({RECORDS_DIR}/records-*.jsonl){old}; run the validate stage first")
    return files


def read_records(path: Path, kind: str | None = None, split: str | None = None) -> Iterator[dict]:
    """Yield canonical records (see `record_files` for `path`), optionally only one kind and/or split."""
    for name in record_files(path):
        with open(name, encoding="utf-8") as f:
            for line in f:
                if not line.strip():
                    continue
                record = json.loads(line)
                if kind is not None and record["kind"] != kind:
                    continue
                if split is not None and record["split"] != split:
                    continue
                yield record
