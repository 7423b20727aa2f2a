"""``PoolStats`` counts its samples in batches: every figure read equals what
counting each request on its own gives (a reference with one bisect per sample),
and a read right after a request already sees it."""

from __future__ import annotations

import random
from bisect import bisect_left

from zdproxy.balancing import stats as stats_module
from zdproxy.balancing.stats import FINE_BOUNDS, FINE_BUCKETS, PoolStats


def _reference(samples: list[tuple[int, float, float]]) -> tuple[list[int], list[int]]:
    fine = [0] * FINE_BUCKETS
    classes = [0] * 6
    for status, seconds, _ in samples:
        fine[bisect_left(FINE_BOUNDS, seconds)] += 1
        classes[status // 100 if 100 <= status < 600 else 0] += 1
    return fine, classes


def _samples(seed: int, n: int, start: float) -> list[tuple[int, float, float]]:
    rng = random.Random(seed)
    statuses = (200, 201, 304, 404, 500, 503, 0, 101, 999)
    now = start
    out = []
    for _ in range(n):
        now += rng.expovariate(400.0)  # about 400 requests a second
        # bounds themselves too: a sample equal to a bound is in that bound's bucket
        seconds = rng.choice((rng.lognormvariate(-5, 2), rng.choice(FINE_BOUNDS), 40.0, 0.0))
        out.append((rng.choice(statuses), seconds, now))
    return out


def test_batched_counts_equal_per_request_counts() -> None:
    samples = _samples(1, 5000, 1000.0)
    stats = PoolStats(window_seconds=60)
    for status, seconds, now in samples:
        stats.record(status, seconds, now)
    fine, classes = _reference(samples)
    assert stats.fine == fine
    assert stats.classes == classes
    assert stats.count == len(samples)
    # summed in arrival order: the same float as one addition per request
    total = 0.0
    for _, seconds, _ in samples:
        total += seconds
    assert stats.latency_sum == total
    assert stats.totals() == (tuple(classes), tuple(fine))
    # each second's ring bucket holds that second's samples, not the next one's
    end = int(samples[-1][2])
    for second in range(int(samples[0][2]), end + 1):
        in_second = [s for s in samples if int(s[2]) == second]
        window = stats.window(second + 0.5, 1)
        assert window.total == len(in_second)
        assert window.classes == _reference(in_second)[1]


def test_a_read_right_after_a_request_sees_it() -> None:
    stats = PoolStats()
    stats.record(200, 0.002, 10.1)
    assert stats.count == 1
    stats.record(503, 0.002, 10.2)
    assert stats.totals()[0][5] == 1
    stats.record(200, 0.004, 10.3)
    assert sum(stats.histogram) == 3
    stats.record(500, 0.004, 10.4)
    assert stats.window(10.5, 1).errors == 2
    # a worker's report takes the figures and resets them, the batch included
    stats.record(200, 0.001, 10.6)
    taken = (stats.fine, stats.classes, stats.latency_sum)
    stats.fine = [0] * FINE_BUCKETS
    stats.classes = [0] * 6
    stats.latency_sum = 0.0
    stats.count = 0
    assert sum(taken[0]) == sum(taken[1]) == 5
    stats.record(200, 0.001, 10.7)
    assert stats.count == 1 and sum(stats.fine) == 1


def test_a_full_batch_is_counted_within_the_second() -> None:
    stats = PoolStats()
    for i in range(stats_module._BATCH + 3):
        stats.record(200, 0.001, 20.0 + i * 1e-6)
    # the full batch was counted without a read: only the rest is pending
    assert len(stats._seconds) == 3
    assert stats.count == stats_module._BATCH + 3


def test_runs_of_one_status_are_counted_whole() -> None:
    # a batch is mostly one status: runs, a run cut by one other status, a run
    # that ends the batch
    statuses = [200] * 700 + [503] + [200] * 300 + [0] * 5 + [404] * 2 + [999] + [200] * 40
    samples = [(status, 0.001, 1000.0 + i / 10000) for i, status in enumerate(statuses)]
    stats = PoolStats(window_seconds=60)
    for status, seconds, now in samples:
        stats.record(status, seconds, now)
    assert stats.classes == _reference(samples)[1]
    assert stats.window(1000.5, 1).classes == _reference(samples)[1]
