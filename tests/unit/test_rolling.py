"""The rolling update controller with plain values: a runtime, a fake clock, and
health results set by hand (no sockets, no tasks: ``tick`` is called directly)."""

from __future__ import annotations

from typing import Any

import pytest

from zdproxy.balancing.model import Admin, BackendState, Health
from zdproxy.config.schema import Config
from zdproxy.control.rolling import Phase, RollingUpdates, Step
from zdproxy.control.runtime import Runtime
from zdproxy.errors import Conflict, ControlError, NotFound


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def make(n: int = 3) -> tuple[Runtime, RollingUpdates, Clock]:
    config = Config.model_validate(
        {
            "listen": ["127.0.0.1:8080"],
            "state": {"path": None},
            "health_check": {"enabled": True},
            "draining": {"timeout": "10s"},
            "pools": {
                "app": {
                    "weight": 100,
                    "backends": [
                        {"id": f"app-{i}", "address": f"127.0.0.1:{9000 + i}"}
                        for i in range(1, n + 1)
                    ],
                },
                "other": {"weight": 0, "backends": [{"address": "127.0.0.1:9100"}]},
            },
        }
    )
    clock = Clock()
    runtime = Runtime(config, clock=clock)
    for backend_id in runtime.backends:
        runtime.set_health(backend_id, Health.UP)
    return runtime, RollingUpdates(runtime, clock=clock), clock


def steps(rolling: RollingUpdates, pool: str = "app") -> dict[str, str]:
    return {k: v.value for k, v in rolling.updates[pool].steps.items()}


def advance(runtime: Runtime, rolling: RollingUpdates, clock: Clock, seconds: float = 0.1) -> None:
    clock.now += seconds
    runtime.tick()
    rolling.tick()


def test_one_backend_at_a_time_through_every_step() -> None:
    runtime, rolling, clock = make()
    update = rolling.start("app", {}, "deployer")
    assert steps(rolling) == {"app-1": "draining", "app-2": "queued", "app-3": "queued"}
    assert runtime.backends["app-1"].state is BackendState.DRAINING
    with pytest.raises(Conflict, match="no backend is waiting"):
        rolling.next("app", "deployer")
    runtime.backends["app-1"].in_flight = 1
    advance(runtime, rolling, clock)
    assert steps(rolling)["app-1"] == "draining"  # a request is still in flight
    runtime.backends["app-1"].in_flight = 0
    advance(runtime, rolling, clock)
    assert steps(rolling)["app-1"] == "replace"
    assert runtime.backends["app-1"].state is BackendState.DRAINED
    advance(runtime, rolling, clock, 30)  # no replace_timeout: waits for next
    assert steps(rolling)["app-1"] == "replace"
    rolling.next(None, "deployer")
    assert steps(rolling)["app-1"] == "starting"
    # enabled again: it rises afresh through the health checks
    assert runtime.backends["app-1"].state is BackendState.STARTING
    advance(runtime, rolling, clock)
    assert steps(rolling)["app-1"] == "starting"
    runtime.set_health("app-1", Health.UP)
    advance(runtime, rolling, clock)
    assert steps(rolling) == {"app-1": "done", "app-2": "draining", "app-3": "queued"}
    for backend_id in ("app-2", "app-3"):
        advance(runtime, rolling, clock)
        assert steps(rolling)[backend_id] == "replace"
        rolling.next("app", "deployer")
        runtime.set_health(backend_id, Health.UP)
        advance(runtime, rolling, clock)
    assert update.phase is Phase.SUCCEEDED and update.reason is None
    assert all(b.state is BackendState.UP for b in runtime.backends.values())
    actions = [e["action"] for e in runtime.events.list()]
    assert actions[0] == "rolling.start" and actions[-1] == "rolling.done"
    assert actions.count("rolling.next") == 3
    assert actions.count("backend.drain") == 3 and actions.count("backend.enable") == 3
    view = rolling.view()["updates"][0]
    assert view["phase"] == "succeeded" and view["done"] == 3 and view["total"] == 3


def test_slow_start_is_waited_out() -> None:
    runtime, rolling, clock = make(2)
    ramping: set[str] = set()
    rolling.slow_start_percent = lambda b: 50 if b in ramping else None
    rolling.start("app", {"wait_replaced": False}, "d")
    advance(runtime, rolling, clock)  # drained: enabled at once (no wait for next)
    assert steps(rolling)["app-1"] == "starting"
    ramping.add("app-1")
    runtime.set_health("app-1", Health.UP)
    advance(runtime, rolling, clock)
    assert steps(rolling) == {"app-1": "slow_start", "app-2": "queued"}
    advance(runtime, rolling, clock, 5)
    assert steps(rolling)["app-2"] == "queued"
    ramping.clear()
    advance(runtime, rolling, clock)
    assert steps(rolling) == {"app-1": "done", "app-2": "draining"}


