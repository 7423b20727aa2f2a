"""The runtime, the audit log and the state store, with plain values (no sockets)."""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path
from typing import Any

import pytest

from zdproxy.balancing.model import Admin, BackendState, Health, Snapshot
from zdproxy.config.schema import Config
from zdproxy.control.events import EventLog, append_line, encode, read_tail
from zdproxy.control.runtime import Runtime
from zdproxy.control.store import (
    BackgroundWriter,
    FileStore,
    MemoryStore,
    Persistence,
    StoreError,
    check_state,
)
from zdproxy.errors import Conflict, ControlError, NotFound


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

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
                    {"id": "blue-2", "address": "127.0.0.1:9002"},
                ],
            },
            "green": {
                "weight": 0,
                "backends": [
                    {"id": "green-1", "address": "127.0.0.1:9003"},
                    {"id": "green-2", "address": "127.0.0.1:9004"},
                ],
            },
        },
    }
    data.update(extra)
    return Config.model_validate(data)


class Recorder:
    """Counts snapshots and persisted states handed out by a runtime."""

    def __init__(self, runtime: Runtime) -> None:
        self.snapshots: list[Snapshot] = []
        self.states: list[dict[str, Any]] = []
        runtime.subscribe(self.snapshots.append)
        runtime.subscribe_state(self.states.append)


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def runtime(clock: Clock) -> Runtime:
    return Runtime(make_config(), clock=clock)


def unchanged(runtime: Runtime, recorder: Recorder, before: dict[str, Any]) -> None:
    assert recorder.snapshots == []
    assert recorder.states == []
    assert runtime.export_state() | {"saved_at": None} == before | {"saved_at": None}
    assert len(runtime.events) == 0


# ---- split and flip -----------------------------------------------------------


def test_split_sets_weights_in_one_snapshot_and_audits(runtime: Runtime) -> None:
    rec = Recorder(runtime)
    event = runtime.split({"blue": 90, "green": 10}, "alice")
    assert event is not None
    assert runtime.pool_weights == {"blue": 90, "green": 10}
    assert len(rec.snapshots) == 1
    assert rec.snapshots[0].pool_weights() == {"blue": 90, "green": 10}
    assert len(rec.states) == 1 and rec.states[0]["weights"] == {"blue": 90, "green": 10}
    assert (event.actor, event.action, event.target) == ("alice", "split", "blue,green")
    assert event.before == {"blue": 100, "green": 0}
    assert event.after == {"blue": 90, "green": 10}
    assert runtime.events.list() == [event.to_json()]


def test_split_leaves_out_pools_at_zero(runtime: Runtime) -> None:
    runtime.split({"green": 100}, "a")
    assert runtime.pool_weights == {"blue": 0, "green": 100}


def test_split_with_the_same_weights_changes_nothing(runtime: Runtime) -> None:
    rec = Recorder(runtime)
    assert runtime.split({"blue": 100, "green": 0}, "a") is None
    assert rec.snapshots == [] and len(runtime.events) == 0


@pytest.mark.parametrize(
    ("weights", "error", "message"),
    [
        ({}, ControlError, "expected pool weights"),
        ({"blue": 90, "green": 20}, ControlError, "must sum to 100, got 110"),
        ({"blue": 50}, ControlError, "must sum to 100, got 50"),
        ({"blue": -10, "green": 110}, ControlError, "integer 0-100"),
        ({"blue": 50.0, "green": 50}, ControlError, "integer 0-100"),
        ({"blue": True, "green": 99}, ControlError, "integer 0-100"),
        ({"blue": "50", "green": 50}, ControlError, "integer 0-100"),
        ({"purple": 100}, NotFound, "no pool named 'purple'"),
    ],
)
def test_split_refusals_change_nothing(
    runtime: Runtime, weights: dict[str, Any], error: type[Exception], message: str
) -> None:
    rec = Recorder(runtime)
    before = runtime.export_state()
    with pytest.raises(error, match=message) as info:
        runtime.split(weights, "a")
    assert isinstance(info.value, ControlError)
    assert info.value.status == (404 if error is NotFound else 400)
    unchanged(runtime, rec, before)


def test_flip_moves_all_traffic(runtime: Runtime) -> None:
    event = runtime.flip("green", "bob")
    assert event is not None and event.action == "flip" and event.target == "green"
    assert runtime.pool_weights == {"blue": 0, "green": 100}
    assert runtime.snapshot.pools["green"].weight == 100


