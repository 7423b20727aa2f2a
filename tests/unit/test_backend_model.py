"""The backend model: spec, a flag per cause, derived state, the snapshot as a value,
and the one drain clock. Plain values, no sockets."""

from __future__ import annotations

import json
from dataclasses import replace
from typing import Any

import pytest

from zdproxy.balancing.model import (
    Admin,
    Backend,
    BackendSpec,
    BackendState,
    Flag,
    Health,
    Snapshot,
    derive_state,
    eligible,
    flag_names,
    state_of,
)
from zdproxy.balancing.selector import WeightedSelector
from zdproxy.balancing.stats import PoolStats
from zdproxy.config.schema import Config
from zdproxy.control.runtime import Runtime


class Clock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def make_config(**extra: Any) -> Config:
    data: dict[str, Any] = {
        "listen": ["127.0.0.1:8080"],
        "state": {"path": None},
        "health_check": {"enabled": False},
        "draining": {"timeout": "10s"},
        "pools": {
            "blue": {
                "weight": 100,
                "backends": [
                    {"id": "blue-1", "address": "127.0.0.1:9001"},
                    {"id": "blue-2", "address": "127.0.0.1:9002", "weight": 3},
                ],
            },
            "green": {
                "weight": 0,
                "backends": [{"id": "green-1", "address": "[::1]:9003"}],
            },
        },
    }
    data.update(extra)
    return Config.model_validate(data)


# ---- one bit per cause -------------------------------------------------------------

STATE_OF_ONE_BIT = {
    Flag.PENDING_ACTIVE_CHECK: BackendState.STARTING,
    Flag.FAILED_ACTIVE_CHECK: BackendState.DOWN,
    Flag.EJECTED: BackendState.UP,  # ejection shows as ejected, the state stays
    Flag.ADMIN_DRAIN: BackendState.DRAINING,
    Flag.DRAINED: BackendState.DRAINED,
    Flag.DISABLED: BackendState.DISABLED,
    Flag.REMOVING: BackendState.UP,  # shows as removing
}


def test_every_cause_bit_takes_the_backend_out_and_has_its_state() -> None:
    assert set(STATE_OF_ONE_BIT) == set(Flag)
    assert eligible(Flag(0)) and state_of(Flag(0)) is BackendState.UP
    for flag, state in STATE_OF_ONE_BIT.items():
        assert not eligible(flag), flag
        assert state_of(flag) is state, flag
        backend = Backend("b", "blue", "127.0.0.1", 1, flags=flag)
        assert not backend.eligible and backend.state is state
        assert flag_names(flag) == [str(flag.name).lower()]


def test_the_operator_wins_over_health_and_both_survive_together() -> None:
    for admin_bit in (Flag.ADMIN_DRAIN, Flag.DRAINED, Flag.DISABLED):
        for health_bit in (Flag.PENDING_ACTIVE_CHECK, Flag.FAILED_ACTIVE_CHECK):
            flags = admin_bit | health_bit | Flag.EJECTED
            assert state_of(flags) is STATE_OF_ONE_BIT[admin_bit]
            # the old (admin, health) pair gives the same state
            backend = Backend("b", "p", "h", 1, flags=flags)
            assert derive_state(backend.admin, backend.health) is backend.state
            assert backend.ejected


def test_drained_and_ejected_then_enable_clears_only_the_operator_bit() -> None:
    runtime = Runtime(make_config(), clock=Clock())
    runtime.set_ejected("blue-1", True)
    runtime.drain("blue-1", "ops")
    backend = runtime.backends["blue-1"]
    assert backend.flags == Flag.EJECTED | Flag.ADMIN_DRAIN
    runtime.tick()  # nothing in flight: drained
    assert backend.flags == Flag.EJECTED | Flag.DRAINED
    assert backend.state is BackendState.DRAINED
    runtime.enable("blue-1", "ops")
    # still ejected: outlier detection's cause is its own, enable does not clear it
    assert backend.flags == Flag.EJECTED
    assert backend.state is BackendState.UP and not backend.eligible
    assert backend not in runtime.snapshot.pools["blue"].routable
    runtime.set_ejected("blue-1", False)
    assert backend.flags == Flag(0)
    assert backend in runtime.snapshot.pools["blue"].routable


