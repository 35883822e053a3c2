"""Per-stage wall times of a job (``timings`` in its result): each ``lap`` closes one stage."""

from __future__ import annotations

import time


class Stopwatch:
    """``lap(name)`` records the time since the previous lap (or the start) under ``name``; ``total()``
    adds the time since the start and returns the timings, in the order the stages ran."""

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self._last = self.start
        self.timings: dict[str, float] = {}

    def lap(self, name: str) -> float:
        now = time.perf_counter()
        self.timings[name] = now - self._last
        self._last = now
        return self.timings[name]

    def total(self) -> dict[str, float]:
        self.timings["total"] = time.perf_counter() - self.start
        return self.timings


def timing_line(timings: dict[str, float], decimals: int = 2) -> str:
    """``  time stage 1.23s, …, total 4.56s``: a job's timings as its summary prints them."""
    return "  time " + ", ".join(f"{k} {v:.{decimals}f}s" for k, v in timings.items())
