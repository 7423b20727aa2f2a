"""The selector's affinity, fallback and panic mode, driven through a real
``Runtime`` (which builds the snapshots) with a fake clock; no I/O."""

from __future__ import annotations

import tracemalloc
from collections import Counter
from typing import Any

from zdproxy.balancing.model import Admin, Backend, Health
from zdproxy.balancing.selector import RouteHints, WeightedSelector
from zdproxy.config.schema import Config, DrainingConfig, StickyConfig
from zdproxy.control.runtime import Runtime

SECRET = b"s" * 32


class Clock:
    def __init__(self, now: float = 1_700_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def Hints(
    pool: str | None = None, affinity: str | None = None, key: str | None = None
) -> RouteHints:
    return RouteHints(pool, affinity, key)


def cookie_value(set_cookie: bytes | None) -> str:
    assert set_cookie is not None
    return set_cookie.split(b";")[0].partition(b"=")[2].decode()


def setup(
    split: dict[str, int] | None = None,
    sizes: dict[str, int] | None = None,
    **sections: Any,
) -> tuple[Runtime, WeightedSelector, Clock]:
    split = split or {"blue": 90, "green": 10}
    sizes = sizes or {"blue": 2, "green": 2}
    port = 10000
    pools: dict[str, Any] = {}
    for name, weight in split.items():
        backends = []
        for n in range(1, sizes[name] + 1):
            port += 1
            backends.append({"id": f"{name}-{n}", "address": f"127.0.0.1:{port}"})
        pools[name] = {"weight": weight, "backends": backends}
    config = Config.model_validate(
        {"listen": "127.0.0.1:8080", "pools": pools, "health_check": {"enabled": False}, **sections}
    )
    clock = Clock()
    runtime = Runtime(config, clock=clock)
    # one hand-driven clock for pins (wall) and drains (monotonic)
    selector = WeightedSelector(runtime.snapshot, clock=clock, monotonic=clock)
    selector.configure(config.sticky, config.draining, SECRET)
    runtime.subscribe(selector.update)
    return runtime, selector, clock


def pick(selector: WeightedSelector, hints: RouteHints, exclude: Backend | None = None) -> Backend:
    backend = selector.select(hints, exclude)
    assert backend is not None
    return backend


# ---- fallback and panic -----------------------------------------------------------


def test_panic_mode_spreads_over_down_members_instead_of_failing() -> None:
    runtime, selector, _ = setup({"blue": 100, "green": 0}, {"blue": 4, "green": 1})
    for n in (1, 2, 3, 4):
        runtime.set_health(f"blue-{n}", Health.DOWN)
    runtime.set_admin("blue-3", Admin.DISABLED)
    runtime.set_admin("blue-4", Admin.DRAINED)
    counts = Counter(pick(selector, Hints()).id for _ in range(100))
    # never the operator's disabled / drained ones; spread over the rest
    assert counts == {"blue-1": 50, "blue-2": 50}
    # a backend still starting (never passed its checks) is not used in panic mode
    runtime.set_health("blue-1", Health.STARTING)
    assert {pick(selector, Hints()).id for _ in range(10)} == {"blue-2"}
    runtime.set_health("blue-2", Health.STARTING)
    assert selector.select(Hints()) is None


def test_panic_mode_after_every_member_is_ejected() -> None:
    runtime, selector, _ = setup({"blue": 100, "green": 0}, {"blue": 2, "green": 1})
    runtime.set_ejected("blue-1", True)
    runtime.set_ejected("blue-2", True)
    assert {pick(selector, Hints()).id for _ in range(10)} == {"blue-1", "blue-2"}


def test_a_pool_with_nothing_routable_borrows_another_pools_backends() -> None:
    runtime, selector, _ = setup({"blue": 90, "green": 10})
    runtime.set_health("green-1", Health.DOWN)
    runtime.set_health("green-2", Health.DOWN)
    pools = Counter(pick(selector, Hints()).pool for _ in range(1000))
    assert pools == {"blue": 1000}
    # a forced pool stays forced: panic inside it
    assert pick(selector, Hints(pool="green")).pool == "green"


def test_retry_never_goes_back_to_the_failed_backend_while_another_can_serve() -> None:
    _, selector, _ = setup({"blue": 100, "green": 0}, {"blue": 3, "green": 1})
    failed = pick(selector, Hints())
    assert all(pick(selector, Hints(), exclude=failed) is not failed for _ in range(30))


def test_retry_on_a_pool_of_one_uses_another_pool_then_the_same_backend() -> None:
    _, selector, _ = setup({"blue": 50, "green": 50}, {"blue": 1, "green": 1})
    blue = selector.snapshot.backends["blue-1"]
    assert all(pick(selector, Hints(), exclude=blue).pool == "green" for _ in range(10))
    _, solo, _ = setup({"blue": 100, "green": 0}, {"blue": 1, "green": 1})
    only = solo.snapshot.backends["blue-1"]
    # nothing else anywhere: the same backend again, on a new connection (keep-alive race)
    assert pick(solo, Hints(), exclude=only) is only


def test_common_path_allocates_nothing() -> None:
    _, selector, _ = setup({"blue": 90, "green": 10}, {"blue": 3, "green": 2})
    hints = Hints()
    for _ in range(100):
        selector.select(hints)
    tracemalloc.start()
    try:
        before = tracemalloc.take_snapshot()
        for _ in range(10000):
            selector.select(hints)
        after = tracemalloc.take_snapshot()
    finally:
        tracemalloc.stop()
    grown = sum(
        stat.size_diff
        for stat in after.compare_to(before, "filename")
        if "balancing" in str(stat.traceback)
    )
    assert grown < 1024


# ---- sticky pool ----------------------------------------------------------------


def test_new_clients_follow_the_split_exactly() -> None:
    _, selector, _ = setup({"blue": 90, "green": 10}, sticky={"mode": "pool"})
    pools = Counter()
    for _ in range(1000):
        hints = Hints()
        backend = pick(selector, hints)
        assert hints.set_cookie is not None
        pools[backend.pool] += 1
    assert 80 <= pools["green"] <= 120  # 10 +/- 2 %
    assert pools["green"] == 100  # the pool choice is deterministic (smooth WRR)


def test_pinned_clients_keep_their_pool_and_do_not_shift_the_split() -> None:
    runtime, selector, clock = setup({"blue": 90, "green": 10}, sticky={"mode": "pool"})
    clients: list[tuple[str, str]] = []
    for _ in range(200):
        hints = Hints()
        backend = pick(selector, hints)
        clients.append((cookie_value(hints.set_cookie), backend.pool))
    # pinned clients come back many times, interleaved with new clients
    new_pools = Counter()
    for _ in range(20):
        clock.now += 1
        for value, pool in clients:
            hints = Hints(affinity=value)
            assert pick(selector, hints).pool == pool
            assert hints.set_cookie is None  # nothing to say: the pin holds
        for _ in range(50):
            new_pools[pick(selector, Hints()).pool] += 1
    assert new_pools["green"] == 100  # still exactly 10 % of the new clients
    # a weight change that keeps green above zero keeps green's clients
    runtime.set_pool_weights({"blue": 50, "green": 50})
    for value, pool in clients:
        assert pick(selector, Hints(affinity=value)).pool == pool


def test_pool_to_zero_moves_pinned_clients_at_once() -> None:
    runtime, selector, clock = setup({"blue": 90, "green": 10}, sticky={"mode": "pool"})
    green_pin = None
    while green_pin is None:
        hints = Hints()
        if pick(selector, hints).pool == "green":
            green_pin = cookie_value(hints.set_cookie)
    runtime.set_pool_weights({"blue": 100, "green": 0})
    hints = Hints(affinity=green_pin)
    assert pick(selector, hints).pool == "blue"
    assert hints.set_cookie is not None  # re-pinned to blue
    # green comes back (a new canary): the old pin does not drag the client back
    clock.now += 5
    runtime.set_pool_weights({"blue": 90, "green": 10})
    hints = Hints(affinity=green_pin)
    assert pick(selector, hints).pool in ("blue", "green")
    assert hints.set_cookie is not None  # treated as a new client


def test_pool_to_zero_with_drain_timeout_keeps_clients_until_the_timeout() -> None:
    runtime, selector, clock = setup(
        {"blue": 50, "green": 50},
        sticky={"mode": "pool", "on_pool_zero": "drain_timeout"},
        draining={"timeout": "30s"},
    )
    hints = Hints(pool=None)
    while pick(selector, hints).pool != "green":
        hints = Hints()
    pin = cookie_value(hints.set_cookie)
    runtime.set_pool_weights({"blue": 100, "green": 0})
    clock.now += 29
    assert pick(selector, Hints(affinity=pin)).pool == "green"
    clock.now += 2
    moved = Hints(affinity=pin)
    assert pick(selector, moved).pool == "blue"
    assert moved.set_cookie is not None


def test_forged_expired_and_foreign_pins_are_ignored() -> None:
    _, selector, clock = setup({"blue": 50, "green": 50}, sticky={"mode": "pool", "max_age": "1h"})
    for value in ("garbage", "a.b", "", "x" * 5000):
        hints = Hints(affinity=value)
        assert pick(selector, hints) is not None
        assert hints.set_cookie is not None
    hints = Hints()
    pick(selector, hints)
    pin = cookie_value(hints.set_cookie)
    # refreshed after half its age, replaced after all of it
    clock.now += 1801
    refreshed = Hints(affinity=pin)
    pick(selector, refreshed)
    assert refreshed.set_cookie is not None
    clock.now += 1800
    expired = Hints(affinity=pin)
    pick(selector, expired)
    assert expired.set_cookie is not None
    other = WeightedSelector(selector.snapshot, clock=clock)
    other.configure(StickyConfig(mode="pool"), DrainingConfig(), b"another secret" * 3)
    foreign = Hints(affinity=cookie_value(refreshed.set_cookie))
    other.select(foreign)
    assert foreign.set_cookie is not None


def test_override_wins_over_the_pin() -> None:
    _, selector, _ = setup({"blue": 90, "green": 10}, sticky={"mode": "pool"})
    hints = Hints()
    while pick(selector, hints).pool != "blue":
        hints = Hints()
    forced = Hints(pool="green", affinity=cookie_value(hints.set_cookie))
    assert pick(selector, forced).pool == "green"
    assert forced.set_cookie is None


# ---- sticky backend ----------------------------------------------------------------


def backend_pin(selector: WeightedSelector) -> tuple[str, Backend]:
    hints = Hints()
    backend = pick(selector, hints)
    return cookie_value(hints.set_cookie), backend


def test_backend_pin_holds_over_requests() -> None:
    _, selector, _ = setup(
        {"blue": 100, "green": 0}, {"blue": 3, "green": 1}, sticky={"mode": "backend"}
    )
    pins = [backend_pin(selector) for _ in range(30)]
    assert len({b.id for _, b in pins}) == 3  # new clients are spread
    for value, backend in pins:
        for _ in range(5):
            hints = Hints(affinity=value)
            assert pick(selector, hints) is backend
            assert hints.set_cookie is None


def test_backend_pin_falls_back_in_the_pool_and_re_pins() -> None:
    runtime, selector, _ = setup(
        {"blue": 90, "green": 10}, {"blue": 3, "green": 1}, sticky={"mode": "backend"}
    )
    value, pinned = backend_pin(selector)
    while pinned.pool != "blue":
        value, pinned = backend_pin(selector)
    runtime.set_health(pinned.id, Health.DOWN)
    hints = Hints(affinity=value)
    fallback = pick(selector, hints)
    assert fallback is not pinned and fallback.pool == "blue"
    new_value = cookie_value(hints.set_cookie)
    assert selector._codec is not None
    new_pin = selector._codec.decode(new_value)
    assert new_pin is not None and new_pin.backend == fallback.id
    # the new pin holds, even when the old backend comes back
    runtime.set_health(pinned.id, Health.UP)
    assert pick(selector, Hints(affinity=new_value)) is fallback


def test_retry_of_a_pinned_client_never_goes_to_the_dead_backend() -> None:
    _, selector, _ = setup(
        {"blue": 100, "green": 0}, {"blue": 3, "green": 1}, sticky={"mode": "backend"}
    )
    value, pinned = backend_pin(selector)
    for _ in range(20):
        hints = Hints(affinity=value)
        retry = pick(selector, hints, exclude=pinned)
        assert retry is not pinned
        assert hints.set_cookie is not None


def test_draining_backend_keeps_pinned_clients_only_with_sticky_until_timeout() -> None:
    for sticky_until_timeout in (False, True):
        runtime, selector, clock = setup(
            {"blue": 100, "green": 0},
            {"blue": 2, "green": 1},
            sticky={"mode": "backend"},
            draining={"timeout": "30s", "sticky_until_timeout": sticky_until_timeout},
        )
        value, pinned = backend_pin(selector)
        runtime.set_admin(pinned.id, Admin.DRAINING)
        assert (pick(selector, Hints(affinity=value)) is pinned) is sticky_until_timeout
        # new clients never land on it
        assert all(pick(selector, Hints()) is not pinned for _ in range(20))
        clock.now += 31
        assert pick(selector, Hints(affinity=value)) is not pinned
        assert selector.drain_started(pinned.id) is not None


# ---- hash ------------------------------------------------------------------------


def test_hash_affinity_is_stable_and_follows_the_split() -> None:
    _, selector, _ = setup(
        {"blue": 80, "green": 20}, {"blue": 3, "green": 3}, sticky={"mode": "hash"}
    )
    keys = [f"10.1.{i // 250}.{i % 250}" for i in range(2000)]
    first = {k: pick(selector, Hints(key=k)) for k in keys}
    assert all(pick(selector, Hints(key=k)) is first[k] for k in keys[:300])
    share = sum(1 for b in first.values() if b.pool == "green") / len(keys)
    assert 0.16 < share < 0.24
    assert len({b.id for b in first.values()}) == 6
    # no key: weights decide
    assert pick(selector, Hints()) is not None


def test_hash_affinity_bounds_the_load_of_a_hot_key() -> None:
    _, selector, _ = setup(
        {"blue": 100, "green": 0}, {"blue": 4, "green": 1}, sticky={"mode": "hash"}
    )
    placed: list[Backend] = []
    for _ in range(100):
        backend = pick(selector, Hints(key="hot"))
        backend.in_flight += 1
        placed.append(backend)
    loads = Counter(b.id for b in placed)
    assert max(loads.values()) <= 1.25 * 100 / 4 + 2
    for backend in placed:
        backend.in_flight -= 1


def test_hash_affinity_moves_few_keys_when_a_backend_goes_down() -> None:
    runtime, selector, _ = setup(
        {"blue": 100, "green": 0}, {"blue": 5, "green": 1}, sticky={"mode": "hash"}
    )
    keys = [f"user-{i}" for i in range(2000)]
    before = {k: pick(selector, Hints(key=k)).id for k in keys}
    runtime.set_health("blue-3", Health.DOWN)
    after = {k: pick(selector, Hints(key=k)).id for k in keys}
    moved = [k for k in keys if before[k] != after[k]]
    assert all(before[k] == "blue-3" for k in moved)
    assert "blue-3" not in after.values()


def test_a_rolled_back_canary_loses_its_pinned_clients_at_once_even_with_drain_timeout() -> None:
    """A rollback revokes the canary's pins (``Runtime.apply_rollout_weights(revoke=)``):
    pinned clients move to the baseline on their next request, not at the drain timeout;
    an ordinary move to 0 keeps them until the timeout (the test above)."""
    runtime, selector, _clock = setup(
        {"blue": 50, "green": 50},
        sticky={"mode": "pool", "on_pool_zero": "drain_timeout"},
        draining={"timeout": "30s"},
    )
    hints = Hints()
    while pick(selector, hints).pool != "green":
        hints = Hints()
    pin = cookie_value(hints.set_cookie)
    runtime.apply_rollout_weights(
        {"blue": 100, "green": 0},
        "rollout.rollback",
        "rollout-1",
        "zdproxy",
        revoke=frozenset({"green"}),
    )
    moved = Hints(affinity=pin)
    assert pick(selector, moved).pool == "blue"
    assert moved.set_cookie is not None  # re-pinned to the baseline
    # the next rollout gives green weight again: no longer revoked
    runtime.apply_rollout_weights({"blue": 90, "green": 10}, "rollout.step", "rollout-2", "z")
    assert runtime.snapshot.revoked == frozenset()
