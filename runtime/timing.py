"""Seconds per named step of a long operation (install, update, flash), for its report."""
from __future__ import annotations

import time


class StepTimer:
    """Each :meth:`lap` records the time since the previous lap (or the start) under a step name."""

    def __init__(self) -> None:
        self.started = self._mark = time.perf_counter()
        self.seconds: dict[str, float] = {}

    def lap(self, step: str) -> None:
        now = time.perf_counter()
        self.seconds[step] = round(now - self._mark, 3)
        self._mark = now

    def total(self) -> float:
        return round(time.perf_counter() - self.started, 3)

    def with_total(self) -> dict[str, float]:
        return {**self.seconds, "total": self.total()}
