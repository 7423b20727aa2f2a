"""The workers' counters, merged in the control process (pure logic): two
workers' ``PoolStats`` absorbed into one equal one ``PoolStats`` that recorded
every request itself."""

from __future__ import annotations

import random

from zdproxy.balancing.stats import PoolStats


def _samples(seed: int, n: int) -> list[tuple[int, float]]:
    rng = random.Random(seed)
    statuses = (200, 201, 304, 404, 500, 503, 0, 101)
    return [(rng.choice(statuses), rng.lognormvariate(-5, 2)) for _ in range(n)]


def _take(stats: PoolStats) -> tuple[list[int], list[int], float]:
    """What a worker sends, as ``take_counters`` does: the counts, then reset."""
    taken = (stats.fine, stats.classes, stats.latency_sum)
    stats.fine = [0] * len(stats.fine)
    stats.classes = [0] * len(stats.classes)
    stats.latency_sum = 0.0
    stats.count = 0
    return taken


def test_two_workers_absorbed_equal_one_process() -> None:
    now = 1000.25
    whole, control = PoolStats(), PoolStats()
    workers = [PoolStats(), PoolStats()]
    for report in range(3):  # three reports from each worker
        for index, worker in enumerate(workers):
            for status, seconds in _samples(report * 10 + index, 500):
                worker.record(status, seconds, now)
                whole.record(status, seconds, now)
            fine, classes, latency_sum = _take(worker)
            control.absorb(fine, classes, latency_sum, now)
    assert control.fine == whole.fine
    assert control.histogram == whole.histogram
    assert control.classes == whole.classes
    assert control.count == whole.count == 3000
    assert abs(control.latency_sum - whole.latency_sum) < 1e-9
    assert control.totals() == whole.totals()
    merged, direct = control.window(now, 10), whole.window(now, 10)
    assert (merged.classes, merged.latency) == (direct.classes, direct.latency)


def test_absorbed_counts_land_in_the_second_they_arrive() -> None:
    control = PoolStats(window_seconds=60)
    worker = PoolStats()
    worker.record(500, 0.003, 10.0)
    control.absorb(*_take(worker), now=12.5)
    assert control.window(11.9, 1).total == 0
    window = control.window(12.0, 1)
    assert (window.total, window.errors) == (1, 1)