def test_flip_to_pool_without_usable_backend_is_a_conflict_unless_forced(
    runtime: Runtime,
) -> None:
    runtime.disable("green-1", "ops")
    runtime.drain("green-2", "ops")
    rec = Recorder(runtime)
    before = runtime.export_state()
    events = len(runtime.events)
    with pytest.raises(Conflict, match="no usable backend") as info:
        runtime.flip("green", "bob")
    assert info.value.status == 409
    with pytest.raises(Conflict):
        runtime.split({"blue": 50, "green": 50}, "bob")
    assert rec.snapshots == [] and len(runtime.events) == events
    assert runtime.export_state()["weights"] == before["weights"]
    event = runtime.flip("green", "bob", force=True)
    assert event is not None and event.note is not None and "forced" in event.note
    assert runtime.pool_weights["green"] == 100


def test_flip_validates_its_target(runtime: Runtime) -> None:
    with pytest.raises(NotFound):
        runtime.flip("purple", "a")
    with pytest.raises(ControlError):
        runtime.flip(7, "a")


def test_starting_and_ejected_backends_are_not_usable(clock: Clock) -> None:
    runtime = Runtime(make_config(health_check={"enabled": True}), clock=clock)
    assert runtime.backends["green-1"].state is BackendState.STARTING
    with pytest.raises(Conflict):
        runtime.flip("green", "a")
    runtime.set_health("green-1", Health.UP)
    runtime.set_ejected("green-1", True)
    with pytest.raises(Conflict):
        runtime.flip("green", "a")
    runtime.set_ejected("green-1", False)
    assert runtime.flip("green", "a") is not None


# ---- backends -----------------------------------------------------------------


def test_add_backend(runtime: Runtime) -> None:
    rec = Recorder(runtime)
    backend = runtime.add_backend("green", "127.0.0.1:9005", "green-3", 2, "ci")
    assert backend.state is BackendState.UP  # health checks are off
    assert runtime.backends["green-3"] is backend
    assert len(rec.snapshots) == 1
    assert backend in rec.snapshots[0].pools["green"].routable
    assert runtime.added["green-3"] == {
        "id": "green-3",
        "pool": "green",
        "address": "127.0.0.1:9005",
        "weight": 2,
    }
    event = runtime.events.last()
    assert event is not None and event["action"] == "backend.add" and event["actor"] == "ci"
    assert event["before"] is None and event["after"]["address"] == "127.0.0.1:9005"


def test_add_backend_defaults_id_and_weight(runtime: Runtime) -> None:
    backend = runtime.add_backend("green", "[::1]:9005", None, 1, "ci")
    assert backend.id == "green-3" and backend.address == "[::1]:9005" and backend.weight == 1


def test_added_backend_starts_when_health_checks_apply(clock: Clock) -> None:
    runtime = Runtime(make_config(health_check={"enabled": True}), clock=clock)
    backend = runtime.add_backend("green", "127.0.0.1:9005", None, 1, "ci")
    assert backend.state is BackendState.STARTING
    assert backend not in runtime.snapshot.pools["green"].routable


def test_pool_override_turns_health_checks_off_for_its_backends(clock: Clock) -> None:
    config = make_config(health_check={"enabled": True})
    data = config.model_dump(mode="json")
    data["pools"]["green"]["health_check"] = {"enabled": False}
    data["listen"] = ["127.0.0.1:8080"]
    data["admin"]["listen"] = "127.0.0.1:9901"
    for pool in data["pools"].values():
        for b in pool["backends"]:
            b["address"] = f"{b['address']['host']}:{b['address']['port']}"
    runtime = Runtime(Config.model_validate(data), clock=clock)
    assert runtime.backends["blue-1"].state is BackendState.STARTING
    assert runtime.backends["green-1"].state is BackendState.UP
    assert runtime.add_backend("green", "127.0.0.1:9009", None, 1, "a").state is BackendState.UP


