"""Weighted pickers and the selector, with plain values."""

from __future__ import annotations

from collections import Counter

from zdproxy.balancing.model import Backend, BackendState, Flag, PoolView, Snapshot
from zdproxy.balancing.selector import RouteHints, WeightedSelector
from zdproxy.balancing.stats import PoolStats
from zdproxy.balancing.wrr import (
    EarliestDeadline,
    EmptyPicker,
    RoundRobin,
    SmoothWeighted,
    make_picker,
)


def test_smooth_weighted_matches_nginx_sequence() -> None:
    # nginx's documented example: weights 5, 1, 1 give a a b a c a a
    picker = SmoothWeighted(["a", "b", "c"], [5, 1, 1])
    assert [picker.pick() for _ in range(7)] == ["a", "a", "b", "a", "c", "a", "a"]


def test_make_picker_chooses_cheapest_exact_picker() -> None:
    assert isinstance(make_picker(["a", "b"], [2, 2]), RoundRobin)
    assert isinstance(make_picker(["a", "b"], [2, 1]), SmoothWeighted)
    assert isinstance(
        make_picker(list(range(100)), [1 + i % 3 for i in range(100)]), EarliestDeadline
    )
    assert isinstance(make_picker(["a"], [0]), EmptyPicker)
    assert make_picker(["a"], [0]).pick() is None


def test_zero_weight_items_never_win() -> None:
    picker = make_picker(["a", "b", "c"], [0, 3, 1])
    counts = Counter(picker.pick() for _ in range(400))
    assert counts == {"b": 300, "c": 100}


def test_edf_is_exact_over_a_period() -> None:
    items = list(range(50))
    weights = [1 + i % 4 for i in items]
    picker = make_picker(items, weights)
    total = sum(weights)
    counts = Counter(picker.pick() for _ in range(total * 10))
    for item, weight in zip(items, weights, strict=True):
        assert abs(counts[item] - weight * 10) <= 1


def _backend(bid: str, pool: str, weight: int = 1) -> Backend:
    return Backend(bid, pool, "127.0.0.1", 1, weight, flags=Flag(0))


def _snapshot(weights: dict[str, int], members: dict[str, list[Backend]]) -> Snapshot:
    pools = {
        name: PoolView(
            name=name,
            weight=weights[name],
            backends=tuple(members[name]),
            routable=tuple(b for b in members[name] if b.state is BackendState.UP),
            routable_weights=tuple(b.weight for b in members[name] if b.state is BackendState.UP),
            stats=PoolStats(),
        )
        for name in weights
    }
    return Snapshot(version=1, pools=pools)


def Hints(
    pool: str | None = None, affinity: str | None = None, key: str | None = None
) -> RouteHints:
    return RouteHints(pool, affinity, key)


def test_selector_splits_pools_by_percent_and_honours_override() -> None:
    blue = [_backend("b1", "blue"), _backend("b2", "blue")]
    green = [_backend("g1", "green")]
    selector = WeightedSelector(
        _snapshot({"blue": 90, "green": 10}, {"blue": blue, "green": green})
    )
    counts = Counter(selector.select(Hints()).pool for _ in range(1000))  # type: ignore[union-attr]
    assert counts == {"blue": 900, "green": 100}
    assert all(selector.select(Hints("green")) is green[0] for _ in range(10))
    # unknown override: weights decide
    assert selector.select(Hints("nope")) is not None


def test_selector_excludes_failed_backend_and_swaps_snapshots_whole() -> None:
    blue = [_backend("b1", "blue"), _backend("b2", "blue")]
    green = [_backend("g1", "green")]
    selector = WeightedSelector(
        _snapshot({"blue": 100, "green": 0}, {"blue": blue, "green": green})
    )
    for _ in range(10):
        assert selector.select(Hints(), exclude=blue[0]) is blue[1]
    selector.update(_snapshot({"blue": 0, "green": 100}, {"blue": blue, "green": green}))
    assert {selector.select(Hints()).id for _ in range(10)} == {"g1"}  # type: ignore[union-attr]


def test_pool_stats_window_and_quantiles() -> None:
    stats = PoolStats(window_seconds=60)
    for i in range(100):
        stats.record(200 if i % 10 else 503, 0.004, now=1000.0 + i / 100)
    stats.record(200, 0.2, now=1001.5)
    window = stats.window(now=1001.9, seconds=5)
    assert window.total == 101
    assert window.errors == 10
    assert abs(window.error_rate() - 10 / 101) < 1e-9
    assert window.quantile(0.5) == 0.005
    assert window.quantile(1.0) == 0.25
    # older than the window: not counted
    assert stats.window(now=1100.0, seconds=5).total == 0
