"""The data contracts: Great Expectations suites per kind, run on flat DataFrames.

Conversations and preference pairs get two frames and two suites: one row per message (roles, empty turns,
control text) and one row per record (turn order, length, duplicates). Every expectation is one vectorised
column operation; `unexpected_index_list` maps each failure back to its record.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass, field

from tunepath.errors import StageError
from tunepath.validate.config import ValidateConfig

log = logging.getLogger(__name__)

# Role sequences as the records frame spells them: an assistant turn with tool calls is "call", and its
# results ("tool") follow it; an answer may take several call rounds before it is given.
_ROUNDS = r"(?:call(?:,tool)+,)*"
_ANSWER = _ROUNDS + "assistant"
_LAST = _ROUNDS + r"(?:assistant|call)"
CONVERSATION_ORDER = rf"^(?:system,)?user(?:,{_ANSWER},user)*(?:,{_LAST})?$"
PROMPT_ORDER = rf"^(?:system,)?user(?:,{_ANSWER},user)*(?:,call(?:,tool)+)*$"
FINAL_ANSWER = r"(?:^|,)(?:assistant|call)$"
ROLES = ["system", "user", "assistant", "tool"]
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


def message_chars(m: dict) -> int:
    """Characters of one message: content, plus reasoning and call arguments when it has them."""
    n = len(m["content"])
    if len(m) > 2:
        n += len(m.get("reasoning", "")) + sum(len(c["name"]) + len(c["arguments"]) for c in m.get("tool_calls", ()))
    return n


def record_chars(kind: str, fields: dict) -> int:
    if kind == "text":
        return len(fields["text"])
    return sum(message_chars(m) for part in _parts(kind) for m in fields[part])


def _bounds(kind: str, cfg: ValidateConfig):
    """Length bounds per kind; feedback rows are conversations and share their bounds."""
    return {"text": cfg.text_chars, "conversation": cfg.conversation_chars, "feedback": cfg.conversation_chars,
            "preference": cfg.preference_chars}[kind]


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
    for kind in ("conversation", "preference", "feedback", "text"):
        positions = [i for i, item in enumerate(items) if item.kind == kind]
        if not positions:
            continue
        kind_items = [items[i] for i in positions]
        if kind == "text":
            frames = {"records": _record_frame(kind_items, kind, cfg=cfg)}
        else:
            messages, chars = _message_frame(kind_items, kind)
            frames = {"messages": messages, "records": _record_frame(kind_items, kind, chars, cfg)}
            calls = _call_frame(kind_items, kind)
            if calls is not None:
                frames["calls"] = calls
        for frame_name, (frame, owner, first) in frames.items():
            rules = [rule for rule in _rules(kind, cfg) if rule.frame == frame_name]
            suite = kind if kind == "text" else f"{kind}_{frame_name}"
            result = _run_suite(gx, suite, frame, rules)
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
                    explanation = _explain(rule.code, kind, kind_items[n], int(i - first[n]), cfg, frame_name)
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


# One ephemeral context per process and one validation definition per suite and rules: the stage runs the suites
# once per chunk, and building a context and its suites costs more than checking a small chunk.
_GX: dict = {}


def _run_suite(gx, name: str, frame, rules: list[Rule]):
    import great_expectations.expectations as gxe

    if "context" not in _GX:
        context = gx.get_context(mode="ephemeral")
        context.variables.progress_bars = {"globally": False}
        _GX.update(context=context, source=context.data_sources.add_pandas("tunepath"), definitions={})
    context, definitions = _GX["context"], _GX["definitions"]
    key = (name, repr(rules))
    definition = definitions.get(key)
    if definition is None:
        same = sum(1 for known, _ in definitions if known == name)
        asset = f"{name}_{same}" if same else name  # another config's rules under the same name need their own asset
        batch = _GX["source"].add_dataframe_asset(asset).add_batch_definition_whole_dataframe(asset)
        suite = context.suites.add(gx.ExpectationSuite(name=f"tunepath_{asset}"))
        for rule in rules:
            cls = getattr(gxe, rule.expectation)
            suite.add_expectation(cls(column=rule.column, meta={"code": rule.code, "severity": rule.severity},
                                      **dict(rule.kwargs)))
        definition = definitions[key] = context.validation_definitions.add(
            gx.ValidationDefinition(name=f"tunepath_{asset}", data=batch, suite=suite))
    return definition.run(batch_parameters={"dataframe": frame}, result_format={"result_format": "COMPLETE"})


def _rules(kind: str, cfg: ValidateConfig) -> list[Rule]:
    bounds = _bounds(kind, cfg)
    control = "|".join(re.escape(t) for t in cfg.control_tokens)
    regex, in_set = "ExpectColumnValuesToMatchRegex", "ExpectColumnValuesToBeInSet"
    if kind == "text":
        rules = [
            Rule("records", "empty_content", "text", regex, (("regex", NOT_BLANK),)),
            Rule("records", "too_short", "text", "ExpectColumnValueLengthsToBeBetween", (("min_value", bounds.min),)),
            Rule("records", "duplicate", "duplicate_of", "ExpectColumnValuesToBeNull"),
        ]
        if cfg.long_text == "reject":  # else long documents are chunked after the contracts
            rules.append(Rule("records", "too_long", "text", "ExpectColumnValueLengthsToBeBetween", (("max_value", bounds.max),)))
        content_columns = ("text",)
    else:
        rules = [
            Rule("messages", "unknown_role", "role", in_set, (("value_set", ROLES),)),
            Rule("messages", "empty_content", "question", regex, (("regex", NOT_BLANK),)),
            Rule("messages", "empty_answer", "answer", regex, (("regex", NOT_BLANK),)),
            Rule("messages", "dangling_tool_result", "follows_call", in_set, (("value_set", [True]),)),
            Rule("calls", "bad_arguments", "arguments_object", in_set, (("value_set", [True]),)),
            Rule("calls", "undeclared_tool", "declared", in_set, (("value_set", [True]),)),
            Rule("records", "too_short", "chars", "ExpectColumnValuesToBeBetween", (("min_value", bounds.min),)),
            Rule("records", "too_long", "chars", "ExpectColumnValuesToBeBetween", (("max_value", bounds.max),)),
            Rule("records", "duplicate", "duplicate_of", "ExpectColumnValuesToBeNull"),
        ]
        content_columns = ("question", "answer")
        if kind in ("conversation", "feedback"):
            rules.append(Rule("records", "bad_turn_order", "role_sequence", regex, (("regex", CONVERSATION_ORDER),)))
            if cfg.require_final_assistant or kind == "feedback":  # feedback judges the final answer
                rules.append(Rule("records", "last_turn_not_assistant", "role_sequence", regex, (("regex", FINAL_ANSWER),)))
            if kind == "feedback":
                rules.append(Rule("records", "bad_label", "label", in_set, (("value_set", ["true", "false"]),)))
        else:
            rules += [
                Rule("records", "bad_turn_order", "role_sequence", regex, (("regex", PROMPT_ORDER),)),
                Rule("records", "bad_answer", "answer_roles", in_set,
                     (("value_set", ["assistant|assistant", "call|assistant", "assistant|call", "call|call"]),)),
                Rule("records", "identical_answers", "identical_answers", in_set, (("value_set", [False]),)),
            ]
    if control:
        rules += [Rule("records" if kind == "text" else "messages", "control_token", column,
                       "ExpectColumnValuesToNotMatchRegex", (("regex", control),), severity=cfg.control_token_policy)
                  for column in content_columns]
    return rules


def _parts(kind: str) -> tuple[str, ...]:
    return ("prompt", "chosen", "rejected") if kind == "preference" else ("messages",)


def _turn_token(m: dict) -> str:
    return "call" if m["role"] == "assistant" and m.get("tool_calls") else m["role"]


def _follows_call(messages: list[dict]) -> list:
    """Per message: None unless it is a tool result; then whether a call it can answer comes before it (same id
    when both carry one)."""
    out: list = []
    calls: list[dict] | None = None
    for m in messages:
        role = m["role"]
        if role != "tool":
            out.append(None)
            calls = m.get("tool_calls") or None
            continue
        if not calls:
            out.append(False)
            continue
        call_id = m.get("tool_call_id")
        ids = [c["id"] for c in calls if c["id"] is not None]
        out.append(call_id is None or not ids or call_id in ids)
    return out


def _message_frame(items: list[ContractInput], kind: str):
    """One row per message: its role, its content as `answer` (assistant) or `question` (other roles), and for tool
    results whether they follow a call. An assistant turn that only calls tools has no answer text to check."""
    import numpy as np
    import pandas as pd

    parts = _parts(kind)
    messages = [[m for part in parts for m in item.fields[part]] for item in items]
    counts = np.fromiter((len(ms) for ms in messages), dtype=np.int64, count=len(messages))
    first = np.concatenate(([0], np.cumsum(counts)[:-1])).astype(np.int64)
    flat = [m for ms in messages for m in ms]
    role = pd.Series([m["role"] for m in flat], dtype="str")
    content = pd.Series([m["content"] for m in flat], dtype="str")
    is_answer = role == "assistant"
    answer = content.where(is_answer)
    rich = [i for i, m in enumerate(flat) if len(m) > 2]  # tool calls, reasoning, tool results: the few slow rows
    follows = None
    extra = np.zeros(len(flat), dtype=np.int64)
    if rich:
        follows = [None] * len(flat)
        offset = 0
        for item in items:
            for part in parts:
                turns = item.fields[part]
                if any(len(m) > 2 for m in turns):
                    follows[offset:offset + len(turns)] = _follows_call(turns)
                offset += len(turns)
        calls_only = [i for i in rich if flat[i].get("tool_calls") and not flat[i]["content"]]
        if calls_only:
            answer.iloc[calls_only] = None
        for i in rich:
            extra[i] = message_chars(flat[i]) - len(flat[i]["content"])
    frame = pd.DataFrame({"role": role, "question": content.where(~is_answer), "answer": answer,
                          "follows_call": pd.Series(follows if follows is not None else [None] * len(flat), dtype="object")})
    # every record has at least one message (empty lists are rejected before), so reduceat sums each record
    lengths = content.str.len().to_numpy(dtype=np.int64) + extra
    chars = np.add.reduceat(lengths, first) if len(first) else first
    return (frame, np.repeat(np.arange(len(items)), counts), first), chars


def _call_frame(items: list[ContractInput], kind: str):
    """One row per tool call: do its arguments parse as a JSON object, does it name a tool the row declares."""
    import numpy as np
    import pandas as pd

    from tunepath.validate.messages import tool_names

    parts = _parts(kind)
    owner, objects, declared = [], [], []
    for n, item in enumerate(items):
        calls = [c for part in parts for m in item.fields[part] if len(m) > 2 for c in m.get("tool_calls", ())]
        if not calls:
            continue
        names = tool_names(item.fields.get("tools"))
        for call in calls:
            owner.append(n)
            objects.append(_is_object(call["arguments"]))
            declared.append(None if names is None else call["name"] in names)
    if not owner:
        return None
    owner = np.array(owner, dtype=np.int64)
    first = np.zeros(len(items), dtype=np.int64)
    starts = np.flatnonzero(np.r_[True, owner[1:] != owner[:-1]])
    first[owner[starts]] = starts
    frame = pd.DataFrame({"arguments_object": pd.Series(objects, dtype="object"),
                          "declared": pd.Series(declared, dtype="object")})
    return frame, owner, first


def _is_object(arguments: str) -> bool:
    try:
        return isinstance(json.loads(arguments), dict)
    except (ValueError, RecursionError):  # ValueError: also an integer past Python's digit limit
        return False


def _label_text(label: object) -> str:
    """Labels as text, so that 1 and 0 (which pandas compares equal to True and False) are not booleans."""
    if isinstance(label, bool):
        return "true" if label else "false"
    return json.dumps(label, ensure_ascii=False, default=str)


def _record_frame(items: list[ContractInput], kind: str, chars=None, cfg: ValidateConfig | None = None):
    """One row per record: length in characters, duplicate marker, turn order (and the label of feedback)."""
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
        "role_sequence": pd.Series([",".join(map(_turn_token, item.fields[parts[0]])) for item in items], dtype="str"),
    }
    if kind == "preference":
        columns["answer_roles"] = pd.Series(
            [",".join(map(_turn_token, item.fields["chosen"])) + "|" + ",".join(map(_turn_token, item.fields["rejected"]))
             for item in items], dtype="str")
        columns["identical_answers"] = [item.fields["chosen"] == item.fields["rejected"] for item in items]
    if kind == "feedback":
        columns["label"] = pd.Series([_label_text(item.fields["label"]) for item in items], dtype="str")
    return pd.DataFrame(columns), index, index


def _locate(item: ContractInput, kind: str, offset: int) -> tuple[str, int, dict]:
    """The part name, turn index and message at the record's `offset`-th message."""
    for part in _parts(kind):
        turns = item.fields[part]
        if offset < len(turns):
            return part, offset, turns[offset]
        offset -= len(turns)
    raise IndexError(offset)