@pytest.mark.parametrize(
    ("args", "error", "message"),
    [
        (("purple", "127.0.0.1:1", None, 1), NotFound, "no pool named"),
        (("green", "nonsense", None, 1), ControlError, "expected host:port"),
        (("green", "127.0.0.1:99999", None, 1), ControlError, "invalid port"),
        (("green", 12, None, 1), ControlError, "address must be a string"),
        (("green", "127.0.0.1:1", "bad id!", 1), ControlError, "invalid backend id"),
        (("green", "127.0.0.1:1", "", 1), ControlError, "invalid backend id"),
        (("green", "127.0.0.1:1", None, 1001), ControlError, "weight must be an integer"),
        (("green", "127.0.0.1:1", None, -1), ControlError, "weight must be an integer"),
        (("green", "127.0.0.1:1", None, True), ControlError, "weight must be an integer"),
        (("green", "127.0.0.1:1", "blue-1", 1), Conflict, "already in use"),
        (("green", "127.0.0.1:9003", None, 1), Conflict, "already has backend 'green-1'"),
    ],
)
def test_add_backend_refusals_change_nothing(
    runtime: Runtime, args: tuple[Any, ...], error: type[Exception], message: str
) -> None:
    rec = Recorder(runtime)
    before = runtime.export_state()
    with pytest.raises(error, match=message):
        runtime.add_backend(*args, actor="a")
    unchanged(runtime, rec, before)
    assert len(runtime.backends) == 4


def test_same_address_in_another_pool_is_fine(runtime: Runtime) -> None:
    # green-1 is at 127.0.0.1:9003 too: only the same address in the same pool is refused
    backend = runtime.add_backend("blue", "127.0.0.1:9003", None, 1, "a")
    assert (backend.id, backend.pool, backend.address) == ("blue-3", "blue", "127.0.0.1:9003")
    assert runtime.backends["blue-3"] is backend
    assert runtime.backends["green-1"].address == "127.0.0.1:9003"
    assert runtime.added == {
        "blue-3": {"id": "blue-3", "pool": "blue", "address": "127.0.0.1:9003", "weight": 1}
    }
    assert [b.id for b in runtime.snapshot.pools["blue"].backends] == ["blue-1", "blue-2", "blue-3"]


def test_remove_idle_backend_is_immediate(runtime: Runtime) -> None:
    rec = Recorder(runtime)
    assert runtime.remove_backend("blue-2", "ops") is True
    assert "blue-2" not in runtime.backends
    assert "blue-2" not in rec.snapshots[-1].backends
    assert len(rec.snapshots) == 1
    assert runtime.removed == {"blue-2": {"pool": "blue", "address": "127.0.0.1:9002"}}
    event = runtime.events.last()
    assert event is not None and event["action"] == "backend.remove" and event["after"] is None


def test_remove_busy_backend_drains_then_deletes(runtime: Runtime, clock: Clock) -> None:
    backend = runtime.backends["blue-2"]
    backend.in_flight = 2
    assert runtime.remove_backend("blue-2", "ops") is False
    assert backend.state is BackendState.DRAINING
    assert backend not in runtime.snapshot.pools["blue"].routable
    assert "blue-2" in runtime.removing
    with pytest.raises(Conflict, match="already being removed"):
        runtime.remove_backend("blue-2", "ops")
    with pytest.raises(Conflict, match="being removed"):
        runtime.enable("blue-2", "ops")
    runtime.tick()
    assert "blue-2" in runtime.backends
    backend.in_flight = 0
    rec = Recorder(runtime)
    runtime.tick()
    assert "blue-2" not in runtime.backends
    assert len(rec.snapshots) == 1
    event = runtime.events.last()
    assert event is not None
    assert (event["actor"], event["action"], event["target"]) == (
        "zdproxy",
        "backend.removed",
        "blue-2",
    )


def test_removal_deadline(runtime: Runtime, clock: Clock) -> None:
    backend = runtime.backends["blue-2"]
    backend.in_flight = 1
    runtime.remove_backend("blue-2", "ops")
    clock.now += 9.9
    runtime.tick()
    assert "blue-2" in runtime.backends
    clock.now += 0.2
    runtime.tick()
    assert "blue-2" not in runtime.backends


def test_removing_an_added_backend_forgets_it(runtime: Runtime) -> None:
    runtime.add_backend("green", "127.0.0.1:9005", "green-3", 1, "ci")
    runtime.remove_backend("green-3", "ci")
    assert runtime.added == {} and runtime.removed == {}


def test_unknown_backend_is_not_found(runtime: Runtime) -> None:
    for call in (runtime.drain, runtime.disable, runtime.enable, runtime.remove_backend):
        with pytest.raises(NotFound, match="no backend with id 'nope'"):
            call("nope", "a")


