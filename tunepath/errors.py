"""Which exceptions are the user's to fix (one line, exit 2) rather than bugs (a traceback)."""

from __future__ import annotations

USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, FileNotFoundError, NotImplementedError, RuntimeError, OSError)


def describe(e: BaseException) -> str:
    """The first line of the error, with its type when the message alone would be unclear."""
    text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return text
