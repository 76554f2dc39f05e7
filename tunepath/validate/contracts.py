"""The data contracts: Great Expectations suites per kind, run on flat DataFrames.

Conversations and preference pairs get two frames and two suites: one row per message (roles, empty turns,
control text) and one row per record (turn order, length, duplicates). Every expectation is one vectorised
column operation; `unexpected_index_list` maps each failure back to its record.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field

from tunepath.errors import StageError
from tunepath.validate.config import ValidateConfig

log = logging.getLogger(__name__)

CONVERSATION_ORDER = r"^(?:system,)?user(?:,assistant,user)*(?:,assistant)?$"
PROMPT_ORDER = r"^(?:system,)?user(?:,assistant,user)*$"
# "not only whitespace", spelled out: pandas runs `\S` through Python's re row by row, a character class
# through pyarrow's RE2 (about 7x faster). The class holds exactly the characters for which str.isspace() is true.
NOT_BLANK = "[^" + "".join(c for c in map(chr, range(0x3001)) if c.isspace()) + "]"


@dataclass(slots=True)
class ContractInput:
    """One structurally valid record as the contracts see it."""

    kind: str
    fields: dict
    duplicate_of: str | None


@dataclass
class ContractOutcome:
    """Per-record reasons (rejecting) and warnings, plus the GX results per kind."""

    reasons: dict[int, list[str]] = field(default_factory=dict)
    warnings: dict[int, list[str]] = field(default_factory=dict)
    results: dict[str, dict] = field(default_factory=dict)
    summaries: dict[str, dict] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Rule:
    frame: str  # "messages" (one row per message) or "records" (one row per record)
    code: str
    column: str
    expectation: str
    kwargs: tuple = ()
    severity: str = "reject"


def record_chars(kind: str, fields: dict) -> int:
    if kind == "text":
        return len(fields["text"])
    if kind == "conversation":
        return sum(len(m["content"]) for m in fields["messages"])
    return sum(len(m["content"]) for part in ("prompt", "chosen", "rejected") for m in fields[part])


def import_gx():
    gx_log = logging.getLogger("great_expectations")
    if gx_log.level == logging.NOTSET:  # GX logs its internals at INFO, which would drown the stage's own log
        gx_log.setLevel(logging.WARNING)
    import great_expectations

    return great_expectations


def check_contracts(items: list[ContractInput], cfg: ValidateConfig) -> ContractOutcome:
    """Run the suites of every kind present on `items`; reasons are keyed by position in `items`."""
    gx = import_gx()
    outcome = ContractOutcome()
    context = gx.get_context(mode="ephemeral")
    context.variables.progress_bars = {"globally": False}
    source = context.data_sources.add_pandas("tunepath")
    for kind in ("conversation", "preference", "text"):
        positions = [i for i, item in enumerate(items) if item.kind == kind]
        if not positions:
            continue
        kind_items = [items[i] for i in positions]
        if kind == "text":
            frames = {"records": _record_frame(kind_items, kind)}
        else:
            messages, chars = _message_frame(kind_items, kind)
            frames = {"messages": messages, "records": _record_frame(kind_items, kind, chars)}
        for frame_name, (frame, owner, first) in frames.items():
            rules = [rule for rule in _rules(kind, cfg) if rule.frame == frame_name]
            suite = kind if kind == "text" else f"{kind}_{frame_name}"
            result = _run_suite(gx, context, source, suite, frame, rules)
            outcome.results[suite] = _slim(result.to_json_dict())
            summary = outcome.summaries[suite] = {"success": result.success, "rows": len(frame),
                                                  "statistics": dict(result.statistics), "expectations": []}
            by_key = {(rule.code, rule.column): rule for rule in rules}
            for res in result.results:  # GX does not keep the suite's order: match results by their meta
                config = res.expectation_config
                rule = by_key[(config.meta["code"], config.kwargs["column"])]
                if res.exception_info and res.exception_info.get("raised_exception"):
                    raise StageError(f"the {suite} contract '{rule.code}' could not run: {res.exception_info}")
                index = res.result.get("unexpected_index_list") or []
                summary["expectations"].append({
                    "code": rule.code, "expectation": rule.expectation, "column": rule.column,
                    "severity": rule.severity, "success": res.success, "unexpected_count": len(index)})
                target = outcome.reasons if rule.severity == "reject" else outcome.warnings
                for i in index:
                    n = int(owner[i])
                    explanation = _explain(rule.code, kind, kind_items[n], int(i - first[n]), cfg)
                    notes = target.setdefault(positions[n], [])
                    if explanation not in notes:
                        notes.append(explanation)
    return outcome


def _slim(result: dict) -> dict:
    """GX results without the offending values themselves (a 10 MB row would be copied into the JSON)."""
    for res in result.get("results", []):
        details = res.get("result", {})
        details.pop("unexpected_list", None)
        details.pop("unexpected_index_query", None)
        details["partial_unexpected_list"] = [_short(v) for v in details.get("partial_unexpected_list", [])]
        for entry in details.get("partial_unexpected_counts", []):
            entry["value"] = _short(entry.get("value"))
    return result


def _short(value: object, limit: int = 200) -> object:
    return value[:limit] + "..." if isinstance(value, str) and len(value) > limit else value


def _run_suite(gx, context, source, name: str, frame, rules: list[Rule]):
    import great_expectations.expectations as gxe

    batch = source.add_dataframe_asset(name).add_batch_definition_whole_dataframe(name)
    suite = context.suites.add(gx.ExpectationSuite(name=f"tunepath_{name}"))
    for rule in rules:
        cls = getattr(gxe, rule.expectation)
        suite.add_expectation(cls(column=rule.column, meta={"code": rule.code, "severity": rule.severity},
                                  **dict(rule.kwargs)))
    definition = context.validation_definitions.add(gx.ValidationDefinition(name=f"tunepath_{name}", data=batch, suite=suite))
    return definition.run(batch_parameters={"dataframe": frame}, result_format={"result_format": "COMPLETE"})


def _rules(kind: str, cfg: ValidateConfig) -> list[Rule]:
    bounds = {"text": cfg.text_chars, "conversation": cfg.conversation_chars, "preference": cfg.preference_chars}[kind]
    control = "|".join(re.escape(t) for t in cfg.control_tokens)
    regex, in_set = "ExpectColumnValuesToMatchRegex", "ExpectColumnValuesToBeInSet"
    if kind == "text":
        rules = [
            Rule("records", "empty_content", "text", regex, (("regex", NOT_BLANK),)),
            Rule("records", "too_short", "text", "ExpectColumnValueLengthsToBeBetween", (("min_value", bounds.min),)),
            Rule("records", "too_long", "text", "ExpectColumnValueLengthsToBeBetween", (("max_value", bounds.max),)),
            Rule("records", "duplicate", "duplicate_of", "ExpectColumnValuesToBeNull"),
        ]
        content_columns = ("text",)
    else:
        rules = [
            Rule("messages", "unknown_role", "role", in_set, (("value_set", ["system", "user", "assistant"]),)),
            Rule("messages", "empty_content", "question", regex, (("regex", NOT_BLANK),)),
            Rule("messages", "empty_answer", "answer", regex, (("regex", NOT_BLANK),)),
            Rule("records", "too_short", "chars", "ExpectColumnValuesToBeBetween", (("min_value", bounds.min),)),
            Rule("records", "too_long", "chars", "ExpectColumnValuesToBeBetween", (("max_value", bounds.max),)),
            Rule("records", "duplicate", "duplicate_of", "ExpectColumnValuesToBeNull"),
        ]
        content_columns = ("question", "answer")
        if kind == "conversation":
            rules.append(Rule("records", "bad_turn_order", "role_sequence", regex, (("regex", CONVERSATION_ORDER),)))
            if cfg.require_final_assistant:
                rules.append(Rule("records", "last_turn_not_assistant", "role_sequence", regex,
                                  (("regex", r"(?:^|,)assistant$"),)))
        else:
            rules += [
                Rule("records", "bad_turn_order", "role_sequence", regex, (("regex", PROMPT_ORDER),)),
                Rule("records", "bad_answer", "answer_roles", in_set, (("value_set", ["assistant|assistant"]),)),
                Rule("records", "identical_answers", "identical_answers", in_set, (("value_set", [False]),)),
            ]
    if control:
        rules += [Rule("records" if kind == "text" else "messages", "control_token", column,
                       "ExpectColumnValuesToNotMatchRegex", (("regex", control),), severity=cfg.control_token_policy)
                  for column in content_columns]
    return rules


def _parts(kind: str) -> tuple[str, ...]:
    return ("messages",) if kind == "conversation" else ("prompt", "chosen", "rejected")


def _message_frame(items: list[ContractInput], kind: str):
    """One row per message: its role, and its content as `answer` (assistant) or `question` (other roles)."""
    import numpy as np
    import pandas as pd

    parts = _parts(kind)
    messages = [[m for part in parts for m in item.fields[part]] for item in items]
    counts = np.fromiter((len(ms) for ms in messages), dtype=np.int64, count=len(messages))
    first = np.concatenate(([0], np.cumsum(counts)[:-1])).astype(np.int64)
    role = pd.Series([m["role"] for ms in messages for m in ms], dtype="str")
    content = pd.Series([m["content"] for ms in messages for m in ms], dtype="str")
    is_answer = role == "assistant"
    frame = pd.DataFrame({"role": role, "question": content.where(~is_answer), "answer": content.where(is_answer)})
    # every record has at least one message (empty lists are rejected before), so reduceat sums each record
    chars = np.add.reduceat(content.str.len().to_numpy(dtype=np.int64), first) if len(first) else first
    return (frame, np.repeat(np.arange(len(items)), counts), first), chars


def _record_frame(items: list[ContractInput], kind: str, chars=None):
    """One row per record: length in characters, duplicate marker, turn order."""
    import numpy as np
    import pandas as pd

    index = np.arange(len(items))
    duplicate = pd.Series([item.duplicate_of for item in items], dtype="str")
    if kind == "text":
        return pd.DataFrame({"text": pd.Series([item.fields["text"] for item in items], dtype="str"),
                             "duplicate_of": duplicate}), index, index
    parts = _parts(kind)
    columns = {
        "chars": chars,
        "duplicate_of": duplicate,
        "role_sequence": pd.Series([",".join(m["role"] for m in item.fields[parts[0]]) for item in items], dtype="str"),
    }
    if kind == "preference":
        columns["answer_roles"] = pd.Series(
            [",".join(m["role"] for m in item.fields["chosen"]) + "|" + ",".join(m["role"] for m in item.fields["rejected"])
             for item in items], dtype="str")
        columns["identical_answers"] = [item.fields["chosen"] == item.fields["rejected"] for item in items]
    return pd.DataFrame(columns), index, index


def _locate(item: ContractInput, kind: str, offset: int) -> tuple[str, int, dict]:
    """The part name, turn index and message at the record's `offset`-th message."""
    for part in _parts(kind):
        turns = item.fields[part]
        if offset < len(turns):
            return part, offset, turns[offset]
        offset -= len(turns)
    raise IndexError(offset)