# ---- drain, disable, enable ----------------------------------------------------


def test_drain_progresses_to_drained_when_idle(runtime: Runtime, clock: Clock) -> None:
    backend = runtime.backends["blue-1"]
    backend.in_flight = 1
    event = runtime.drain("blue-1", "ops")
    assert event is not None and event.action == "backend.drain"
    assert backend.state is BackendState.DRAINING
    assert runtime.drain_started["blue-1"] == clock.now
    assert backend not in runtime.snapshot.pools["blue"].routable
    runtime.tick()
    assert backend.state is BackendState.DRAINING
    backend.in_flight = 0
    runtime.tick()
    assert backend.state is BackendState.DRAINED and backend.admin is Admin.DRAINED
    assert "blue-1" not in runtime.drain_started
    last = runtime.events.last()
    assert last is not None and last["action"] == "backend.drained"


def test_drain_times_out(runtime: Runtime, clock: Clock) -> None:
    backend = runtime.backends["blue-1"]
    backend.in_flight = 1
    runtime.drain("blue-1", "ops")
    clock.now += 10.0
    runtime.tick()
    assert backend.state is BackendState.DRAINED


def test_sticky_until_timeout_keeps_draining(clock: Clock) -> None:
    runtime = Runtime(
        make_config(draining={"timeout": "10s", "sticky_until_timeout": True}), clock=clock
    )
    runtime.drain("blue-1", "ops")
    runtime.tick()
    assert runtime.backends["blue-1"].state is BackendState.DRAINING
    clock.now += 10
    runtime.tick()
    assert runtime.backends["blue-1"].state is BackendState.DRAINED


def test_tick_applies_everything_in_one_snapshot(runtime: Runtime) -> None:
    runtime.drain("blue-1", "ops")
    runtime.drain("blue-2", "ops")
    rec = Recorder(runtime)
    runtime.tick()
    assert len(rec.snapshots) == 1 and len(rec.states) == 1


def test_admin_transition_table(runtime: Runtime) -> None:
    assert runtime.drain("blue-1", "a") is not None
    assert runtime.drain("blue-1", "a") is None  # already draining: nothing to do
    assert runtime.disable("blue-1", "a") is not None
    assert runtime.disable("blue-1", "a") is None
    with pytest.raises(Conflict, match="enable it before draining"):
        runtime.drain("blue-1", "a")
    assert runtime.enable("blue-1", "a") is not None
    assert runtime.enable("blue-1", "a") is None
    assert runtime.backends["blue-1"].state is BackendState.UP


def test_enable_restarts_health_checks(clock: Clock) -> None:
    runtime = Runtime(make_config(health_check={"enabled": True}), clock=clock)
    runtime.set_health("blue-1", Health.UP)
    runtime.disable("blue-1", "a")
    runtime.enable("blue-1", "a")
    backend = runtime.backends["blue-1"]
    assert backend.health is Health.STARTING and backend.state is BackendState.STARTING
    runtime.set_health("blue-1", Health.UP)
    assert backend.state is BackendState.UP


def test_health_changes_are_not_audited_nor_persisted(runtime: Runtime) -> None:
    rec = Recorder(runtime)
    runtime.set_health("blue-1", Health.DOWN)
    assert len(rec.snapshots) == 1 and rec.states == [] and len(runtime.events) == 0


# ---- persistence: export and restore -------------------------------------------


def changed_runtime(clock: Clock) -> Runtime:
    runtime = Runtime(make_config(), clock=clock)
    runtime.flip("green", "a")
    runtime.disable("blue-1", "a")
    runtime.drain("green-2", "a")
    runtime.add_backend("green", "127.0.0.1:9005", "green-3", 3, "a")
    runtime.remove_backend("blue-2", "a")
    return runtime


def test_export_restore_round_trip(clock: Clock) -> None:
    state = check_state(json.loads(json.dumps(changed_runtime(clock).export_state())))
    fresh = Runtime(make_config(), clock=clock)
    rec = Recorder(fresh)
    fresh.restore(state)
    assert len(rec.snapshots) == 1 and rec.states == []
    assert fresh.pool_weights == {"blue": 0, "green": 100}
    assert fresh.backends["blue-1"].state is BackendState.DISABLED
    assert fresh.backends["green-2"].state is BackendState.DRAINING
    assert fresh.drain_started["green-2"] == clock.now
    assert fresh.backends["green-3"].weight == 3
    assert "blue-2" not in fresh.backends
    state2 = fresh.export_state()
    assert state2 | {"saved_at": None} == state | {"saved_at": None}


