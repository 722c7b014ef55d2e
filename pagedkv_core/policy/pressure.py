"""Memory pressure: levels from utilization watermarks, callbacks on each change."""

from __future__ import annotations

import enum
import time
from collections.abc import Callable

from ..config import PressureThresholds

__all__ = ["MemoryPressure", "PressureMonitor", "PressureCallback"]


class MemoryPressure(enum.IntEnum):
    """How full the device pool is; ordered, so ``level >= MemoryPressure.HIGH`` reads naturally."""

    LOW = 0
    MEDIUM = 1
    HIGH = 2
    CRITICAL = 3

    @classmethod
    def from_utilization(cls, utilization: float, thresholds: PressureThresholds) -> MemoryPressure:
        if utilization >= thresholds.critical:
            return cls.CRITICAL
        if utilization >= thresholds.high:
            return cls.HIGH
        if utilization >= thresholds.medium:
            return cls.MEDIUM
        return cls.LOW


PressureCallback = Callable[[MemoryPressure, MemoryPressure], None]


class PressureMonitor:
    """Tracks the level, calls back on every change, and times each level.

    Callbacks receive ``(new_level, old_level)``. They run after the
    operation that changed the level has completed, so they may call back
    into the manager (e.g. to swap a sequence out).
    """

    def __init__(self, thresholds: PressureThresholds, clock: Callable[[], float] = time.monotonic) -> None:
        self.thresholds = thresholds
        self.clock = clock
        self.level = MemoryPressure.LOW
        self.callbacks: list[PressureCallback] = []
        self.changes = 0
        self._since = clock()
        self._seconds = dict.fromkeys(MemoryPressure, 0.0)

    def update(self, utilization: float) -> tuple[MemoryPressure, MemoryPressure] | None:
        """Recompute the level; return ``(new, old)`` if it changed (callbacks are fired by ``notify``)."""
        level = MemoryPressure.from_utilization(utilization, self.thresholds)
        if level == self.level:
            return None
        now = self.clock()
        self._seconds[self.level] += now - self._since
        self._since = now
        old, self.level = self.level, level
        self.changes += 1
        return level, old

    def notify(self, change: tuple[MemoryPressure, MemoryPressure]) -> None:
        for callback in list(self.callbacks):
            callback(*change)

    def seconds_at_levels(self) -> dict[MemoryPressure, float]:
        """Time spent at each level so far, the current one included."""
        out = dict(self._seconds)
        out[self.level] += self.clock() - self._since
        return out
