"""The rollout engine with a fake clock and traffic written straight into the
pools' counters: plan validation, gates, steps, verdicts, rollback, pause,
promote, abort, the split guard and restore from saved state. No I/O."""

from __future__ import annotations

import json
from typing import Any

import pytest

from unit.test_runtime import Clock, make_config
from zdproxy.balancing.model import Admin, BackendState
from zdproxy.control.rollout import Phase, RolloutController, parse_plan
from zdproxy.control.runtime import Runtime
from zdproxy.errors import Conflict, ControlError, NotFound


def setup() -> tuple[Runtime, RolloutController, Clock]:
    clock = Clock()
    runtime = Runtime(make_config(), clock=clock)
    controller = RolloutController(runtime, wall=clock)
    return runtime, controller, clock


def traffic(
    runtime: Runtime, clock: Clock, *, green_errors: float = 0.0, delay: float = 0.0, n: int = 100
) -> None:
    """``n`` requests split by the current weights (deterministic)."""
    weight = runtime.pool_weights["green"]
    green = n * weight // 100
    for i in range(green):
        bad = i < green * green_errors
        runtime.pool_stats["green"].record(500 if bad else 200, 0.002 + delay, clock.now)
    for _ in range(n - green):
        runtime.pool_stats["blue"].record(200, 0.002, clock.now)


def run(
    runtime: Runtime, controller: RolloutController, clock: Clock, seconds: float, **kw: Any
) -> None:
    end = clock.now + seconds
    while clock.now < end and controller.current is not None and controller.current.active:
        traffic(runtime, clock, **kw)
        clock.now += 0.05
        controller.tick()


PLAN = {
    "to": "green",
    "steps": [
        {"weight": 10, "pause": "2s"},
        {"weight": 50, "pause": "2s"},
        {"weight": 100, "pause": "1s"},
    ],
    "analysis": {"interval": "500ms", "min_requests": 20, "max_error_rate": 0.05},
}


@pytest.mark.parametrize(
    ("body", "status", "message"),
    [
        ({}, 400, "to: expected"),
        ({"to": "purple", "steps": [{"weight": 10}]}, 404, "no pool named 'purple'"),
        ({"to": "green"}, 400, "steps: expected a list"),
        ({"to": "green", "steps": [{"weight": 0}]}, 400, "steps[0].weight"),
        ({"to": "green", "steps": [{"weight": 50}, {"weight": 10}]}, 400, "must not decrease"),
        ({"to": "green", "steps": [{"weight": 10, "pause": "soon"}]}, 400, "steps[0].pause"),
        ({"to": "green", "steps": [{"weight": 10, "wait": 1}]}, 400, "unknown key 'wait'"),
        (
            {"to": "green", "steps": [{"weight": 10}], "analysis": {"interval": "1ms"}},
            400,
            "analysis.interval",
        ),
        (
            {"to": "green", "steps": [{"weight": 10}], "analysis": {"max_error_rate": 2}},
            400,
            "analysis.max_error_rate",
        ),
        ({"to": "green", "steps": [{"weight": 10}], "typo": 1}, 400, "unknown key 'typo'"),
        ({"to": "green", "from": "green", "steps": [{"weight": 10}]}, 400, "another pool"),
        (
            {"to": "green", "steps": [{"weight": 10}], "webhooks": {"pre_step": "ftp://x"}},
            400,
            "webhooks.pre_step",
        ),
    ],
)
def test_plan_validation_names_the_key(body: Any, status: int, message: str) -> None:
    with pytest.raises(ControlError) as caught:
        parse_plan(body, {"blue": 100, "green": 0})
    assert caught.value.status == status
    assert message in str(caught.value)
    assert isinstance(caught.value, NotFound) == (status == 404)


def test_a_healthy_canary_goes_through_every_step_and_the_baseline_drains() -> None:
    runtime, controller, clock = setup()
    rollout = controller.start(PLAN, "deploy")
    assert runtime.pool_weights == {"blue": 90, "green": 10}
    seen: list[int] = []
    while rollout.active:
        run(runtime, controller, clock, 0.05)
        if not seen or seen[-1] != runtime.pool_weights["green"]:
            seen.append(runtime.pool_weights["green"])
        assert clock.now < 1100
    assert rollout.phase is Phase.SUCCEEDED
    assert seen == [10, 50, 100]
    assert runtime.pool_weights == {"blue": 0, "green": 100}
    assert {b.admin for b in runtime.backends.values() if b.pool == "blue"} == {Admin.DRAINING}
    actions = [e["action"] for e in runtime.events.list()]
    assert actions[:2] == ["rollout.start", "rollout.step"]
    assert actions.count("rollout.step") == 3 and "rollout.succeeded" in actions
    assert runtime.rollout_results == {"succeeded": 1}
    history = controller.history_view()
    assert history["success_rate"] == 1.0
    kpis = history["rollouts"][0]["kpis"]
    assert kpis["result"] == "succeeded" and kpis["pools"]["green"]["errors"] == 0


