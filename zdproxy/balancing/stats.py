"""Per-pool request statistics, cheap enough for every request.

Three views of the same stream of (status, latency) pairs:

* cumulative counters and a fixed-bucket histogram, exported to Prometheus;
* cumulative counts by status class and a finer log-scale latency histogram
  (``FINE_BOUNDS``, ten buckets a decade), which rollout analysis reads twice
  and subtracts (``totals``): any window, exactly, for both pools at the same
  instant, without any external Prometheus;
* a ring of one-second buckets (counts by status class and a latency
  histogram) for the last minutes.

The fine histogram costs nothing extra per request: one bisect over it gives
both indexes (every Prometheus bound is also a fine bound, ``_COARSE_OF`` maps
one index to the other).
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


def _fine_bounds() -> tuple[float, ...]:
    """The R10 series (10 steps a decade, each about 26 % above the last) from
    0.1 ms to 25 s, then 30 s: every ``LATENCY_BUCKETS`` bound is among them."""
    mantissas = (1.0, 1.25, 1.6, 2.0, 2.5, 3.15, 4.0, 5.0, 6.3, 8.0)
    bounds = [round(m * 10.0**e, 12) for e in range(-4, 2) for m in mantissas]
    return (*(b for b in bounds if b <= 25.0), 30.0)


#: upper bounds (seconds) of the analysis histogram; the last bucket is +Inf
FINE_BOUNDS: tuple[float, ...] = _fine_bounds()
FINE_BUCKETS = len(FINE_BOUNDS) + 1
assert set(LATENCY_BUCKETS) <= set(FINE_BOUNDS)
#: fine bucket index -> Prometheus bucket index
_COARSE_OF: tuple[int, ...] = (
    *(bisect_left(LATENCY_BUCKETS, bound) for bound in FINE_BOUNDS),
    len(LATENCY_BUCKETS),
)


class WindowBucket:
    """One second of traffic for one pool."""

    __slots__ = ("classes", "latency", "second")

    def __init__(self) -> None:
        self.second = -1
        #: counts by status class: index 1..5 for 1xx..5xx, 0 for proxy-side failures
        self.classes = [0] * 6
        #: counts by ``FINE_BOUNDS`` bucket (``window`` maps them to the coarse ones:
        #: the request path then needs no second lookup)
        self.latency = [0] * FINE_BUCKETS

    def reset(self, second: int) -> None:
        self.second = second
        self.classes = [0] * 6
        self.latency = [0] * FINE_BUCKETS


#: status code -> status class index (``WindowBucket.classes``), for codes below 600
_CLASS_OF: tuple[int, ...] = tuple(code // 100 if code >= 100 else 0 for code in range(600))


class PoolStats:
    """Counters for one pool. ``record`` is on the hot path: a bisect and six
    increments, no allocation except when a new second starts. The Prometheus
    histogram is not counted per request: ``histogram`` sums the fine one at read
    time (a scrape), and the second's ring bucket is kept at hand until the clock
    leaves that second."""

    __slots__ = (
        "_bucket",
        "_bucket_end",
        "_bucket_start",
        "_ring",
        "classes",
        "count",
        "fine",
        "latency_sum",
        "window_seconds",
    )

    def __init__(self, window_seconds: int = 300) -> None:
        self.window_seconds = window_seconds
        self._ring = [WindowBucket() for _ in range(window_seconds)]
        #: the ring bucket of the second being recorded, and that second's bounds
        self._bucket = self._ring[0]
        self._bucket_start = 0.0
        self._bucket_end = 0.0
        self.latency_sum = 0.0
        self.count = 0
        #: cumulative counts by status class (as ``WindowBucket.classes``)
        self.classes = [0] * 6
        #: cumulative log-scale latency histogram over ``FINE_BOUNDS``
        self.fine = [0] * FINE_BUCKETS

    def absorb(
        self, fine: Sequence[int], classes: Sequence[int], latency_sum: float, now: float
    ) -> None:
        """Add a worker's counts since its last report (``fine`` and ``classes`` as
        the attributes of that name); the window ring gets them at ``now``."""
        second = int(now)
        bucket = self._ring[second % self.window_seconds]
        if bucket.second != second:
            bucket.reset(second)
        for index, count in enumerate(fine):
            if count:
                self.fine[index] += count
                bucket.latency[index] += count
        for index, count in enumerate(classes):
            if count:
                self.classes[index] += count
                self.count += count
                bucket.classes[index] += count
        self.latency_sum += latency_sum

    @property
    def histogram(self) -> list[int]:
        """Cumulative counts by ``LATENCY_BUCKETS`` bound (+Inf last), from ``fine``."""
        histogram = [0] * _NBUCKETS
        for index, count in enumerate(self.fine):
            if count:
                histogram[_COARSE_OF[index]] += count
        return histogram

    def record(self, status: int, seconds: float, now: float) -> None:
        fine = bisect_left(FINE_BOUNDS, seconds)
        self.fine[fine] += 1
        self.latency_sum += seconds
        self.count += 1
        cls = _CLASS_OF[status] if status < 600 else 0
        self.classes[cls] += 1
        bucket = self._bucket
        if not self._bucket_start <= now < self._bucket_end:
            bucket = self._enter(now)
        bucket.classes[cls] += 1
        bucket.latency[fine] += 1

    def _enter(self, now: float) -> WindowBucket:
        """The ring bucket of ``now``'s second, made the current one."""
        second = int(now)
        bucket = self._ring[second % self.window_seconds]
        if bucket.second != second:
            bucket.reset(second)
        self._bucket = bucket
        self._bucket_start = float(second)
        self._bucket_end = second + 1.0
        return bucket

    def totals(self) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """Copies of the cumulative class counts and fine histogram; the
        difference of two of them is the traffic between the two reads."""
        return tuple(self.classes), tuple(self.fine)

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
                if n:
                    latency[_COARSE_OF[i]] += n
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