@pytest.mark.parametrize(
    ("batch", "minimum", "first"),
    [(2, 1, ["app-1", "app-2"]), (3, 2, ["app-1"]), (3, 0, ["app-1", "app-2", "app-3"])],
)
def test_batch_and_minimum_in_rotation(batch: int, minimum: int, first: list[str]) -> None:
    runtime, rolling, _ = make(3)
    rolling.start("app", {"batch": batch, "min_in_rotation": minimum}, "d")
    assert [b for b, s in steps(rolling).items() if s == "draining"] == first
    up = [b for b in runtime.backends.values() if b.pool == "app" and b.state is BackendState.UP]
    assert len(up) == 3 - len(first) >= minimum


def test_a_down_backend_shrinks_the_batch_and_is_taken_first_for_free() -> None:
    runtime, rolling, _ = make(3)
    runtime.set_health("app-3", Health.DOWN)
    rolling.start("app", {"batch": 2, "min_in_rotation": 1}, "d")
    # two up (app-1, app-2): only one of them may go; app-3 is out anyway
    assert steps(rolling) == {"app-1": "draining", "app-2": "queued", "app-3": "draining"}


def test_the_down_backend_goes_first_and_the_last_one_up_stays() -> None:
    runtime, rolling, clock = make(2)
    runtime.set_health("app-2", Health.DOWN)
    update = rolling.start("app", {"healthy_timeout": "5s"}, "d")
    # app-2 is down: it can go; app-1 cannot (it is the last one up)
    assert steps(rolling) == {"app-1": "queued", "app-2": "draining"}
    advance(runtime, rolling, clock)
    rolling.next("app", "d")
    advance(runtime, rolling, clock, 6)
    assert update.phase is Phase.FAILED
    assert "app-2" in (update.reason or "") and "did not come back healthy within 5s" in (
        update.reason or ""
    )


def test_a_backend_that_does_not_come_back_stops_the_update() -> None:
    runtime, rolling, clock = make(3)
    runtime.health_info["app-1"] = {"last_error": "connection refused", "last_status": None}
    update = rolling.start("app", {"healthy_timeout": "10s"}, "d")
    advance(runtime, rolling, clock)
    rolling.next("app", "d")
    advance(runtime, rolling, clock, 9)
    assert update.running
    advance(runtime, rolling, clock, 2)
    assert update.phase is Phase.FAILED
    assert update.reason == (
        "backend app-1 (127.0.0.1:9001) did not come back healthy within 10s "
        "(state starting, last check: connection refused)"
    )
    assert steps(rolling) == {"app-1": "failed", "app-2": "queued", "app-3": "queued"}
    # the rest keep serving, untouched
    assert runtime.backends["app-2"].state is BackendState.UP
    assert runtime.backends["app-3"].state is BackendState.UP
    assert runtime.events.list()[-1]["action"] == "rolling.failed"
    assert runtime.events.list()[-1]["note"] == update.reason
    # a finished update can be followed by a new one
    rolling.start("app", {}, "d")
    assert rolling.updates["app"].id == update.id + 1


def test_replace_timeout() -> None:
    runtime, rolling, clock = make(2)
    update = rolling.start("app", {"replace_timeout": "3s"}, "d")
    advance(runtime, rolling, clock)
    advance(runtime, rolling, clock, 2)
    assert update.running
    advance(runtime, rolling, clock, 2)
    assert update.phase is Phase.FAILED and "not replaced (next) within 3s" in (update.reason or "")


def test_operator_interference_stops_it() -> None:
    runtime, rolling, clock = make(2)
    update = rolling.start("app", {}, "d")
    advance(runtime, rolling, clock)
    runtime.enable("app-1", "someone")
    advance(runtime, rolling, clock)
    assert update.phase is Phase.FAILED
    assert update.reason == "backend app-1 was enabled by someone else before next"