def _restored(state: dict[str, Any], clock: Clock, **config: Any) -> Runtime:
    runtime = Runtime(make_config(**config), clock=clock)
    runtime.restore(check_state(state))
    return runtime


def test_config_weights_changed_since_save_win(clock: Clock) -> None:
    state = changed_runtime(clock).export_state()
    pools = make_config().model_dump(mode="json")["pools"]
    pools["blue"]["weight"], pools["green"]["weight"] = 50, 50
    for pool in pools.values():
        for b in pool["backends"]:
            b["address"] = f"{b['address']['host']}:{b['address']['port']}"
    runtime = _restored(state, clock, pools=pools)
    assert runtime.pool_weights == {"blue": 50, "green": 50}
    assert runtime.backends["blue-1"].state is BackendState.DISABLED  # the rest still applies


def test_config_pool_set_changed_config_wins(clock: Clock) -> None:
    state = changed_runtime(clock).export_state()
    runtime = _restored(
        state,
        clock,
        pools={
            "blue": {"weight": 100, "backends": [{"id": "blue-1", "address": "127.0.0.1:9001"}]},
            "red": {"weight": 0, "backends": [{"id": "red-1", "address": "127.0.0.1:9010"}]},
        },
    )
    assert runtime.pool_weights == {"blue": 100, "red": 0}
    assert "green-3" not in runtime.backends  # its pool left the config
    assert runtime.backends["blue-1"].state is BackendState.DISABLED


def test_backend_deleted_from_config_stays_gone(clock: Clock) -> None:
    state = changed_runtime(clock).export_state()
    runtime = _restored(
        state,
        clock,
        pools={
            "blue": {"weight": 100, "backends": [{"id": "blue-9", "address": "127.0.0.1:9001"}]},
            "green": {"weight": 0, "backends": [{"id": "green-1", "address": "127.0.0.1:9003"}]},
        },
    )
    assert set(runtime.backends) == {"blue-9", "green-1", "green-3"}
    assert runtime.backends["blue-9"].state is BackendState.UP  # blue-1's state does not move
    assert runtime.removed == {}


def test_removed_backend_comes_back_when_config_changed_it(clock: Clock) -> None:
    state = changed_runtime(clock).export_state()
    pools = {
        "blue": {
            "weight": 100,
            "backends": [
                {"id": "blue-1", "address": "127.0.0.1:9001"},
                {"id": "blue-2", "address": "127.0.0.1:9999"},
            ],
        },
        "green": {"weight": 0, "backends": [{"id": "green-1", "address": "127.0.0.1:9003"}]},
    }
    runtime = _restored(state, clock, pools=pools)
    assert runtime.backends["blue-2"].address == "127.0.0.1:9999"
    same = _restored(state, clock)
    assert "blue-2" not in same.backends


def test_added_backend_gives_way_to_config(clock: Clock) -> None:
    state = changed_runtime(clock).export_state()
    pools = make_config().model_dump(mode="json")["pools"]
    for pool in pools.values():
        for b in pool["backends"]:
            b["address"] = f"{b['address']['host']}:{b['address']['port']}"
    pools["green"]["backends"].append({"id": "green-3", "address": "127.0.0.1:9100"})
    runtime = _restored(state, clock, pools=pools)
    assert runtime.backends["green-3"].address == "127.0.0.1:9100"
    assert "green-3" not in runtime.added
    pools["green"]["backends"][-1] = {"id": "green-x", "address": "127.0.0.1:9005"}
    runtime = _restored(state, clock, pools=pools)
    assert "green-3" not in runtime.backends  # same address as a config backend


# ---- stores ---------------------------------------------------------------------


def test_file_store_round_trip_and_atomic_replace(tmp_path: Path, clock: Clock) -> None:
    path = tmp_path / "sub" / "state.json"
    store = FileStore(str(path))
    assert store.load() is None
    state = changed_runtime(clock).export_state()
    store.save(state)
    store.save(state)
    assert store.load() == json.loads(json.dumps(state))
    assert sorted(os.listdir(path.parent)) == ["state.json"]  # no temp file left


