"""The data contracts: one Great Expectations suite per kind, run on flat DataFrames.

Conversations and preference pairs are exploded to one DataFrame row per message; record-level values (turn
order, length, duplicate) sit on the record's first row and are null elsewhere (GX skips nulls), so every
expectation is one vectorised column operation. `unexpected_index_list` maps each failure back to its record.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field

from tunepath.validate.config import ValidateConfig

log = logging.getLogger(__name__)

CONVERSATION_ORDER = r"^(?:system,)?user(?:,assistant,user)*(?:,assistant)?$"
PROMPT_ORDER = r"^(?:system,)?user(?:,assistant,user)*$"
NOT_BLANK = r"\S"


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
    """Run the suite of every kind present on `items`; reasons are keyed by position in `items`."""
    gx = import_gx()
    outcome = ContractOutcome()
    context = gx.get_context(mode="ephemeral")
    context.variables.progress_bars = {"globally": False}
    source = context.data_sources.add_pandas("tunepath")
    for kind, builder in (("conversation", _message_frame), ("preference", _message_frame), ("text", _text_frame)):
        positions = [i for i, item in enumerate(items) if item.kind == kind]
        if not positions:
            continue
        frame, owner, first = builder([items[i] for i in positions], kind)
        rules = _rules(kind, cfg)
        result = _run_suite(gx, context, source, kind, frame, rules)
        del frame
        outcome.results[kind] = _slim(result.to_json_dict())
        outcome.summaries[kind] = {"success": result.success, "statistics": dict(result.statistics), "expectations": []}
        by_key = {(rule.code, rule.column): rule for rule in rules}
        for res in result.results:  # GX does not keep the suite's order: match results by their meta
            config = res.expectation_config
            rule = by_key[(config.meta["code"], config.kwargs["column"])]
            if res.exception_info and res.exception_info.get("raised_exception"):
                raise RuntimeError(f"the {kind} contract '{rule.code}' could not run: {res.exception_info}")
            index = res.result.get("unexpected_index_list") or []
            outcome.summaries[kind]["expectations"].append({
                "code": rule.code, "expectation": rule.expectation, "column": rule.column,
                "severity": rule.severity, "success": res.success, "unexpected_count": len(index)})
            target = outcome.reasons if rule.severity == "reject" else outcome.warnings
            for i in index:
                n = int(owner[i])
                explanation = _explain(rule.code, kind, items[positions[n]], int(i - first[n]), cfg)
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


def _run_suite(gx, context, source, kind: str, frame, rules: list[Rule]):
    import great_expectations.expectations as gxe

    batch = source.add_dataframe_asset(kind).add_batch_definition_whole_dataframe(kind)
    suite = context.suites.add(gx.ExpectationSuite(name=f"tunepath_{kind}"))
    for rule in rules:
        cls = getattr(gxe, rule.expectation)
        suite.add_expectation(cls(column=rule.column, meta={"code": rule.code, "severity": rule.severity},
                                  **dict(rule.kwargs)))
    definition = context.validation_definitions.add(gx.ValidationDefinition(name=f"tunepath_{kind}", data=batch, suite=suite))
    return definition.run(batch_parameters={"dataframe": frame}, result_format={"result_format": "COMPLETE"})


def _rules(kind: str, cfg: ValidateConfig) -> list[Rule]:
    bounds = {"text": cfg.text_chars, "conversation": cfg.conversation_chars, "preference": cfg.preference_chars}[kind]
    control = "|".join(re.escape(t) for t in cfg.control_tokens)
    if kind == "text":
        rules = [
            Rule("empty_content", "text", "ExpectColumnValuesToMatchRegex", (("regex", NOT_BLANK),)),
            Rule("too_short", "text", "ExpectColumnValueLengthsToBeBetween", (("min_value", bounds.min),)),
            Rule("too_long", "text", "ExpectColumnValueLengthsToBeBetween", (("max_value", bounds.max),)),
            Rule("duplicate", "duplicate_of", "ExpectColumnValuesToBeNull"),
        ]
    else:
        rules = [
            Rule("unknown_role", "role", "ExpectColumnValuesToBeInSet", (("value_set", ["system", "user", "assistant"]),)),
            Rule("empty_content", "question", "ExpectColumnValuesToMatchRegex", (("regex", NOT_BLANK),)),
            Rule("empty_answer", "answer", "ExpectColumnValuesToMatchRegex", (("regex", NOT_BLANK),)),
            Rule("too_short", "chars", "ExpectColumnValuesToBeBetween", (("min_value", bounds.min),)),
            Rule("too_long", "chars", "ExpectColumnValuesToBeBetween", (("max_value", bounds.max),)),
            Rule("duplicate", "duplicate_of", "ExpectColumnValuesToBeNull"),
        ]
        if kind == "conversation":
            rules.append(Rule("bad_turn_order", "role_sequence", "ExpectColumnValuesToMatchRegex",
                              (("regex", CONVERSATION_ORDER),)))
            if cfg.require_final_assistant:
                rules.append(Rule("last_turn_not_assistant", "role_sequence", "ExpectColumnValuesToMatchRegex",
                                  (("regex", r"(?:^|,)assistant$"),)))
        else:
            rules += [
                Rule("bad_turn_order", "role_sequence", "ExpectColumnValuesToMatchRegex", (("regex", PROMPT_ORDER),)),
                Rule("bad_answer", "answer_roles", "ExpectColumnValuesToBeInSet", (("value_set", ["assistant|assistant"]),)),
                Rule("identical_answers", "identical_answers", "ExpectColumnValuesToBeInSet", (("value_set", [False]),)),
            ]
    for column in ("text",) if kind == "text" else ("question", "answer"):
        if control:
            rules.append(Rule("control_token", column, "ExpectColumnValuesToNotMatchRegex", (("regex", control),),
                              severity=cfg.control_token_policy))
    return rules


def _parts(kind: str) -> tuple[str, ...]:
    return ("messages",) if kind == "conversation" else ("prompt", "chosen", "rejected")


def _message_frame(items: list[ContractInput], kind: str):
    """One row per message; record-level columns only on each record's first row (null elsewhere)."""
    import numpy as np
    import pandas as pd

    parts = _parts(kind)
    messages = [[m for part in parts for m in item.fields[part]] for item in items]
    counts = np.fromiter((len(ms) for ms in messages), dtype=np.int64, count=len(messages))
    first = np.concatenate(([0], np.cumsum(counts)[:-1])).astype(np.int64)
    n_rows = int(counts.sum())

    def on_first_rows(values: list, dtype: str):
        column = np.full(n_rows, None, dtype=object)
        column[first] = values
        return pd.Series(column, dtype=dtype)

    role = pd.Series([m["role"] for ms in messages for m in ms], dtype="str")
    content = pd.Series([m["content"] for ms in messages for m in ms], dtype="str")
    chars = np.zeros(n_rows, dtype=np.int64)
    chars[first] = [record_chars(kind, item.fields) for item in items]
    mask = np.ones(n_rows, dtype=bool)
    mask[first] = False
    is_answer = role == "assistant"
    columns = {
        "role": role,
        "question": content.where(~is_answer),
        "answer": content.where(is_answer),
        "role_sequence": on_first_rows([",".join(m["role"] for m in item.fields[parts[0]]) for item in items], "str"),
        "chars": pd.arrays.IntegerArray(chars, mask),
        "duplicate_of": on_first_rows([item.duplicate_of for item in items], "str"),
    }
    if kind == "preference":
        columns["answer_roles"] = on_first_rows(
            [",".join(m["role"] for m in item.fields["chosen"]) + "|" + ",".join(m["role"] for m in item.fields["rejected"])
             for item in items], "str")
        columns["identical_answers"] = on_first_rows(
            [item.fields["chosen"] == item.fields["rejected"] for item in items], "boolean")
    owner = np.repeat(np.arange(len(items)), counts)
    return pd.DataFrame(columns), owner, first


def _text_frame(items: list[ContractInput], kind: str):
    import numpy as np
    import pandas as pd

    frame = pd.DataFrame({"text": pd.Series([item.fields["text"] for item in items], dtype="str"),
                          "duplicate_of": pd.Series([item.duplicate_of for item in items], dtype="str")})
    return frame, np.arange(len(items)), np.arange(len(items))


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
