"""JSON text inside rows: every way it can fail to parse is a reason for that row, never an exception for the stage.

Python refuses to convert integers of more than `sys.get_int_max_str_digits()` digits (4,300 by default) and
`json.loads` raises a plain ValueError for them, which is not a JSONDecodeError: callers catch `PARSE_ERRORS` and
ask `huge_integer_reason` for the field that holds the number.
"""

from __future__ import annotations

import json
import sys

# JSONDecodeError is a ValueError, and so is the integer digit limit; too deep a nesting is a RecursionError
PARSE_ERRORS = (ValueError, RecursionError)


class _Huge:
    __slots__ = ("digits",)

    def __init__(self, digits: int) -> None:
        self.digits = digits


def _lenient_decoder(limit: int) -> json.JSONDecoder:
    def parse_int(s: str):
        digits = len(s.lstrip("-"))
        return _Huge(digits) if digits > limit else int(s)

    return json.JSONDecoder(parse_int=parse_int)


def _first_huge(value: object) -> tuple[str, int] | None:
    """The path ('a.b[2]') and digit count of the first huge integer in document order; iterative, so depth is free."""
    stack = [(value, "")]
    while stack:
        v, path = stack.pop()
        if isinstance(v, _Huge):
            return path, v.digits
        if isinstance(v, dict):
            stack.extend((child, f"{path}.{key}" if path else str(key)) for key, child in reversed(v.items()))
        elif isinstance(v, list):
            stack.extend((child, f"{path}[{i}]") for i, child in reversed(list(enumerate(v))))
    return None


def is_digit_limit(error: BaseException) -> bool:
    return isinstance(error, ValueError) and not isinstance(error, json.JSONDecodeError)


def huge_integer(text: str, pos: int = 0) -> tuple[str, int, int] | None:
    """(path, digits, end) of the first integer past the digit limit in the JSON value at text[pos:]; None when the
    text holds none (or is malformed for another reason)."""
    limit = sys.get_int_max_str_digits()
    try:
        value, end = _lenient_decoder(limit).raw_decode(text, json.decoder.WHITESPACE.match(text, pos).end())
    except PARSE_ERRORS:
        return None
    found = _first_huge(value)
    return (found[0], found[1], end) if found else None


def huge_integer_message(path: str, digits: int, where: str = "") -> str:
    field = ".".join(p for p in (where, path) if p).replace(".[", "[")
    at = f"field '{field}' holds" if field else "the row is"
    return (f"huge_integer: {at} an integer of {digits:,} digits, more than the {sys.get_int_max_str_digits():,} "
            "digits Python converts (sys.get_int_max_str_digits); write such a number as a string")


def huge_integer_reason(error: BaseException, text: str, where: str = "") -> str | None:
    """The row's reason when `error` (raised by json.loads(text)) is the integer digit limit, else None."""
    if not is_digit_limit(error):
        return None
    found = huge_integer(text)
    if found is None:
        return f"huge_integer: {where or 'the row'}: {error}"
    return huge_integer_message(found[0], found[1], where)
