"""Progress lines for long data passes: rows, rows/s, bytes read and the time left, every few seconds.

A data stage over millions of rows otherwise prints nothing for minutes. The lines go to the stage's logger
(the CLI and the flows show INFO), at most one every `every_s` seconds, and one at the end.
"""

from __future__ import annotations

import logging
import time


class Progress:
    CHECK_EVERY = 1024  # rows between clock reads: the counter stays cheap on small rows

    def __init__(self, log: logging.Logger, label: str, total_bytes: int, every_s: float = 10.0, clock=time.monotonic) -> None:
        self.log, self.label, self.total_bytes, self.every_s, self.clock = log, label, total_bytes, every_s, clock
        self.rows = self.bytes = 0
        self.started = self._last = clock()
        self._next_check = self.CHECK_EVERY

    def step(self, nbytes: int = 0, rows: int = 1) -> None:
        """`rows` done (one by default), `nbytes` of input read for them."""
        self.rows += rows
        self.bytes += nbytes
        if self.rows >= self._next_check:
            self._next_check = self.rows + self.CHECK_EVERY
            now = self.clock()
            if now - self._last >= self.every_s:
                self._last = now
                self.log.info("%s", self.line(now))

    def line(self, now: float | None = None, final: bool = False) -> str:
        elapsed = max((self.clock() if now is None else now) - self.started, 1e-9)
        text = f"{self.label}: {self.rows:,} rows, {self.rows / elapsed:,.0f} rows/s"
        if self.total_bytes:
            done = min(self.bytes, self.total_bytes)
            text += f", {done / 1e6:,.0f} of {self.total_bytes / 1e6:,.0f} MB ({done / self.total_bytes:.0%})"
            if not final and done:
                text += f", about {elapsed * (self.total_bytes - done) / done:,.0f} s left"
        return text + (f", {elapsed:,.1f} s" if final else "")

    def done(self) -> None:
        self.log.info("%s", self.line(final=True))