def test_ejection_ending_does_not_clear_a_drain_and_health_does_not_clear_disable() -> None:
    runtime = Runtime(make_config(), clock=Clock())
    backend = runtime.backends["blue-2"]
    runtime.set_ejected("blue-2", True)
    runtime.disable("blue-2", "ops")
    runtime.set_health("blue-2", Health.DOWN)
    assert backend.flags == Flag.EJECTED | Flag.DISABLED | Flag.FAILED_ACTIVE_CHECK
    runtime.set_ejected("blue-2", False)
    runtime.set_health("blue-2", Health.UP)
    assert backend.flags == Flag.DISABLED and backend.state is BackendState.DISABLED
    assert backend.admin is Admin.DISABLED and backend.health is Health.UP


def test_enable_with_active_checks_starts_over_but_keeps_ejection() -> None:
    config = make_config(health_check={"enabled": True})
    runtime = Runtime(config, clock=Clock())
    backend = runtime.backends["blue-1"]
    assert backend.flags == Flag.PENDING_ACTIVE_CHECK
    runtime.set_health("blue-1", Health.UP)
    runtime.set_ejected("blue-1", True)
    runtime.disable("blue-1", "ops")
    runtime.enable("blue-1", "ops")
    assert backend.flags == Flag.PENDING_ACTIVE_CHECK | Flag.EJECTED


def test_removal_sets_its_own_bit_and_drains() -> None:
    runtime = Runtime(make_config(), clock=Clock())
    backend = runtime.backends["blue-1"]
    backend.in_flight = 1
    assert runtime.remove_backend("blue-1", "ops") is False
    assert backend.flags == Flag.REMOVING | Flag.ADMIN_DRAIN
    # removing a disabled one keeps its disable
    other = runtime.backends["blue-2"]
    runtime.disable("blue-2", "ops")
    other.in_flight = 1
    runtime.remove_backend("blue-2", "ops")
    assert other.flags == Flag.REMOVING | Flag.DISABLED


def test_a_new_spec_swaps_the_value_and_keeps_the_object() -> None:
    runtime = Runtime(make_config(), clock=Clock())
    backend = runtime.backends["blue-1"]
    backend.codes[200] = 5
    spec = backend.spec
    with pytest.raises(AttributeError):
        spec.weight = 9  # type: ignore[misc]
    assert spec == BackendSpec("blue-1", "blue", "127.0.0.1", 9001, 1, "default")
    assert spec.address == "127.0.0.1:9001"
    assert BackendSpec("x", "p", "::1", 80).address == "[::1]:80"
    backend.set_spec(replace(spec, weight=5))  # what a reload's reweight does
    runtime.publish()
    assert runtime.backends["blue-1"] is backend and backend.codes == {200: 5}
    assert backend.weight == 5 and backend.spec.weight == 5
    view = runtime.snapshot.pools["blue"]
    assert dict(zip((b.id for b in view.routable), view.routable_weights, strict=True)) == {
        "blue-1": 5,
        "blue-2": 3,
    }


# ---- the snapshot as a value ----------------------------------------------------------


def test_snapshot_round_trips_through_json() -> None:
    clock = Clock(5000.0)
    runtime = Runtime(make_config(), clock=clock)
    runtime.split({"blue": 70, "green": 30}, "ops")
    runtime.set_ejected("blue-1", True)
    runtime.drain("blue-2", "ops")
    runtime.set_effective_weight("green-1", 0)
    runtime.set_effective_weight("blue-2", 2)
    snapshot = runtime.snapshot
    data = json.loads(json.dumps(snapshot.to_dict()))
    assert data["drain_started"] == {"blue-2": 5000.0}
    assert data["pools"] == {"blue": 70, "green": 30}
    copy = Snapshot.from_dict(data)
    assert copy.to_dict() == snapshot.to_dict()
    assert copy.version == snapshot.version
    # fresh objects, the same decisions
    for name, view in snapshot.pools.items():
        other = copy.pools[name]
        assert other.weight == view.weight
        assert [b.id for b in other.backends] == [b.id for b in view.backends]
        assert [b.id for b in other.routable] == [b.id for b in view.routable]
        assert other.routable_weights == view.routable_weights
    assert {b.id: b.flags for b in copy.backends.values()} == {
        "blue-1": Flag.EJECTED,
        "blue-2": Flag.ADMIN_DRAIN,
        "green-1": Flag(0),
    }
    assert copy.backends["blue-2"].spec == snapshot.backends["blue-2"].spec


