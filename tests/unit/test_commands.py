"""Typed runtime commands, ``Runtime.apply`` and ``Runtime.batch``. Plain values."""

from __future__ import annotations

from typing import Any

import pytest

from zdproxy.balancing.model import BackendState, Flag, Snapshot
from zdproxy.control.commands import (
    AddBackend,
    Disable,
    Drain,
    Enable,
    Flip,
    RemoveBackend,
    RolloutWeights,
    SetWeights,
)
from zdproxy.control.runtime import Runtime
from zdproxy.errors import Conflict, ControlError, NotFound

from .test_backend_model import Clock, make_config


class Recorder:
    """Snapshot and state listeners: what was published and saved."""

    def __init__(self, runtime: Runtime) -> None:
        self.snapshots: list[Snapshot] = []
        self.saves: list[dict[str, Any]] = []
        runtime.subscribe(self.snapshots.append)
        runtime.subscribe_state(self.saves.append)


def fresh() -> tuple[Runtime, Recorder]:
    runtime = Runtime(make_config(), clock=Clock())
    return runtime, Recorder(runtime)


def test_each_command_applies_with_one_publication_and_one_event() -> None:
    runtime, seen = fresh()
    cases: list[tuple[Any, str, str]] = [
        (SetWeights({"blue": 60, "green": 40}), "split", "blue,green"),
        (Flip("green"), "flip", "green"),
        (Drain("blue-1"), "backend.drain", "blue-1"),
        (Disable("blue-1"), "backend.disable", "blue-1"),
        (Enable("blue-1"), "backend.enable", "blue-1"),
        (AddBackend("green", "127.0.0.1:9100", "green-9", 2), "backend.add", "green-9"),
        (RemoveBackend("green-9"), "backend.remove", "green-9"),
        (
            RolloutWeights({"blue": 90, "green": 10}, "rollout.step", "rollout-1", extra={"s": 1}),
            "rollout.step",
            "rollout-1",
        ),
    ]
    for command, action, target in cases:
        published, saved = len(seen.snapshots), len(seen.saves)
        event = runtime.apply(command, "ops")
        assert event is not None, command
        assert (event.action, event.target, event.actor) == (action, target, "ops")
        assert len(seen.snapshots) == published + 1, command
        assert len(seen.saves) == saved + 1, command
    assert runtime.pool_weights == {"blue": 90, "green": 10}
    assert "green-9" not in runtime.backends


def test_a_command_that_changes_nothing_returns_none_and_publishes_nothing() -> None:
    runtime, seen = fresh()
    runtime.apply(Drain("blue-1"), "ops")
    published = len(seen.snapshots)
    assert runtime.apply(Drain("blue-1"), "ops") is None
    assert runtime.apply(SetWeights({"blue": 100}), "ops") is None
    assert len(seen.snapshots) == published


@pytest.mark.parametrize(
    ("command", "error", "status"),
    [
        (SetWeights({"blue": 50, "green": 40}), ControlError, 400),
        (SetWeights({"nope": 100}), NotFound, 404),
        (SetWeights({"blue": "100"}), ControlError, 400),
        (Flip(7), ControlError, 400),
        (Drain("nope"), NotFound, 404),
        (AddBackend("blue", "127.0.0.1:9001"), Conflict, 409),
        (AddBackend("blue", "no-port"), ControlError, 400),
        (AddBackend("blue", "127.0.0.1:9100", "bad id!"), ControlError, 400),
        (RemoveBackend(None), NotFound, 404),
        (RolloutWeights({"blue": 50}, "rollout.step", "r"), ControlError, 400),
    ],
)
def test_bad_commands_raise_one_error_family_and_change_nothing(
    command: Any, error: type[ControlError], status: int
) -> None:
    runtime, seen = fresh()
    before = runtime.snapshot.to_dict()
    with pytest.raises(error) as caught:
        runtime.apply(command, "ops")
    assert isinstance(caught.value, ControlError) and caught.value.status == status
    assert runtime.snapshot.to_dict() == before
    assert seen.snapshots == [] and seen.saves == []
    assert len(runtime.events) == 0