@pytest.mark.parametrize(
    "content",
    [
        b"{not json",
        b"[]",
        b'{"format": 99}',
        b'{"format": 1, "weights": {"blue": "x"}, "config_weights": {}, "admin": {},'
        b' "added": [], "removed": {}}',
        b"\xff\xfe",
    ],
)
def test_corrupt_state_is_set_aside(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "state.json"
    path.write_bytes(content)
    store = FileStore(str(path))
    assert store.load() is None
    assert not path.exists()
    aside = list(tmp_path.glob("state.json.corrupt-*"))
    assert len(aside) == 1 and aside[0].read_bytes() == content
    path.write_bytes(content)
    assert FileStore(str(path)).load() is None
    assert len(list(tmp_path.glob("state.json.corrupt-*"))) == 2  # never overwritten


def test_store_that_cannot_set_aside_refuses_to_save(tmp_path: Path) -> None:
    store = FileStore(str(tmp_path / "state.json"))
    store._set_aside("is corrupt (test)")  # nothing to rename: the rename fails
    assert store.read_only_reason is not None
    with pytest.raises(StoreError, match="could not be moved aside"):
        store.save({"format": 1})


async def test_background_writer_coalesces_and_flushes() -> None:
    store = MemoryStore()
    writer = BackgroundWriter()
    for n in range(50):
        writer.save_state(store, {"n": n})
    await writer.flush()
    assert store.state == {"n": 49}
    assert 1 <= store.saves < 50
    await writer.close()


async def test_background_writer_reports_failures() -> None:
    class Broken:
        def load(self) -> None:
            return None

        def save(self, state: dict[str, Any]) -> None:
            raise OSError("disk full")

    writer = BackgroundWriter()
    writer.save_state(Broken(), {})
    await writer.flush()
    assert writer.last_error is not None and "disk full" in writer.last_error
    await writer.close()


async def test_persistence_saves_every_change_and_the_audit_file(
    tmp_path: Path, clock: Clock
) -> None:
    path = tmp_path / "state.json"
    runtime = Runtime(make_config(), clock=clock)
    persistence = Persistence(runtime, FileStore(str(path)), str(path) + ".events.jsonl")
    assert persistence.restore() is False
    persistence.attach()
    runtime.flip("green", "a")
    runtime.drain("blue-1", "a")
    await persistence.flush()
    saved = json.loads(path.read_text())
    assert saved["weights"] == {"blue": 0, "green": 100}
    assert saved["admin"] == {"blue-1": "draining"}
    audit = (tmp_path / "state.json.events.jsonl").read_text().splitlines()
    lines = [json.loads(line) for line in audit]
    assert lines == runtime.events.list()
    await persistence.close()

    again = Runtime(make_config(), clock=clock)
    assert Persistence(again, FileStore(str(path)), str(path) + ".events.jsonl").restore()
    assert again.pool_weights == {"blue": 0, "green": 100}
    assert again.events.list() == runtime.events.list()
    assert again.events.next_id == 3
    await asyncio.sleep(0)


# ---- audit log ---------------------------------------------------------------------


def test_event_ring_is_bounded() -> None:
    log = EventLog(3)
    for n in range(5):
        log.record("a", "split", str(n), None, n)
    events = log.list()
    assert [e["id"] for e in events] == [3, 4, 5]
    assert [e["id"] for e in log.list(since=3)] == [4, 5]
    assert [e["id"] for e in log.list(limit=1)] == [5]


def test_read_tail_skips_torn_lines(tmp_path: Path) -> None:
    path = str(tmp_path / "events.jsonl")
    log = EventLog(10)
    for n in range(4):
        append_line(path, encode(log.record("a", "flip", "green", None, n)))
    with open(path, "a") as f:
        f.write('{"id": 5, "torn')
    records = read_tail(path, 3)
    assert [r["id"] for r in records] == [2, 3, 4]
    assert read_tail(str(tmp_path / "missing"), 3) == []


def test_sink_failure_does_not_break_a_change(runtime: Runtime) -> None:
    def broken(event: object) -> None:
        raise RuntimeError("sink down")

    runtime.events.subscribe(broken)
    assert runtime.flip("green", "a") is not None
    assert runtime.pool_weights["green"] == 100


def test_drain_started_is_on_the_runtime_clock(runtime: Runtime, clock: Clock) -> None:
    clock.now = 42.0
    runtime.drain("green-1", "a")
    assert runtime.drain_started == {"green-1": 42.0}
    runtime.enable("green-1", "a")
    assert runtime.drain_started == {}
