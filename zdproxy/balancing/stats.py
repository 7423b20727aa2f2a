"""Per-pool request statistics, cheap enough for every request.

Three views of the same stream of (status, latency) pairs:

* cumulative counters and a fixed-bucket histogram, exported to Prometheus;
* cumulative counts by status class and a finer log-scale latency histogram
  (``FINE_BOUNDS``, ten buckets a decade), which rollout analysis reads twice
  and subtracts (``totals``): any window, exactly, for both pools at the same
  instant, without any external Prometheus;
* a ring of one-second buckets (counts by status class and a latency
  histogram) for the last minutes.

The fine histogram costs nothing extra per request: every Prometheus bound is
also a fine bound (``_COARSE_OF`` maps one index to the other), so only the fine
one is counted. Requests are counted in batches (``PoolStats.record``), and every
read counts the batch first.
"""

from __future__ import annotations

from bisect import bisect_left, bisect_right
from collections.abc import Sequence
from typing import Final

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
_NBUCKETS: Final = len(LATENCY_BUCKETS) + 1


def _fine_bounds() -> tuple[float, ...]:
    """The R10 series (10 steps a decade, each about 26 % above the last) from
    0.1 ms to 25 s, then 30 s: every ``LATENCY_BUCKETS`` bound is among them."""
    mantissas = (1.0, 1.25, 1.6, 2.0, 2.5, 3.15, 4.0, 5.0, 6.3, 8.0)
    bounds = [round(m * 10.0**e, 12) for e in range(-4, 2) for m in mantissas]
    return (*(b for b in bounds if b <= 25.0), 30.0)


