"""Which exceptions are the user's to fix (one line, exit 2) rather than bugs (a traceback).

Bad input and settings raise ValueError (or a subclass: ConfigError, ProfileError, ...); missing or unreadable
files OSError; a stage that stops for a reason the user can act on (a failed gate, CUDA out of memory, a
server that did not start) raises StageError. Anything else, a RuntimeError from torch included, is a bug or
a fault of the machine and keeps its traceback.
"""

from __future__ import annotations


class StageError(RuntimeError):
    """A stage stopped for a reason the user can act on; the message says what and which setting to change."""


USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, OSError, NotImplementedError, StageError)


def describe(e: BaseException) -> str:
    """The first line of the error (its type's name when it has no message)."""
    text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return text