def test_a_failing_canary_is_rolled_back_at_the_first_failing_window() -> None:
    runtime, controller, clock = setup()
    rollout = controller.start(PLAN, "deploy")
    run(runtime, controller, clock, 30, green_errors=0.3)
    assert rollout.phase is Phase.ROLLED_BACK
    assert runtime.pool_weights == {"blue": 100, "green": 0}
    assert rollout.reason is not None and "error_rate" in rollout.reason
    assert rollout.verdict_count == 1  # the first window: 10 canary requests x 10 ticks
    assert runtime.rollout_results == {"rolled_back": 1}
    kpis = controller.history_view()["rollouts"][0]["kpis"]
    assert kpis["rollback_seconds"] == 0.0  # nothing in flight on green
    # what the canary served in the failing window, and nothing after the rollback
    assert kpis["canary_requests_while_failing"] == rollout.verdicts[0]["canary"]["requests"]
    assert kpis["canary_requests_while_failing"] >= 100
    assert controller.rollback_counts[0] == 1
    last = [e for e in runtime.events.list() if e["action"] == "rollout.rollback"][-1]
    assert last["before"] == {"blue": 90, "green": 10} and last["after"] == {
        "blue": 100,
        "green": 0,
    }


def test_a_slow_canary_is_rolled_back_on_latency() -> None:
    runtime, controller, clock = setup()
    rollout = controller.start(PLAN, "deploy")
    run(runtime, controller, clock, 30, delay=0.2)
    assert rollout.phase is Phase.ROLLED_BACK
    assert rollout.reason is not None and "latency_ratio" in rollout.reason


def test_gates_hold_the_step_until_the_target_is_up_and_out_of_slow_start() -> None:
    runtime, controller, _clock = setup()
    runtime.set_backend_state("green-2", BackendState.DOWN)
    rollout = controller.start(PLAN, "deploy")
    assert runtime.pool_weights == {"blue": 100, "green": 0}
    assert rollout.waiting == "waiting for pool green: 1 of 2 backends ready (green-2: down)"
    runtime.set_backend_state("green-2", BackendState.UP)
    runtime.set_effective_weight("green-2", 0)
    controller.tick()
    assert rollout.waiting is not None and "green-2: slow start" in rollout.waiting
    runtime.set_effective_weight("green-2", None)
    controller.tick()
    assert runtime.pool_weights == {"blue": 90, "green": 10} and rollout.waiting is None


def test_pause_resume_promote_abort_and_a_step_without_pause() -> None:
    runtime, controller, clock = setup()
    plan = {**PLAN, "steps": [{"weight": 20}, {"weight": 100, "pause": "1s"}]}
    rollout = controller.start(plan, "deploy")
    run(runtime, controller, clock, 5)
    assert rollout.phase is Phase.PROGRESSING and runtime.pool_weights["green"] == 20
    assert rollout.waiting is not None and "promote" in rollout.waiting
    controller.pause("ops")
    with pytest.raises(Conflict):
        controller.pause("ops")
    controller.resume("ops")
    controller.promote("ops")
    assert runtime.pool_weights["green"] == 100
    with pytest.raises(Conflict, match="one rollout at a time"):
        controller.start(PLAN, "deploy")
    controller.abort("ops")
    assert rollout.phase is Phase.ABORTED
    assert runtime.pool_weights == {"blue": 100, "green": 0}
    with pytest.raises(Conflict, match="no rollout in progress"):
        controller.resume("ops")


def test_a_split_during_a_rollout_is_refused_unless_forced_which_aborts_it() -> None:
    runtime, controller, _clock = setup()
    rollout = controller.start(PLAN, "deploy")
    with pytest.raises(Conflict, match="force"):
        runtime.split({"blue": 50, "green": 50}, "ops")
    with pytest.raises(Conflict):
        runtime.flip("green", "ops")
    assert runtime.pool_weights == {"blue": 90, "green": 10}
    runtime.split({"blue": 70, "green": 30}, "ops", force=True)
    assert rollout.phase is Phase.ABORTED
    assert rollout.reason == "aborted by a forced split by ops"
    assert runtime.pool_weights == {"blue": 70, "green": 30}


def test_inconclusive_verdicts_hold_then_pause_the_rollout() -> None:
    runtime, controller, clock = setup()
    plan = {**PLAN, "analysis": {**PLAN["analysis"], "min_requests": 10**6, "max_inconclusive": 3}}
    rollout = controller.start(plan, "deploy")
    run(runtime, controller, clock, 10)
    assert rollout.phase is Phase.PAUSED
    assert runtime.pool_weights["green"] == 10  # the step held, the weight stayed
    assert rollout.reason is not None and "3 inconclusive verdicts" in rollout.reason


def test_a_restart_resumes_at_the_same_step_with_the_same_weights() -> None:
    runtime, controller, clock = setup()
    rollout = controller.start(PLAN, "deploy")
    run(runtime, controller, clock, 2.6)  # into step 2
    assert runtime.pool_weights == {"blue": 50, "green": 50}
    saved = json.loads(json.dumps(runtime.export_state()))
    # a new process: the config says blue 100, the saved state says 50/50 mid-rollout
    clock2 = Clock()
    runtime2 = Runtime(make_config(), clock=clock2)
    runtime2.restore(saved)
    controller2 = RolloutController(runtime2, wall=clock2)
    controller2.restore()
    resumed = controller2.current
    assert resumed is not None and resumed.id == rollout.id
    assert resumed.phase is Phase.PROGRESSING and resumed.step == 1 and resumed.applied
    assert runtime2.pool_weights == {"blue": 50, "green": 50}
    run(runtime2, controller2, clock2, 60)
    assert resumed.phase is Phase.SUCCEEDED
