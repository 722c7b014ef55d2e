"""The live progress line: requests done, tokens/s, blocks in use, pressure.

On a terminal it is one line rewritten in place with ``\\r`` (at most ten
times a second, so drawing costs nothing next to a step); elsewhere (a
pipe, a log file, a test's buffer) it prints a plain line at each quarter
of the run, since carriage returns would garble a log.
"""

from __future__ import annotations

import time
from typing import TextIO

from .scheduler import StepRecord

__all__ = ["Progress"]

BAR_WIDTH = 24
REDRAW_SECONDS = 0.1


def _isatty(out: TextIO) -> bool:
    isatty = getattr(out, "isatty", None)
    try:
        return bool(isatty()) if callable(isatty) else False
    except ValueError:  # a closed stream
        return False


class Progress:
    """Feed it every :class:`StepRecord`; call :meth:`close` when the run ends."""

    def __init__(self, out: TextIO, total_requests: int, total_blocks: int, enabled: bool = True) -> None:
        self.out = out
        self.total = total_requests
        self.blocks = total_blocks
        self.live = enabled and _isatty(out)
        self.plain = enabled and not self.live
        self.start = time.perf_counter()
        self.generated = 0
        self._drawn = 0.0
        self._quarter = 0
        self._width = 0

    def line(self, record: StepRecord) -> str:
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        done = record.finished
        filled = BAR_WIDTH * done // max(1, self.total)
        return (f"[{'#' * filled}{'.' * (BAR_WIDTH - filled)}] {done}/{self.total} requests  "
                f"{self.generated / elapsed:,.0f} tok/s  blocks {record.used_blocks}/{self.blocks}  "
                f"pressure {record.level.name:<8}  step {record.step}")

    def update(self, record: StepRecord) -> None:
        self.generated += record.generated
        if self.live:
            now = time.perf_counter()
            if now - self._drawn >= REDRAW_SECONDS or record.finished == self.total:
                text = self.line(record)
                self.out.write("\r" + text.ljust(self._width))
                self.out.flush()
                self._width, self._drawn = len(text), now
        elif self.plain:
            quarter = 4 * record.finished // max(1, self.total)
            if quarter > self._quarter:
                self._quarter = quarter
                self.out.write(self.line(record).rstrip() + "\n")

    def close(self) -> None:
        if self.live and self._width:
            self.out.write("\n")
            self.out.flush()
