"""A job far beyond its usual size says how long it will take before the bulk of its work starts: after
its first unit, timed, it logs that time and the rest's, so that a user who asked for 10,000 seeds by
mistake learns it in seconds, not hours.

    clock = JobClock(len(seeds), "images", LARGE_GENERATION, log)
    for seed in seeds:
        ...                      # one image
        clock.tick()   # after the first: "10,000 images: the first took 2.1 s; the other 9,999 take about 5.8 h"
"""
from __future__ import annotations

import time
from typing import Callable

LARGE_GENERATION = 64  # images in one `generate` call beyond which it says its time (the usual: 4 seeds)
LARGE_SAMPLING = 1000  # models of one `sample` run beyond which it says its time (the usual: 4 to 100)


def duration(seconds: float) -> str:
    """4.2 -> '4.2 s', 150 -> '2.5 min', 20000 -> '5.6 h', 400000 -> '4.6 days'."""
    for unit, size in (("days", 86400), ("h", 3600), ("min", 60)):
        if seconds >= 2 * size:
            return f"{seconds / size:.1f} {unit}"
    return f"{seconds:.1f} s"


class JobClock:
    """Times the first of `total` units of a job and, when `total` passes `usual` and `log` is given, logs
    the estimate of the rest (the first unit's time, times their number) once."""

    def __init__(self, total: int, what: str, usual: int, log: Callable[[str], None] | None):
        self.total, self.what, self.log = total, what, log
        self.pending = log is not None and total > usual
        self.start = time.perf_counter()

    def tick(self) -> None:
        """One unit done: after the first, the estimate (once)."""
        if not self.pending:
            return
        self.pending = False
        first = time.perf_counter() - self.start
        self.log(f"{self.total:,} {self.what}: the first took {duration(first)}; the other {self.total - 1:,} take "
                 f"about {duration(first * (self.total - 1))}")
