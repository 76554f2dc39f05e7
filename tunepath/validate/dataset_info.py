"""LLaMA-Factory's `dataset_info.json`: what each file of a data folder holds, read instead of guessing.

An entry names its file (`file_name`), its `formatting` (alpaca or sharegpt), whether it holds pairs
(`ranking`), and how its columns and role tags are spelled (`columns`, `tags`). Each becomes a `FileSpec`: the
format for the normaliser plus the field and role maps that translate the file's names to ours. Entries
without a local `file_name` (hub or cloud data sets) describe nothing in the folder and are skipped.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from tunepath.validate.config import DataValidationError
from tunepath.validate.readers import DATASET_INFO

# LLaMA-Factory column name -> our canonical field name, per formatting
ALPACA_COLUMNS = {"prompt": "instruction", "query": "input", "response": "output", "history": "history",
                  "system": "system", "tools": "tools", "chosen": "chosen", "rejected": "rejected", "kto_tag": "kto_tag"}
SHAREGPT_COLUMNS = {"system": "system", "tools": "tools", "chosen": "chosen", "rejected": "rejected", "kto_tag": "kto_tag"}
SHAREGPT_TAGS = {"role_tag": "from", "content_tag": "value", "user_tag": "human", "assistant_tag": "gpt",
                 "observation_tag": "observation", "function_tag": "function_call", "system_tag": "system"}
TAG_ROLES = {"user_tag": "user", "assistant_tag": "assistant", "observation_tag": "tool",
             "function_tag": "function_call", "system_tag": "system"}


@dataclass(frozen=True)
class FileSpec:
    """How to read one file, from its dataset_info.json entry."""

    entry: str
    fmt: str
    field_map: dict[str, str] = field(default_factory=dict)
    role_map: dict[str, str] = field(default_factory=dict)
    text_split: str | None = None  # LLaMA-Factory reads a .txt file as one document per line


def read_dataset_info(raw_dir: Path) -> tuple[dict[Path, FileSpec], list[str]]:
    """Specs of the files described by every dataset_info.json under raw_dir, and warnings (entries whose file is
    missing). A malformed dataset_info.json is an error naming the file and entry."""
    specs: dict[Path, FileSpec] = {}
    warnings: list[str] = []
    for info_path in sorted(raw_dir.rglob(DATASET_INFO)):
        if any(part.startswith(".") for part in info_path.relative_to(raw_dir).parts):
            continue
        if not info_path.is_file():  # a FIFO would block the read forever; the file listing names it
            continue
        try:
            info = json.loads(info_path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise DataValidationError(f"{info_path} line {e.lineno}: invalid JSON ({e.msg})") from e
        except (OSError, UnicodeDecodeError) as e:
            raise DataValidationError(f"cannot read {info_path}: {getattr(e, 'strerror', None) or e}") from e
        if not isinstance(info, dict):
            raise DataValidationError(f"{info_path}: expected an object of data set entries, got {type(info).__name__}")
        for name, entry in info.items():
            if not isinstance(entry, dict):
                raise DataValidationError(f"{info_path}: entry '{name}' is not an object")
            file_name = entry.get("file_name")
            if not file_name:
                continue  # a hub, ModelScope or cloud data set: nothing here to read
            target = info_path.parent / file_name
            spec = entry_spec(name, entry, info_path)
            if target.is_dir():
                specs.update({p: _for_file(spec, p) for p in sorted(target.rglob("*")) if p.is_file()})
            elif target.is_file():
                specs[target] = _for_file(spec, target)
            else:
                warnings.append(f"{info_path}: entry '{name}' names {file_name}, which is not in the folder")
    return specs, warnings


def _for_file(spec: FileSpec, path: Path) -> FileSpec:
    if path.suffix.lower() == ".txt":
        return FileSpec(spec.entry, spec.fmt, spec.field_map, spec.role_map, "line")
    return spec


def entry_spec(name: str, entry: dict, where: Path) -> FileSpec:
    formatting = entry.get("formatting", "alpaca")
    columns = entry.get("columns") or {}
    tags = entry.get("tags") or {}
    if not isinstance(columns, dict) or not isinstance(tags, dict):
        raise DataValidationError(f"{where}: entry '{name}': 'columns' and 'tags' must be objects")
    ranking = bool(entry.get("ranking"))
    feedback = "kto_tag" in columns
    if formatting == "alpaca":
        if set(columns) <= {"prompt"} and columns and not ranking:
            return FileSpec(name, "text", {"text": columns["prompt"]})  # pretraining text (LLaMA-Factory's pt stage)
        field_map = {ALPACA_COLUMNS[k]: v for k, v in columns.items() if k in ALPACA_COLUMNS}
        return FileSpec(name, "preference" if ranking else "feedback" if feedback else "alpaca", field_map)
    if formatting in ("sharegpt", "openai"):
        defaults = SHAREGPT_TAGS if formatting == "sharegpt" else {
            **SHAREGPT_TAGS, "role_tag": "role", "content_tag": "content", "user_tag": "user", "assistant_tag": "assistant",
            "observation_tag": "tool"}
        tag = {**defaults, **tags}
        messages = columns.get("messages", "conversations" if formatting == "sharegpt" else "messages")
        field_map = {"conversations": messages, "messages": messages, "role": tag["role_tag"], "from": tag["role_tag"],
                     "content": tag["content_tag"], "value": tag["content_tag"]}
        field_map.update({SHAREGPT_COLUMNS[k]: v for k, v in columns.items() if k in SHAREGPT_COLUMNS})
        role_map = {tag[k]: role for k, role in TAG_ROLES.items() if tag.get(k)}
        return FileSpec(name, "preference" if ranking else "feedback" if feedback else "sharegpt", field_map, role_map)
    raise DataValidationError(
        f"{where}: entry '{name}' has formatting {formatting!r}; tunepath reads 'alpaca', 'sharegpt' and 'openai'")
