"""The dashboard's live figures: differences of counter readings over a window."""

from __future__ import annotations

from zdproxy.admin.figures import Reading, TrafficFigures, backend_counts, read
from zdproxy.balancing.stats import PoolStats


def _reading(now: float, stats: PoolStats, codes: dict[int, int]) -> Reading:
    return read(now, [("blue", stats.totals())], [("blue-1", codes)])


def test_backend_counts_errors_are_5xx_and_proxy_failures() -> None:
    assert backend_counts({200: 7, 404: 2, 500: 1, 503: 2, 0: 1}) == (13, 4)
    assert backend_counts({}) == (0, 0)


def test_no_figures_before_two_readings() -> None:
    figures = TrafficFigures()
    assert figures.pool("blue")["requests_per_second"] == 0.0
    stats = PoolStats()
    figures.add(_reading(100.0, stats, {}))
    assert figures.pool("blue") == {
        "window_s": 0.0,
        "requests": 0,
        "errors": 0,
        "requests_per_second": 0.0,
        "error_rate": 0.0,
        "p50_ms": None,
        "p99_ms": None,
    }
    assert figures.backend("blue-1")["requests"] == 0


def test_rates_over_the_window_only() -> None:
    figures = TrafficFigures(window=10.0)
    stats = PoolStats()
    codes: dict[int, int] = {}
    # 30 requests before the window, then 1 per second at 20 ms, every 5th a 502
    for _ in range(30):
        stats.record(200, 0.001, 0.0)
    codes[200] = 30
    figures.add(_reading(0.0, stats, codes))
    for second in range(1, 21):
        status = 502 if second % 5 == 0 else 200
        stats.record(status, 0.02, float(second))
        codes[status] = codes.get(status, 0) + 1
        figures.add(_reading(float(second), stats, codes))
    pool = figures.pool("blue")
    # seconds 11..20: the reading at second 10 is the window's start
    assert pool["window_s"] == 10.0
    assert pool["requests"] == 10 and pool["errors"] == 2
    assert pool["requests_per_second"] == 1.0 and pool["error_rate"] == 0.2
    assert 16.0 <= pool["p99_ms"] <= 20.0  # inside the fine bucket of 20 ms
    backend = figures.backend("blue-1")
    assert (backend["requests"], backend["errors"], backend["error_rate"]) == (10, 2, 0.2)
    assert backend["requests_per_second"] == 1.0


def test_unknown_or_new_names_have_zero_figures() -> None:
    figures = TrafficFigures()
    stats = PoolStats()
    figures.add(read(0.0, [], []))
    figures.add(_reading(1.0, stats, {200: 5}))
    # blue appeared after the first reading: no difference to take yet
    assert figures.pool("blue")["requests"] == 0
    assert figures.backend("blue-1")["requests"] == 0
    assert figures.pool("green")["requests"] == 0