#: upper bounds (seconds) of the analysis histogram; the last bucket is +Inf
FINE_BOUNDS: Final[tuple[float, ...]] = _fine_bounds()
FINE_BUCKETS: Final = len(FINE_BOUNDS) + 1
assert set(LATENCY_BUCKETS) <= set(FINE_BOUNDS)
#: fine bucket index -> Prometheus bucket index
_COARSE_OF: Final[tuple[int, ...]] = (
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
_CLASS_OF: Final[tuple[int, ...]] = tuple(code // 100 if code >= 100 else 0 for code in range(600))


#: samples held before a flush is forced within one second (bounds their memory)
_BATCH: Final = 4096


class PoolStats:
    """Counters for one pool. ``record`` is on the hot path: it only appends the
    sample (status, latency) to a batch; the batch is counted when the clock
    leaves the second it was recorded in, when it is full, or when anything reads
    the figures (every reader goes through ``_flush``: the figures are never
    stale). A batch is counted with a sort and one bisect per fine bucket that
    holds samples, not a bisect and six increments per request. The Prometheus
    histogram is summed from the fine one at read time (a scrape)."""

    __slots__ = (
        "_bucket",
        "_bucket_end",
        "_bucket_start",
        "_classes",
        "_count",
        "_fine",
        "_latency_sum",
        "_ring",
        "_seconds",
        "_statuses",
        "window_seconds",
    )

    def __init__(self, window_seconds: int = 300) -> None:
        self.window_seconds = window_seconds
        self._ring = [WindowBucket() for _ in range(window_seconds)]
        #: the ring bucket of the second being recorded, and that second's bounds
        self._bucket = self._ring[0]
        self._bucket_start = 0.0
        self._bucket_end = 0.0
        self._latency_sum = 0.0
        self._count = 0
        self._classes = [0] * 6
        self._fine = [0] * FINE_BUCKETS
        #: the batch: samples of the current second not counted yet
        self._seconds: list[float] = []
        self._statuses: list[int] = []

    # the cumulative figures; reading one counts the batch first, and a worker
    # that reports them resets them (``workers.take_counters``)

    @property
    def count(self) -> int:
        self._flush()
        return self._count

    @count.setter
    def count(self, value: int) -> None:
        self._flush()
        self._count = value

    @property
    def classes(self) -> list[int]:
        """Cumulative counts by status class (as ``WindowBucket.classes``)."""
        self._flush()
        return self._classes

    @classes.setter
    def classes(self, value: list[int]) -> None:
        self._flush()
        self._classes = value

    @property
    def fine(self) -> list[int]:
        """Cumulative log-scale latency histogram over ``FINE_BOUNDS``."""
        self._flush()
        return self._fine

    @fine.setter
    def fine(self, value: list[int]) -> None:
        self._flush()
        self._fine = value

    @property
    def latency_sum(self) -> float:
        self._flush()
        return self._latency_sum

    @latency_sum.setter
    def latency_sum(self, value: float) -> None:
        self._flush()
        self._latency_sum = value

    def absorb(
        self, fine: Sequence[int], classes: Sequence[int], latency_sum: float, now: float
    ) -> None:
        """Add a worker's counts since its last report (``fine`` and ``classes`` as
        the attributes of that name); the window ring gets them at ``now``."""
        self._flush()
        second = int(now)
        bucket = self._ring[second % self.window_seconds]
        if bucket.second != second:
            bucket.reset(second)
        for index, count in enumerate(fine):
            if count:
                self._fine[index] += count
                bucket.latency[index] += count
        for index, count in enumerate(classes):
            if count:
                self._classes[index] += count
                self._count += count
                bucket.classes[index] += count
        self._latency_sum += latency_sum

    @property
    def histogram(self) -> list[int]:
        """Cumulative counts by ``LATENCY_BUCKETS`` bound (+Inf last), from ``fine``."""
        histogram = [0] * _NBUCKETS
        for index, count in enumerate(self.fine):
            if count:
                histogram[_COARSE_OF[index]] += count
        return histogram

    def record(self, status: int, seconds: float, now: float) -> None:
        """One answered (or failed: status 0) request of ``seconds``, ended at ``now``."""
        if not self._bucket_start <= now < self._bucket_end:
            self._flush()  # the batch belongs to the second it was recorded in
            self._enter(now)
        batch = self._seconds
        batch.append(seconds)
        self._statuses.append(status)
        if len(batch) >= _BATCH:
            self._flush()

    def _flush(self) -> None:
        """Count the batch into the cumulative figures and the current second's bucket."""
        batch = self._seconds
        if not batch:
            return
        statuses = self._statuses
        self._seconds = []
        self._statuses = []
        bucket = self._bucket
        # summed in arrival order, as one addition per request would
        self._latency_sum = sum(batch, self._latency_sum)
        self._count += len(batch)
        total = len(batch)
        batch.sort()
        fine = self._fine
        latency = bucket.latency
        # fine bucket i holds FINE_BOUNDS[i - 1] < seconds <= FINE_BOUNDS[i] (bisect_left)
        below = 0
        for index, bound in enumerate(FINE_BOUNDS):
            upto = bisect_right(batch, bound, below)
            if upto > below:
                fine[index] += upto - below
                latency[index] += upto - below
                below = upto
                if below == total:
                    break
        else:
            fine[FINE_BUCKETS - 1] += total - below
            latency[FINE_BUCKETS - 1] += total - below
        # by runs of one status (most of a batch): a native loop, where a Counter
        # cost a Python-level call and a dict update per request
        classes = self._classes
        window = bucket.classes
        run_status = statuses[0]
        run = 0
        for status in statuses:
            if status == run_status:
                run += 1
                continue
            cls = _CLASS_OF[run_status] if run_status < 600 else 0
            classes[cls] += run
            window[cls] += run
            run_status = status
            run = 1
        cls = _CLASS_OF[run_status] if run_status < 600 else 0
        classes[cls] += run
        window[cls] += run

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
        self._flush()
        return tuple(self._classes), tuple(self._fine)

    def window(self, now: float, seconds: int) -> WindowSummary:
        """Sum of the last ``seconds`` complete-or-current seconds up to ``now``."""
        self._flush()
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