def test_snapshot_from_dict_keeps_objects_with_counters_and_replaces_moved_ones() -> None:
    runtime = Runtime(make_config(), clock=Clock())
    data = runtime.snapshot.to_dict()
    replica = Snapshot.from_dict(data)
    kept = replica.backends["blue-1"]
    kept.in_flight = 3
    stats = {"blue": PoolStats(), "green": PoolStats()}
    runtime.set_ejected("blue-1", True)
    moved = runtime.snapshot.to_dict()
    for item in moved["backends"]:
        if item["id"] == "green-1":
            item["port"] = 9999
    again = Snapshot.from_dict(moved, replica.backends, stats)
    assert again.backends["blue-1"] is kept and kept.in_flight == 3
    assert kept.flags == Flag.EJECTED
    assert again.backends["green-1"] is not replica.backends["green-1"]
    assert again.pools["blue"].stats is stats["blue"]


def test_snapshot_flags_are_the_ones_at_build_time() -> None:
    runtime = Runtime(make_config(), clock=Clock())
    before = runtime.snapshot
    runtime.disable("blue-1", "ops")
    assert before.to_dict()["backends"][0]["flags"] == 0
    assert runtime.snapshot.to_dict()["backends"][0]["flags"] == int(Flag.DISABLED)


# ---- one drain clock ------------------------------------------------------------------


def test_the_selector_reads_drain_starts_on_the_runtime_clock() -> None:
    """A draining backend keeps pinned clients (sticky_until_timeout) until
    ``draining.timeout`` after the drain started, measured on the runtime's clock
    alone: the wall clock jumping (NTP, a VM resumed) changes nothing."""
    config = make_config(
        sticky={"mode": "backend"},
        draining={"timeout": "30s", "sticky_until_timeout": True},
        pools={
            "blue": {
                "weight": 100,
                "backends": [
                    {"id": "blue-1", "address": "127.0.0.1:9001"},
                    {"id": "blue-2", "address": "127.0.0.1:9002"},
                ],
            }
        },
    )
    mono = Clock(100.0)
    wall = Clock(1_700_000_000.0)
    runtime = Runtime(config, clock=mono)
    selector = WeightedSelector(runtime.snapshot, clock=wall, monotonic=mono)
    selector.configure(config.sticky, config.draining, b"k" * 32)
    runtime.subscribe(selector.update)
    runtime.backends["blue-1"].in_flight = 1  # so the drain does not end at once
    mono.now = 110.0
    runtime.drain("blue-1", "ops")
    assert selector.drain_started("blue-1") == 110.0
    backend = runtime.backends["blue-1"]
    wall.now += 3600  # the wall clock jumps an hour: no effect on the drain
    assert selector._pin_usable(backend, wall.now)
    mono.now = 139.9
    assert selector._pin_usable(backend, wall.now)
    mono.now = 140.0
    assert not selector._pin_usable(backend, wall.now)
    runtime.tick()
    assert backend.state is BackendState.DRAINED
    assert selector.drain_started("blue-1") is None


def test_a_drain_and_a_removal_do_not_end_on_unsettled_in_flight_figures() -> None:
    """With workers, in-flight 0 may be a report older than a request still running:
    nothing ends until the figures are settled, and the timeout still applies."""
    clock = Clock()
    runtime = Runtime(make_config(), clock=clock)
    settled = [False]
    runtime.in_flight_settled = lambda: settled[0]
    runtime.drain("blue-1", "ops")
    runtime.backends["blue-2"].in_flight = 1
    assert runtime.remove_backend("blue-2", "ops") is False
    runtime.backends["blue-2"].in_flight = 0
    runtime.tick()
    assert runtime.backends["blue-1"].state is BackendState.DRAINING
    assert "blue-2" in runtime.backends
    settled[0] = True
    runtime.tick()
    assert runtime.backends["blue-1"].state is BackendState.DRAINED
    assert "blue-2" not in runtime.backends
    # never settled: the drain timeout ends it anyway
    runtime.enable("blue-1", "ops")
    settled[0] = False
    runtime.drain("blue-1", "ops")
    clock.now += 10.0
    runtime.tick()
    assert runtime.backends["blue-1"].state is BackendState.DRAINED


def test_status_counts_in_runs_read_exactly() -> None:
    backend = Backend("b-1", "blue", "127.0.0.1", 1)
    statuses = [200] * 5 + [404, 404, 200, 503] + [200] * 3
    for i, status in enumerate(statuses):
        backend.count(status)
        if i == 6:  # a read in the middle of a run folds it in, exactly once
            assert backend.codes == {200: 5, 404: 2}
    assert backend.codes == {200: 9, 404: 2, 503: 1}
    assert backend.codes == {200: 9, 404: 2, 503: 1}  # reading twice adds nothing
    backend.codes = {}  # a worker handing its counts over starts again
    backend.count(200)
    assert backend.codes == {200: 1}
    backend.count(200)
    backend.codes = {}  # the run not read yet goes too
    assert backend.codes == {}