def test_refusals() -> None:
    _, rolling, _ = make(2)
    with pytest.raises(NotFound):
        rolling.start("nope", {}, "d")
    for body, message in [
        ({"batch": 0}, "batch must be"),
        ({"batch": "2"}, "batch must be"),
        ({"min_in_rotation": -1}, "min_in_rotation must be"),
        ({"min_in_rotation": 2}, "leaves no backend"),
        ({"wait_replaced": "yes"}, "wait_replaced"),
        ({"healthy_timeout": "soon"}, "healthy_timeout: invalid duration"),
        ({"healthy_timeout": 0}, "healthy_timeout must be a positive"),
        ({"bacth": 1}, "unknown key 'bacth'"),
    ]:
        with pytest.raises(ControlError, match=message) as info:
            rolling.start("app", body, "d")
        assert info.value.status == 400
    assert rolling.updates == {}
    with pytest.raises(NotFound, match="no rolling update is running"):
        rolling.next(None, "d")
    rolling.start("app", {}, "d")
    with pytest.raises(Conflict, match="already running"):
        rolling.start("app", {}, "d")
    rolling.start("other", {"min_in_rotation": 0}, "d")
    with pytest.raises(ControlError, match="several pools"):
        rolling.abort(None, "d")
    rolling.abort("app", "d")
    with pytest.raises(Conflict, match="aborted"):
        rolling.next("app", "d")


def test_abort_leaves_backends_as_they_are() -> None:
    runtime, rolling, clock = make(3)
    update = rolling.start("app", {}, "d")
    advance(runtime, rolling, clock)
    rolling.abort("app", "ops")
    assert update.phase is Phase.ABORTED
    assert update.reason == "aborted by ops; left out of rotation: app-1 (enable to bring back)"
    assert runtime.backends["app-1"].admin is Admin.DRAINED
    advance(runtime, rolling, clock, 100)
    assert steps(rolling)["app-2"] == "queued"
    assert runtime.events.list()[-1]["action"] == "rolling.abort"


def test_progress_survives_a_restart_and_resumes() -> None:
    runtime, rolling, clock = make(3)
    saved: list[dict[str, Any]] = []
    runtime.subscribe_state(saved.append)
    rolling.start("app", {"batch": 1}, "d")
    advance(runtime, rolling, clock)
    rolling.next("app", "d")
    runtime.set_health("app-1", Health.UP)
    advance(runtime, rolling, clock)
    advance(runtime, rolling, clock)
    assert steps(rolling) == {"app-1": "done", "app-2": "replace", "app-3": "queued"}
    state = saved[-1]
    assert state["rolling"]["updates"]["app"]["steps"]["app-2"] == "replace"

    runtime2, rolling2, clock2 = make(3)
    runtime2.restore(state)
    assert steps(rolling2) == {"app-1": "done", "app-2": "replace", "app-3": "queued"}
    assert runtime2.backends["app-2"].admin is Admin.DRAINED
    rolling2.next("app", "d")
    runtime2.set_health("app-2", Health.UP)
    advance(runtime2, rolling2, clock2)
    assert steps(rolling2)["app-3"] == "draining"
    assert rolling2.updates["app"].id == 1 and rolling2._next_id == 2


def test_an_unusable_saved_section_is_dropped() -> None:
    _, rolling, _ = make(2)
    rolling.restore({"next_id": 3, "updates": {"app": {"id": 1}}})
    assert rolling.updates == {}
    rolling.restore({"next_id": 3, "updates": {"gone": {}}})
    assert rolling.updates == {}
    assert Step.DONE.value == "done"


@pytest.mark.parametrize("recovers", [True, False])
def test_a_batch_waits_for_room(recovers: bool) -> None:
    runtime, rolling, clock = make(3)
    update = rolling.start("app", {"min_in_rotation": 2, "healthy_timeout": "5s"}, "d")
    for backend_id in ("app-1", "app-2"):
        advance(runtime, rolling, clock)
        rolling.next("app", "d")
        runtime.set_health(backend_id, Health.UP)
        if backend_id == "app-2":
            runtime.set_health("app-1", Health.DOWN)  # a done one fails meanwhile
        advance(runtime, rolling, clock)
    # only app-2 and app-3 are up: app-3 cannot go
    assert steps(rolling) == {"app-1": "done", "app-2": "done", "app-3": "queued"}
    assert update.waiting == "2 backend(s) of pool app in rotation, at least 2 must stay"
    assert rolling.view()["updates"][0]["waiting_for"] == update.waiting
    advance(runtime, rolling, clock, 4)
    assert update.running and steps(rolling)["app-3"] == "queued"
    if recovers:
        runtime.set_health("app-1", Health.UP)
        advance(runtime, rolling, clock)
        assert steps(rolling)["app-3"] == "draining" and update.waiting is None
        return
    advance(runtime, rolling, clock, 2)
    assert update.phase is Phase.FAILED
    assert update.reason == "waited 5s: 2 backend(s) of pool app in rotation, at least 2 must stay"
    assert runtime.backends["app-3"].state is BackendState.UP
