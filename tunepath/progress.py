"""Progress a person can watch: a bar with ETA and rate on a terminal, a plain log line about every 5% elsewhere.

    with Progress(60, "train sft", unit="step") as bar:
        for step in ...:
            bar.update(1, tokens=n, loss=0.61)   # tokens: the rate shown is tokens/s

Either way the `tunepath.progress` logger gets about `lines` lines per bar (the first, then every 1/lines of the
total, and the last), each with the count, the elapsed time, the ETA and the rate: a log file, DVC's output or
the Prefect UI reads the same story. On a terminal (stderr is a TTY) a tqdm bar shows instead: those lines carry
`progress_bar=True`, which `tunepath.logs` keeps off the terminal, and every other record printed while the bar
shows goes above it (tqdm's logging redirect), so the bar is never torn.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import time
from collections.abc import Iterator

log = logging.getLogger(__name__)


def interactive() -> bool:
    """Whether a person watches this process's stderr (a bar makes sense there and nowhere else)."""
    stream = sys.stderr
    return bool(stream) and hasattr(stream, "isatty") and stream.isatty()


def _prints_to_console(handler: logging.Handler) -> bool:
    return isinstance(handler, logging.StreamHandler) and getattr(handler, "stream", None) in (sys.stdout, sys.stderr)


def clock(seconds: float) -> str:
    """1:05 or 1:02:05."""
    seconds = max(0, int(round(seconds)))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"


class Progress:
    """A bar (terminal) or periodic log lines (anywhere else) for `total` units of work."""

    def __init__(self, total: int, what: str, unit: str = "step", *, initial: int = 0, lines: int = 20,
                 bar: bool | None = None, logger: logging.Logger | None = None, on_bar: tuple[str, ...] | None = None) -> None:
        """on_bar: the fields the bar shows beside tokens/s (default all; the lines always have all of them)."""
        self.total, self.what, self.unit = max(int(total), 0), what, unit
        # `initial`: units done before this process started (a resumed training); the ETA counts only this run's pace
        self.initial = self.done = self.reported = int(initial)
        self.tokens, self.fields = 0, {}
        self.started = time.perf_counter()
        self.every = max(1, self.total // max(lines, 1))
        self.first = True
        self.log = logger or log
        self.on_bar = on_bar
        self._bar = self._redirect = None
        if interactive() if bar is None else bar:
            from tqdm import tqdm
            from tqdm.contrib.logging import logging_redirect_tqdm

            if any(_prints_to_console(h) for h in logging.getLogger().handlers):
                self._redirect = logging_redirect_tqdm(loggers=[logging.getLogger()])
                self._redirect.__enter__()
            self._bar = tqdm(total=self.total, initial=self.initial, desc=what, unit=unit, dynamic_ncols=True, leave=True,
                             file=sys.stderr)

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc) -> None:
        self.close(failed=exc[0] is not None)

    def rate(self) -> float | None:
        """Tokens per second since the start (None when no tokens were counted)."""
        seconds = time.perf_counter() - self.started
        return self.tokens / seconds if self.tokens and seconds > 0 else None

    def update(self, n: int = 1, tokens: int = 0, tokens_per_second: float | None = None, **fields) -> None:
        """`n` more units done; `tokens` more tokens processed, or the caller's own `tokens_per_second`; `fields`
        (loss=..., lr=...) are shown beside the bar and in the lines."""
        self.done += n
        self.tokens += tokens
        self.fields = {**fields, "tokens/s": tokens_per_second if tokens_per_second is not None else self.rate()}
        if self._bar is not None:
            self._bar.set_postfix_str(self._postfix(self.on_bar), refresh=False)
            self._bar.update(n)
        if self.first or (self.done != self.reported and (self.done >= self.total or self.done // self.every != self.reported // self.every)):
            self._report()

    def _report(self) -> None:
        self.reported, self.first = self.done, False
        self.log.info("%s", self.line(), extra={"progress_bar": self._bar is not None})

    def line(self) -> str:
        """'train sft: 24/60 steps (40%), 0:43 elapsed, ETA 1:05, loss 0.649, 1,681 tokens/s'."""
        elapsed = time.perf_counter() - self.started
        share = self.done / self.total if self.total else 1.0
        pace = (self.done - self.initial) / elapsed if elapsed > 0 else 0.0
        eta = f", ETA {clock((self.total - self.done) / pace)}" if pace > 0 and share < 1 else ""
        postfix = self._postfix()
        return (f"{self.what}: {self.done}/{self.total} {self.unit}s ({share:.0%}), {clock(elapsed)} elapsed{eta}"
                + (f", {postfix}" if postfix else ""))

    def _postfix(self, keys: tuple[str, ...] | None = None) -> str:
        parts = []
        for key, value in self.fields.items():
            if value is None or (keys is not None and key not in keys and key != "tokens/s"):
                continue
            if key == "tokens/s":
                parts.append(f"{value:,.0f} tokens/s")
            elif isinstance(value, float):
                parts.append(f"{key} {value:.4g}")
            else:
                parts.append(f"{key} {value}")
        return ", ".join(parts)

    def close(self, failed: bool = False) -> None:
        if not failed and self.total and (self.reported != self.done or self.first):
            self._report()  # the last line always says where it ended
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        if self._redirect is not None:
            self._redirect.__exit__(None, None, None)
            self._redirect = None


@contextlib.contextmanager
def datasets_bars_off() -> Iterator[None]:
    """No bars from `datasets` inside (its "Saving the dataset" bar per split says nothing the stage's line does not)."""
    from datasets.utils.tqdm import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

    was_off = are_progress_bars_disabled()
    disable_progress_bars()
    try:
        yield
    finally:
        if not was_off:
            enable_progress_bars()


class DataPass:
    """Progress lines for a long data pass: rows, rows/s, bytes read and the time left, at most one every
    `every_s` seconds and one at the end, to the stage's logger (a data stage over millions of rows otherwise
    prints nothing for minutes)."""


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