def test_a_batch_publishes_once_and_saves_once() -> None:
    runtime, seen = fresh()
    with runtime.batch():
        runtime.apply(SetWeights({"blue": 50, "green": 50}), "ops")
        runtime.apply(Drain("blue-1"), "ops")
        runtime.apply(Disable("green-1"), "ops")
        runtime.apply(AddBackend("green", "127.0.0.1:9100"), "ops")
        assert seen.snapshots == [] and seen.saves == []
    assert len(seen.snapshots) == 1 and len(seen.saves) == 1
    snapshot = seen.snapshots[0]
    assert snapshot is runtime.snapshot
    assert snapshot.pool_weights() == {"blue": 50, "green": 50}
    assert snapshot.flags["blue-1"] == Flag.ADMIN_DRAIN
    assert snapshot.flags["green-1"] == Flag.DISABLED
    assert "green-2" in snapshot.backends  # POOL-N
    assert [e["action"] for e in runtime.events.list()] == [
        "split",
        "backend.drain",
        "backend.disable",
        "backend.add",
    ]
    assert seen.saves[0]["weights"] == {"blue": 50, "green": 50}


def test_an_empty_batch_publishes_nothing() -> None:
    runtime, seen = fresh()
    with runtime.batch():
        assert runtime.apply(Enable("blue-1"), "ops") is None
    assert seen.snapshots == [] and seen.saves == []


def test_an_error_mid_batch_undoes_the_whole_batch() -> None:
    runtime, seen = fresh()
    runtime.apply(Drain("green-1"), "ops")
    before = runtime.snapshot
    before_value = before.to_dict()
    events_before = runtime.events.list()
    published, saved = len(seen.snapshots), len(seen.saves)
    with pytest.raises(Conflict), runtime.batch():
        runtime.apply(SetWeights({"blue": 50, "green": 50}), "ops")
        runtime.apply(Disable("blue-1"), "ops")
        runtime.apply(AddBackend("blue", "127.0.0.1:9100", "blue-9"), "ops")
        runtime.apply(Enable("green-1"), "ops")
        runtime.apply(AddBackend("blue", "127.0.0.1:9100"), "ops")  # same address: 409
    # nothing published, nothing saved, the state is as before the batch
    assert len(seen.snapshots) == published and len(seen.saves) == saved
    assert runtime.snapshot is before
    assert runtime.pool_weights == {"blue": 100, "green": 0}
    assert runtime.backends["blue-1"].flags == Flag(0)
    assert runtime.backends["green-1"].flags == Flag.ADMIN_DRAIN
    assert runtime.backends["green-1"].state is BackendState.DRAINING
    assert "blue-9" not in runtime.backends and "blue-9" not in runtime.added
    assert runtime.events.list() == events_before
    # the next change publishes from the restored state
    runtime.apply(Drain("blue-2"), "ops")
    after = runtime.snapshot.to_dict()
    assert after["pools"] == before_value["pools"]
    assert {b["id"] for b in after["backends"]} == {b["id"] for b in before_value["backends"]}


def test_a_batch_inside_a_batch_is_part_of_the_outer_one() -> None:
    runtime, seen = fresh()
    with runtime.batch():
        with runtime.batch():
            runtime.apply(Drain("blue-1"), "ops")
        assert seen.snapshots == []
        runtime.apply(Drain("blue-2"), "ops")
    assert len(seen.snapshots) == 1


def test_wrappers_keep_their_return_values() -> None:
    runtime, _ = fresh()
    backend = runtime.add_backend("green", "127.0.0.1:9100", actor="ops")
    assert backend.id == "green-2" and backend.pool == "green"
    assert runtime.remove_backend("green-2", "ops") is True
    runtime.backends["blue-1"].in_flight = 1
    assert runtime.remove_backend("blue-1", "ops") is False
    assert runtime.backends["blue-1"].flags == Flag.ADMIN_DRAIN | Flag.REMOVING