def _locate_call(item: ContractInput, kind: str, offset: int) -> tuple[str, dict]:
    """Where the record's `offset`-th tool call is (`messages[2].tool_calls[0]`) and the call."""
    for part in _parts(kind):
        for turn, m in enumerate(item.fields[part]):
            calls = m.get("tool_calls", ())
            if offset < len(calls):
                return f"{part}[{turn}].tool_calls[{offset}]", calls[offset]
            offset -= len(calls)
    raise IndexError(offset)


def _explain(code: str, kind: str, item: ContractInput, offset: int, cfg: ValidateConfig, frame: str = "messages") -> str:
    fields = item.fields
    bounds = _bounds(kind, cfg)
    if frame == "calls":
        where, call = _locate_call(item, kind, offset)
        if code == "bad_arguments":
            text = f"{where}.arguments of '{call['name']}' is not a JSON object: {_short(call['arguments'], 80)!r}"
        else:
            from tunepath.validate.messages import tool_names

            declared = sorted(tool_names(fields.get("tools")) or ())
            text = f"{where} calls '{call['name']}', which is not among the row's tools {declared}"
        return f"{code}: {text}"
    if kind == "text":
        where, role, content = "text", "text", fields["text"]
    else:
        sequence = ",".join(map(_turn_token, fields[_parts(kind)[0]]))
        if frame == "messages":
            part, turn, message = _locate(item, kind, offset)
            where, role, content = f"{part}[{turn}]", message["role"], message["content"]
    if code == "unknown_role":
        text = f"{where}.role '{role}' is not system, user, assistant or tool (map it with validate.role_map)"
    elif code in ("empty_content", "empty_answer"):
        text = f"{where} ({role}) is empty or whitespace only"
    elif code == "dangling_tool_result":
        text = (f"{where} is a tool result (name {message.get('name')!r}, tool_call_id {message.get('tool_call_id')!r}) "
                "that answers no tool call: the assistant turn before it makes no call with that id")
    elif code == "too_short":
        text = f"the {kind} has {record_chars(kind, fields)} characters, below validate.{_bound_name(kind)}.min={bounds.min}"
    elif code == "too_long":
        text = f"the {kind} has {record_chars(kind, fields)} characters, above validate.{_bound_name(kind)}.max={bounds.max}"
    elif code == "duplicate":
        text = f"same content as {item.duplicate_of}"
    elif code == "bad_turn_order":
        what = "a prompt (which must end with a user turn or tool results)" if kind == "preference" else f"a {kind}"
        text = (f"turn order [{sequence}] is not allowed in {what}: an optional system turn first, then user and "
                "assistant alternating, starting with user; tool results ('tool') follow an assistant turn that calls "
                "tools ('call')")
    elif code == "last_turn_not_assistant":
        why = "so there is no answer to judge" if kind == "feedback" else "so SFT has nothing to learn"
        text = f"the last turn of [{sequence}] is not the assistant's, {why}"
    elif code == "bad_label":
        label = fields["label"]
        text = (f"label is {_label_text(label)} ({type(label).__name__}), expected true or false (unpaired feedback); "
                "if the column means something else, force the file's format (validate.file_formats) or map "
                "validate.field_map.label to another name")
    elif code == "bad_answer":
        roles = [",".join(map(_turn_token, fields[p])) for p in ("chosen", "rejected")]
        text = f"chosen is [{roles[0]}] and rejected is [{roles[1]}]; each must be exactly one assistant turn"
    elif code == "identical_answers":
        text = "chosen and rejected are identical, so the pair teaches no preference"
    elif code == "control_token":
        text = f"{where} contains template control text {[t for t in cfg.control_tokens if t in content]}"
    else:
        text = code
    return f"{code}: {text}"


def _bound_name(kind: str) -> str:
    return "conversation_chars" if kind == "feedback" else f"{kind}_chars"
