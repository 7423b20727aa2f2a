"""Per-pool request statistics, cheap enough for every request.

Two views of the same stream of (status, latency) pairs:

* cumulative counters and a fixed-bucket histogram, exported to Prometheus;
* a ring of one-second buckets (counts by status class and a latency
  histogram), which rollout analysis reads to compare pools over the same
  window without any external Prometheus.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Sequence

#: Histogram upper bounds in seconds (Prometheus ``le`` labels); +Inf is implicit.
LATENCY_BUCKETS: tuple[float, ...] = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
)
_NBUCKETS = len(LATENCY_BUCKETS) + 1


class WindowBucket:
    """One second of traffic for one pool."""

    __slots__ = ("classes", "latency", "second")

    def __init__(self) -> None:
        self.second = -1
        #: counts by status class: index 1..5 for 1xx..5xx, 0 for proxy-side failures
        self.classes = [0] * 6
        self.latency = [0] * _NBUCKETS

    def reset(self, second: int) -> None:
        self.second = second
        self.classes = [0] * 6
        self.latency = [0] * _NBUCKETS


class PoolStats:
    """Counters for one pool. ``record`` is on the hot path: a bisect and a few
    list increments, no allocation except when a new second starts."""

    __slots__ = ("_ring", "count", "histogram", "latency_sum", "window_seconds")

    def __init__(self, window_seconds: int = 300) -> None:
        self.window_seconds = window_seconds
        self._ring = [WindowBucket() for _ in range(window_seconds)]
        self.histogram = [0] * _NBUCKETS
        self.latency_sum = 0.0
        self.count = 0

    def record(self, status: int, seconds: float, now: float) -> None:
        index = bisect_left(LATENCY_BUCKETS, seconds)
        self.histogram[index] += 1
        self.latency_sum += seconds
        self.count += 1
        second = int(now)
        bucket = self._ring[second % self.window_seconds]
        if bucket.second != second:
            bucket.reset(second)
        bucket.classes[status // 100 if 100 <= status < 600 else 0] += 1
        bucket.latency[index] += 1

    def window(self, now: float, seconds: int) -> WindowSummary:
        """Sum of the last ``seconds`` complete-or-current seconds up to ``now``."""
        seconds = max(1, min(seconds, self.window_seconds))
        end = int(now)
        classes = [0] * 6
        latency = [0] * _NBUCKETS
        for second in range(end - seconds + 1, end + 1):
            bucket = self._ring[second % self.window_seconds]
            if bucket.second != second:
                continue
            for i, n in enumerate(bucket.classes):
                classes[i] += n
            for i, n in enumerate(bucket.latency):
                latency[i] += n
        return WindowSummary(classes, latency)


class WindowSummary:
    """Counts over a window, with the figures rollout analysis needs."""

    __slots__ = ("classes", "latency")

    def __init__(self, classes: Sequence[int], latency: Sequence[int]) -> None:
        self.classes = list(classes)
        self.latency = list(latency)

    @property
    def total(self) -> int:
        return sum(self.classes)

    @property
    def errors(self) -> int:
        """5xx answers and proxy-side failures."""
        return self.classes[5] + self.classes[0]

    def error_rate(self) -> float:
        total = self.total
        return self.errors / total if total else 0.0

    def quantile(self, q: float) -> float:
        """Upper bound of the histogram bucket holding quantile ``q`` (seconds)."""
        total = sum(self.latency)
        if not total:
            return 0.0
        rank = q * total
        running = 0
        for i, n in enumerate(self.latency):
            running += n
            if running >= rank:
                return LATENCY_BUCKETS[i] if i < len(LATENCY_BUCKETS) else float("inf")
        return float("inf")