def _explain(code: str, kind: str, item: ContractInput, offset: int, cfg: ValidateConfig) -> str:
    fields = item.fields
    bounds = {"text": cfg.text_chars, "conversation": cfg.conversation_chars, "preference": cfg.preference_chars}[kind]
    if kind == "text":
        where, role, content = "text", "text", fields["text"]
    else:
        part, turn, message = _locate(item, kind, offset)
        where, role, content = f"{part}[{turn}]", message["role"], message["content"]
        sequence = ",".join(m["role"] for m in fields[_parts(kind)[0]])
    if code == "unknown_role":
        text = f"{where}.role '{role}' is not system, user or assistant (map it with validate.role_map)"
    elif code in ("empty_content", "empty_answer"):
        text = f"{where} ({role}) is empty or whitespace only"
    elif code == "too_short":
        text = f"the {kind} has {record_chars(kind, fields)} characters, below validate.{kind}_chars.min={bounds.min}"
    elif code == "too_long":
        text = f"the {kind} has {record_chars(kind, fields)} characters, above validate.{kind}_chars.max={bounds.max}"
    elif code == "duplicate":
        text = f"same content as {item.duplicate_of}"
    elif code == "bad_turn_order":
        what = "a conversation" if kind == "conversation" else "a prompt (which must end with a user turn)"
        text = (f"turn order [{sequence}] is not allowed in {what}: an optional system turn first, "
                "then user and assistant alternating, starting with user")
    elif code == "last_turn_not_assistant":
        text = f"the last turn of [{sequence}] is not the assistant's, so SFT has nothing to learn"
    elif code == "bad_answer":
        roles = [",".join(m["role"] for m in fields[p]) for p in ("chosen", "rejected")]
        text = f"chosen is [{roles[0]}] and rejected is [{roles[1]}]; each must be exactly one assistant turn"
    elif code == "identical_answers":
        text = "chosen and rejected are identical, so the pair teaches no preference"
    elif code == "control_token":
        text = f"{where} contains template control text {[t for t in cfg.control_tokens if t in content]}"
    else:
        text = code
    return f"{code}: {text}"
