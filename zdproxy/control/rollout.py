"""The rollout engine: progressive delivery judged by zdproxy's own traffic.

A rollout moves new traffic from the pool in service (the baseline) to a target
pool in steps (``steps[{weight, pause}]``). Before each step, gates: the target
pool has enough backends up and out of slow start (and a pre-step webhook
agreed). During a step, every ``analysis.interval`` the target's traffic is
judged against the baseline's over the same window (``balancing.analysis``):
a failing verdict rolls all new traffic back to the baseline at once; an
inconclusive one holds the step (the window grows) up to
``analysis.max_inconclusive`` verdicts in a row; a step advances once its pause
is over and its last verdict passed. A step without ``pause`` waits for
``promote``.

``RolloutController`` is synchronous and owns no task: ``tick(now)`` advances
it, with ``now`` from the runtime's monotonic clock, so tests drive it with a
fake clock. ``RolloutDriver`` is the asyncio side: it ticks the controller
every ``TICK_SECONDS`` and sends the webhooks. Weights change only through the
runtime (``Runtime.apply(RolloutWeights(...))``), so snapshots, audit events and
persistence stay consistent; the plan and progress are saved in the state
store (``Runtime.set_rollout_state``) at every transition, and a restarted
process resumes at the same step with the same weights (the step's pause
starts over: the figures of the old process are gone).
"""

from __future__ import annotations

import asyncio
import enum
import logging
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from zdproxy.balancing.analysis import FAIL, PASS, Gates, Sample, judge
from zdproxy.balancing.model import Admin, BackendState
from zdproxy.config.schema import parse_duration
from zdproxy.control.commands import Drain, Enable, RolloutWeights
from zdproxy.control.events import SYSTEM_ACTOR, iso_time
from zdproxy.control.runtime import Runtime
from zdproxy.errors import Conflict, ControlError, NotFound

log = logging.getLogger("zdproxy.control")

#: how often the driver advances the controller while a rollout runs, seconds
TICK_SECONDS = 0.05
#: finished rollouts kept in the history (and the state file)
HISTORY = 100
#: verdicts kept in a rollout's status
VERDICTS_SHOWN = 20
_PROMOTE = "waiting for promote (this step has no pause)"
#: bounds (seconds) of the rollback-time histogram
ROLLBACK_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class Phase(enum.StrEnum):
    PROGRESSING = "progressing"
    PAUSED = "paused"
    SUCCEEDED = "succeeded"
    ROLLED_BACK = "rolled_back"
    ABORTED = "aborted"


TERMINAL = frozenset({Phase.SUCCEEDED, Phase.ROLLED_BACK, Phase.ABORTED})

#: phase -> event -> next phase; an event missing from a phase is refused (409).
#: Analysis keeps judging while paused: a failing verdict still rolls back.
TRANSITIONS: dict[Phase, dict[str, Phase]] = {
    Phase.PROGRESSING: {
        "pause": Phase.PAUSED,  # the operator
        "hold": Phase.PAUSED,  # too many inconclusive verdicts, a pre-step hook failed
        "promote": Phase.PROGRESSING,
        "fail": Phase.ROLLED_BACK,
        "abort": Phase.ABORTED,
        "succeed": Phase.SUCCEEDED,
    },
    Phase.PAUSED: {
        "resume": Phase.PROGRESSING,
        "promote": Phase.PROGRESSING,
        "fail": Phase.ROLLED_BACK,
        "abort": Phase.ABORTED,
    },
    Phase.SUCCEEDED: {},
    Phase.ROLLED_BACK: {},
    Phase.ABORTED: {},
}

#: what the result of a finished rollout is called in metrics and the history
RESULTS = {
    Phase.SUCCEEDED: "succeeded",
    Phase.ROLLED_BACK: "rolled_back",
    Phase.ABORTED: "aborted",
}


# ---- the plan ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Step:
    weight: int
    #: seconds; None: wait for promote
    pause: float | None


@dataclass(frozen=True, slots=True)
class Webhooks:
    pre_step: str | None = None
    post_rollout: str | None = None
    on_rollback: str | None = None
    timeout: float = 5.0


@dataclass(frozen=True, slots=True)
class Plan:
    to: str
    baseline: str
    steps: tuple[Step, ...]
    interval: float
    #: None: no analysis (steps advance on time and promote alone)
    gates: Gates | None
    max_inconclusive: int
    on_inconclusive: str
    #: target backends that must be ready before a step; None: all enabled ones
    min_ready: int | None
    keep_warm: bool
    enable_target: bool
    webhooks: Webhooks
    #: the plan as JSON with defaults filled in (API, persistence)
    body: dict[str, Any] = field(default_factory=dict)


_PLAN_KEYS = frozenset(
    {"to", "from", "steps", "analysis", "min_ready", "keep_warm", "enable_target", "webhooks"}
)
_ANALYSIS_KEYS = frozenset(
    {
        "enabled",
        "interval",
        "min_requests",
        "max_error_rate",
        "max_p99_latency",
        "max_error_rate_increase",
        "max_latency_ratio",
        "latency_slack",
        "alpha",
        "hold_alpha",
        "max_inconclusive",
        "on_inconclusive",
    }
)
_HOOK_KEYS = frozenset({"pre_step", "post_rollout", "on_rollback", "timeout"})


def _object(value: Any, where: str, allowed: frozenset[str]) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ControlError(f"{where}: expected an object")
    unknown = sorted(set(value) - allowed)
    if unknown:
        raise ControlError(
            f"{where}: unknown key {unknown[0]!r} (expected: {', '.join(sorted(allowed))})"
        )
    return value


def _duration(value: Any, where: str, positive: bool = True) -> float:
    try:
        seconds = parse_duration(value)
    except ValueError as exc:
        raise ControlError(f"{where}: {exc}") from None
    if positive and seconds <= 0:
        raise ControlError(f"{where}: must be above 0")
    return seconds


def _number(value: Any, where: str, low: float, high: float) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not low <= value <= high:
        raise ControlError(f"{where}: expected a number {low:g}-{high:g}, got {value!r}")
    return float(value)


def _integer(value: Any, where: str, low: int, high: int) -> int:
    if type(value) is not int or not low <= value <= high:
        raise ControlError(f"{where}: expected an integer {low}-{high}, got {value!r}")
    return value


def _bool(value: Any, where: str) -> bool:
    if not isinstance(value, bool):
        raise ControlError(f"{where}: expected true or false, got {value!r}")
    return value


def _url(value: Any, where: str) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or not value.startswith(("http://", "https://")):
        raise ControlError(f"{where}: expected an http:// or https:// URL, got {value!r}")
    return value


def parse_plan(data: Any, weights: Mapping[str, int]) -> Plan:
    """Validate a rollout body against the pools (``weights``: current pool
    weights); raise ``ControlError`` (400) or ``NotFound`` (404) naming the key."""
    data = _object(data, "body", _PLAN_KEYS)
    to = data.get("to")
    if not isinstance(to, str) or not to:
        raise ControlError('to: expected the target pool\'s name, e.g. {"to": "green"}')
    if to not in weights:
        raise NotFound(f"to: no pool named {to!r} (pools: {', '.join(weights)})")
    baseline = data.get("from")
    if baseline is None:
        others = [(w, name) for name, w in weights.items() if name != to]
        if not others or max(others)[0] == 0:
            raise ControlError(
                f"from: no pool other than {to!r} takes traffic; name the baseline with 'from'"
            )
        baseline = max(others)[1]
    elif not isinstance(baseline, str) or baseline not in weights:
        raise NotFound(f"from: no pool named {baseline!r} (pools: {', '.join(weights)})")
    if baseline == to:
        raise ControlError("from: the baseline must be another pool than 'to'")
    others_weight = sum(w for name, w in weights.items() if name not in (to, baseline))
    steps = _parse_steps(data.get("steps"), 100 - others_weight)
    analysis = _object(data.get("analysis", {}), "analysis", _ANALYSIS_KEYS)
    enabled = _bool(analysis.get("enabled", True), "analysis.enabled")
    interval = _duration(analysis.get("interval", "5s"), "analysis.interval")
    if interval < 0.1:
        raise ControlError("analysis.interval: at least 100ms")
    gates = Gates(
        min_requests=_integer(analysis.get("min_requests", 50), "analysis.min_requests", 1, 10**9),
        max_error_rate=_optional(analysis, "max_error_rate", 0.01, 0.0, 1.0),
        max_p99_latency=(
            _duration(analysis["max_p99_latency"], "analysis.max_p99_latency")
            if analysis.get("max_p99_latency") is not None
            else None
        ),
        max_error_rate_increase=_optional(analysis, "max_error_rate_increase", 0.01, 0.0, 1.0),
        max_latency_ratio=_optional(analysis, "max_latency_ratio", 1.5, 1.0, 1000.0),
        latency_slack=_duration(
            analysis.get("latency_slack", "20ms"), "analysis.latency_slack", positive=False
        ),
        alpha=_number(analysis.get("alpha", 0.001), "analysis.alpha", 1e-9, 0.5),
        hold_alpha=_number(analysis.get("hold_alpha", 0.05), "analysis.hold_alpha", 1e-9, 1.0),
    )
    if gates.hold_alpha < gates.alpha:
        raise ControlError("analysis.hold_alpha: must be at least analysis.alpha")
    max_inconclusive = _integer(
        analysis.get("max_inconclusive", 20), "analysis.max_inconclusive", 1, 10**6
    )
    on_inconclusive = analysis.get("on_inconclusive", "pause")
    if on_inconclusive not in ("pause", "rollback"):
        raise ControlError("analysis.on_inconclusive: expected 'pause' or 'rollback'")
    min_ready = data.get("min_ready")
    if min_ready is not None:
        _integer(min_ready, "min_ready", 1, 10**6)
    hooks = _object(data.get("webhooks", {}), "webhooks", _HOOK_KEYS)
    webhooks = Webhooks(
        pre_step=_url(hooks.get("pre_step"), "webhooks.pre_step"),
        post_rollout=_url(hooks.get("post_rollout"), "webhooks.post_rollout"),
        on_rollback=_url(hooks.get("on_rollback"), "webhooks.on_rollback"),
        timeout=_duration(hooks.get("timeout", "5s"), "webhooks.timeout"),
    )
    body = {
        "to": to,
        "from": baseline,
        "steps": [
            {"weight": s.weight, **({"pause": s.pause} if s.pause is not None else {})}
            for s in steps
        ],
        "analysis": {
            "enabled": enabled,
            "interval": interval,
            "min_requests": gates.min_requests,
            "max_error_rate": gates.max_error_rate,
            "max_p99_latency": gates.max_p99_latency,
            "max_error_rate_increase": gates.max_error_rate_increase,
            "max_latency_ratio": gates.max_latency_ratio,
            "latency_slack": gates.latency_slack,
            "alpha": gates.alpha,
            "hold_alpha": gates.hold_alpha,
            "max_inconclusive": max_inconclusive,
            "on_inconclusive": on_inconclusive,
        },
        "min_ready": min_ready,
        "keep_warm": _bool(data.get("keep_warm", False), "keep_warm"),
        "enable_target": _bool(data.get("enable_target", True), "enable_target"),
        "webhooks": {
            "pre_step": webhooks.pre_step,
            "post_rollout": webhooks.post_rollout,
            "on_rollback": webhooks.on_rollback,
            "timeout": webhooks.timeout,
        },
    }
    return Plan(
        to=to,
        baseline=baseline,
        steps=steps,
        interval=interval,
        gates=gates if enabled else None,
        max_inconclusive=max_inconclusive,
        on_inconclusive=on_inconclusive,
        min_ready=min_ready,
        keep_warm=body["keep_warm"],
        enable_target=body["enable_target"],
        webhooks=webhooks,
        body=body,
    )


def _optional(
    analysis: Mapping[str, Any], key: str, default: float | None, low: float, high: float
) -> float | None:
    """A limit that ``null`` switches off; absent: ``default``."""
    if key not in analysis:
        return default
    value = analysis[key]
    return None if value is None else _number(value, f"analysis.{key}", low, high)


def _parse_steps(raw: Any, room: int) -> tuple[Step, ...]:
    if not isinstance(raw, list) or not raw:
        raise ControlError(
            'steps: expected a list, e.g. [{"weight": 10, "pause": "30s"}, {"weight": 100}]'
        )
    if len(raw) > 100:
        raise ControlError("steps: at most 100 steps")
    steps: list[Step] = []
    previous = 0
    for i, item in enumerate(raw):
        where = f"steps[{i}]"
        item = _object(item, where, frozenset({"weight", "pause"}))
        if "weight" not in item:
            raise ControlError(f"{where}: missing key 'weight'")
        weight = _integer(item["weight"], f"{where}.weight", 1, 100)
        if weight < previous:
            raise ControlError(f"{where}.weight: weights must not decrease ({previous} before)")
        if weight > room:
            raise ControlError(
                f"{where}.weight: {weight} is more than the {room} % the target and the "
                "baseline share (other pools keep their weights)"
            )
        pause = item.get("pause")
        steps.append(Step(weight, None if pause is None else _duration(pause, f"{where}.pause")))
        previous = weight
    return tuple(steps)


# ---- one rollout --------------------------------------------------------------------


@dataclass(slots=True)
class HookCall:
    """A webhook to send: ``kind`` is pre_step, post_rollout or on_rollback."""

    kind: str
    url: str
    body: dict[str, Any]
    timeout: float
    rollout: int
    step: int | None = None


Totals = tuple[tuple[int, ...], tuple[int, ...]]


class Rollout:
    """The state of one rollout. Persisted fields are in ``to_state``; the
    rest (windows, timers) is rebuilt from the clock on restore."""

    def __init__(self, rollout_id: int, plan: Plan, actor: str, started_at: float) -> None:
        self.id = rollout_id
        self.plan = plan
        self.actor = actor
        self.phase = Phase.PROGRESSING
        #: index of the current step; ``applied`` once its weights are set
        self.step = 0
        self.applied = False
        #: wall-clock times (display, history)
        self.started_at = started_at
        self.ended_at: float | None = None
        self.reason: str | None = None
        #: why the rollout does not move now (gates, webhook, promote), for the status
        self.waiting: str | None = None
        self.verdicts: deque[dict[str, Any]] = deque(maxlen=VERDICTS_SHOWN)
        self.verdict_count = 0
        self.last_result: str | None = None
        self.inconclusive_streak = 0
        #: the pre-step hook: step it was sent for (None: none pending), step it agreed to
        self.hook_pending: int | None = None
        self.hook_ok: int | None = None
        self.kpis: dict[str, Any] = {}
        # ---- not persisted: monotonic times and counter reads ----
        self.step_started = 0.0
        self.next_judgement = 0.0
        self.window_started = 0.0
        self.window: dict[str, Totals] = {}
        self.start_totals: dict[str, Totals] = {}
        #: the first window whose figures were beyond a limit since the last clean pass:
        #: (its end, the target's request count at its start)
        self.first_bad: tuple[float, int] | None = None

    @property
    def active(self) -> bool:
        return self.phase not in TERMINAL

    @property
    def target_weight(self) -> int:
        return self.plan.steps[self.step].weight if self.applied else 0

    def to_state(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "plan": self.plan.body,
            "actor": self.actor,
            "phase": self.phase.value,
            "step": self.step,
            "applied": self.applied,
            "started_at": self.started_at,
            "ended_at": self.ended_at,
            "reason": self.reason,
            "verdicts": list(self.verdicts),
            "verdict_count": self.verdict_count,
            "hook_ok": self.hook_ok,
            "kpis": self.kpis,
        }


def _target_requests(totals: Totals) -> int:
    return sum(totals[0])


# ---- the controller -------------------------------------------------------------------


class RolloutController:
    """One rollout at a time, its history, and the metrics about them."""

    def __init__(self, runtime: Runtime, wall: Any = time.time) -> None:
        self.runtime = runtime
        self.clock = runtime.clock
        self.wall = wall
        self.current: Rollout | None = None
        self.history: deque[dict[str, Any]] = deque(maxlen=HISTORY)
        self.next_id = 1
        #: webhooks to send, taken by the driver
        self.outbox: list[HookCall] = []
        #: a rolled-back rollout whose target still has requests in flight: (rollout,
        #: when the failing verdict came)
        self.settling: tuple[Rollout, float] | None = None
        #: rollback-time histogram (seconds from the failing verdict to the canary idle)
        self.rollback_counts = [0] * (len(ROLLBACK_BUCKETS) + 1)
        self.rollback_sum = 0.0
        runtime.weights_guard = self._guard
        #: shared state (``control.shared``): True while another instance leads, so
        #: this one follows the shared rollout instead of ticking it
        self.passive: Callable[[], bool] | None = None
        #: shared state: the per-pool counters of every instance, summed
        self.totals_source: Callable[[], dict[str, Totals]] | None = None

    # ---- operator actions (the admin API calls these) ------------------------

    def start(self, data: Any, actor: str) -> Rollout:
        current = self.current
        if current is not None and current.active:
            raise Conflict(
                f"rollout {current.id} to {current.plan.to} is {current.phase.value}: "
                "one rollout at a time (abort it first)"
            )
        plan = parse_plan(data, self.runtime.pool_weights)
        if self.runtime.pool_weights[plan.to] > 0:
            raise Conflict(
                f"pool {plan.to!r} already takes {self.runtime.pool_weights[plan.to]} % of new "
                "traffic: a rollout starts from 0 (split it back first)"
            )
        rollout = Rollout(self.next_id, plan, actor, self.wall())
        self.next_id += 1
        self.current = rollout
        now = self.clock()
        self._record(rollout, actor, "rollout.start", None, plan.body)
        if plan.enable_target:
            for backend in list(self.runtime.backends.values()):
                if backend.pool == plan.to and backend.admin in (Admin.DRAINED, Admin.DRAINING):
                    self.runtime.apply(Enable(backend.id), actor)
        rollout.start_totals = self._totals()
        self._try_step(rollout, now)
        self._save()
        return rollout

    def _active(self) -> Rollout:
        rollout = self.current
        if rollout is None or not rollout.active:
            raise Conflict("no rollout in progress")
        return rollout

    def _transition(self, rollout: Rollout, event: str) -> Phase:
        new = TRANSITIONS[rollout.phase].get(event)
        if new is None:
            raise Conflict(f"cannot {event} rollout {rollout.id}: it is {rollout.phase.value}")
        rollout.phase = new
        return new

    def pause(self, actor: str) -> Rollout:
        rollout = self._active()
        self._transition(rollout, "pause")
        rollout.reason = f"paused by {actor}"
        self._record(rollout, actor, "rollout.pause", None, self._brief(rollout))
        self._save()
        return rollout

    def resume(self, actor: str) -> Rollout:
        rollout = self._active()
        self._transition(rollout, "resume")
        rollout.reason = None
        rollout.inconclusive_streak = 0
        if rollout.hook_pending is None and rollout.hook_ok != rollout.step:
            rollout.hook_ok = None  # a failed pre-step hook is asked again
        self._record(rollout, actor, "rollout.resume", None, self._brief(rollout))
        self._try_step(rollout, self.clock())
        self._save()
        return rollout

    def promote(self, actor: str) -> Rollout:
        """Skip the rest of the current step (its pause, its wait for promote):
        the next step now, or success after the last one."""
        rollout = self._active()
        self._transition(rollout, "promote")
        rollout.reason = None
        self._record(rollout, actor, "rollout.promote", None, self._brief(rollout))
        now = self.clock()
        if not rollout.applied:
            self._try_step(rollout, now)  # the gates still apply: no 503s on promote
        else:
            self._advance(rollout, now, actor)
        self._save()
        return rollout

    def abort(self, actor: str, reason: str | None = None, restore: bool = True) -> Rollout:
        """Stop; with ``restore`` all new traffic goes back to the baseline."""
        rollout = self._active()
        self._transition(rollout, "abort")
        rollout.reason = reason or f"aborted by {actor}"
        plan = rollout.plan
        if restore:
            self._back_to_baseline(rollout, actor, "rollout.aborted", rollout.reason)
        else:
            self._record(rollout, actor, "rollout.aborted", None, self._brief(rollout))
        self._finish(rollout, plan)
        return rollout

    def _guard(self, action: str, actor: str, force: bool) -> None:
        """An operator's split or flip while a rollout runs: 409, or (forced) the
        rollout is aborted and the operator's weights win."""
        rollout = self.current
        if rollout is None or not rollout.active:
            return
        if not force:
            raise Conflict(
                f"rollout {rollout.id} to {rollout.plan.to} is {rollout.phase.value}: pause "
                f'or abort it, or send "force": true (that aborts the rollout)'
            )
        self.abort(actor, f"aborted by a forced {action} by {actor}", restore=False)

    # ---- time-driven progress ---------------------------------------------------

    def tick(self, now: float | None = None) -> None:
        if self.passive is not None and self.passive():
            return
        if now is None:
            now = self.clock()
        if self.settling is not None:
            self._settle(now)
        rollout = self.current
        if rollout is None or not rollout.active:
            return
        plan = rollout.plan
        if rollout.applied and plan.gates is not None and now >= rollout.next_judgement:
            self._judge(rollout, plan.gates, now)
            if not rollout.active:
                return
        if rollout.phase is Phase.PAUSED:
            return
        if not rollout.applied:
            self._try_step(rollout, now)
            return
        step = plan.steps[rollout.step]
        if step.pause is None:
            rollout.waiting = _PROMOTE
            return
        left = rollout.step_started + step.pause - now
        if left > 0:
            rollout.waiting = None
            return
        if plan.gates is not None and rollout.last_result != PASS:
            rollout.waiting = "pause over: waiting for a passing verdict"
            return
        self._advance(rollout, now, SYSTEM_ACTOR)

    def _advance(self, rollout: Rollout, now: float, actor: str) -> None:
        if rollout.step + 1 >= len(rollout.plan.steps):
            self._succeed(rollout, actor)
            return
        rollout.step += 1
        rollout.applied = False
        self._try_step(rollout, now)
        self._save()

    def _try_step(self, rollout: Rollout, now: float) -> None:
        """Apply the current step's weights once its gates allow it."""
        if rollout.applied or rollout.phase is not Phase.PROGRESSING:
            return
        plan = rollout.plan
        why = self._gate(plan)
        if why is not None:
            rollout.waiting = why
            return
        hook = plan.webhooks.pre_step
        if hook is not None and rollout.hook_ok != rollout.step:
            if rollout.hook_pending is None:
                rollout.hook_pending = rollout.step
                self.outbox.append(
                    HookCall(
                        "pre_step",
                        hook,
                        self._hook_body(rollout, "pre_step"),
                        plan.webhooks.timeout,
                        rollout.id,
                        rollout.step,
                    )
                )
            rollout.waiting = f"waiting for the pre-step webhook {hook}"
            return
        step = plan.steps[rollout.step]
        self.runtime.apply(
            RolloutWeights(
                self._step_weights(plan, step.weight),
                "rollout.step",
                self._target(rollout),
                note=f"step {rollout.step + 1} of {len(plan.steps)}",
                extra={"step": rollout.step + 1},
            ),
            rollout.actor if rollout.step == 0 else SYSTEM_ACTOR,
        )
        rollout.applied = True
        rollout.waiting = None if step.pause is not None else _PROMOTE
        self._begin_step(rollout, now)
        self._save()

    def _begin_step(self, rollout: Rollout, now: float) -> None:
        rollout.step_started = now
        rollout.last_result = None
        rollout.inconclusive_streak = 0
        self._new_window(rollout, now)

    def _new_window(self, rollout: Rollout, now: float) -> None:
        rollout.window = self._totals()
        rollout.window_started = now
        rollout.next_judgement = now + rollout.plan.interval

    def _gate(self, plan: Plan) -> str | None:
        """Why the target pool cannot take the next step yet (None: it can)."""
        runtime = self.runtime
        enabled = [
            b for b in runtime.backends.values() if b.pool == plan.to and b.admin is Admin.ENABLED
        ]
        need = plan.min_ready if plan.min_ready is not None else max(1, len(enabled))
        ready = 0
        problems: list[str] = []
        for backend in enabled:
            effective = runtime.effective_weight.get(backend.id, backend.weight)
            if backend.state is not BackendState.UP:
                problems.append(f"{backend.id}: {backend.state.value}")
            elif backend.ejected:
                problems.append(f"{backend.id}: ejected")
            elif effective < backend.weight:
                problems.append(f"{backend.id}: slow start")
            else:
                ready += 1
        if ready >= need:
            return None
        detail = f" ({', '.join(problems)})" if problems else ""
        return f"waiting for pool {plan.to}: {ready} of {need} backends ready{detail}"

    def _totals(self) -> dict[str, Totals]:
        if self.totals_source is not None:
            return self.totals_source()
        return {name: stats.totals() for name, stats in self.runtime.pool_stats.items()}

    # ---- analysis ---------------------------------------------------------------------

    def _judge(self, rollout: Rollout, gates: Gates, now: float) -> None:
        plan = rollout.plan
        totals = self._totals()
        canary = Sample.between(rollout.window[plan.to], totals[plan.to])
        baseline = Sample.between(rollout.window[plan.baseline], totals[plan.baseline])
        verdict = judge(canary, baseline, gates)
        rollout.next_judgement = max(rollout.next_judgement + plan.interval, now + 0.01)
        if verdict.beyond and rollout.first_bad is None:
            rollout.first_bad = (now, _target_requests(rollout.window[plan.to]))
        record = {
            "n": rollout.verdict_count + 1,
            "time": iso_time(self.wall()),
            "step": rollout.step + 1,
            "weight": rollout.target_weight,
            "window_s": round(now - rollout.window_started, 3),
            **verdict.to_json(),
        }
        rollout.verdict_count += 1
        rollout.verdicts.append(record)
        changed = verdict.result != rollout.last_result
        rollout.last_result = verdict.result
        if changed or verdict.result == FAIL:
            self._record(rollout, SYSTEM_ACTOR, "rollout.verdict", None, record)
        if verdict.result == PASS:
            rollout.inconclusive_streak = 0
            if not verdict.beyond:
                rollout.first_bad = None
            self._new_window(rollout, now)
            return
        if verdict.result == FAIL:
            self._roll_back(
                rollout, now, f"analysis failed at step {rollout.step + 1}: {verdict.reason}"
            )
            return
        # inconclusive: the window keeps growing
        rollout.inconclusive_streak += 1
        if rollout.inconclusive_streak >= plan.max_inconclusive:
            reason = (
                f"{rollout.inconclusive_streak} inconclusive verdicts in a row at step "
                f"{rollout.step + 1}: {verdict.reason}"
            )
            if plan.on_inconclusive == "rollback":
                self._roll_back(rollout, now, reason)
                return
            if rollout.phase is Phase.PROGRESSING:
                self._transition(rollout, "hold")
                rollout.reason = reason
                self._record(rollout, SYSTEM_ACTOR, "rollout.pause", None, self._brief(rollout))
                self._save()
            rollout.inconclusive_streak = 0

    # ---- endings ----------------------------------------------------------------------

    def _roll_back(self, rollout: Rollout, now: float, reason: str) -> None:
        self._transition(rollout, "fail")
        rollout.reason = reason
        self._back_to_baseline(rollout, SYSTEM_ACTOR, "rollout.rollback", reason)
        first_bad_end, start_count = rollout.first_bad or (now, 0)
        rollout.kpis["detect_seconds"] = round(now - first_bad_end, 3)
        rollout.kpis["_canary_at_first_bad"] = start_count
        hook = rollout.plan.webhooks.on_rollback
        if hook is not None:
            self.outbox.append(
                HookCall(
                    "on_rollback",
                    hook,
                    self._hook_body(rollout, "on_rollback"),
                    rollout.plan.webhooks.timeout,
                    rollout.id,
                )
            )
        self.settling = (rollout, now)
        self._finish(rollout, rollout.plan)
        self._settle(now)

    def _back_to_baseline(self, rollout: Rollout, actor: str, action: str, reason: str) -> None:
        plan = rollout.plan
        weights = dict(self.runtime.pool_weights)
        weights[plan.baseline] += weights[plan.to]
        weights[plan.to] = 0
        self.runtime.apply(
            RolloutWeights(
                weights, action, self._target(rollout), note=reason, revoke=frozenset({plan.to})
            ),
            actor,
        )

    def _settle(self, now: float) -> None:
        """After a rollback: once the target has nothing in flight, traffic is fully
        back; record how long that took and what the canary served meanwhile."""
        assert self.settling is not None
        rollout, failed_at = self.settling
        pool = rollout.plan.to
        in_flight = sum(b.in_flight for b in self.runtime.backends.values() if b.pool == pool)
        if in_flight > 0 and now - failed_at < 60:
            return
        self.settling = None
        seconds = now - failed_at
        kpis = rollout.kpis
        canary_now = _target_requests(self.runtime.pool_stats[pool].totals())
        kpis["rollback_seconds"] = round(seconds, 3)
        kpis["time_to_rollback_seconds"] = round(seconds + kpis.get("detect_seconds", 0.0), 3)
        kpis["canary_requests_while_failing"] = canary_now - kpis.pop("_canary_at_first_bad", 0)
        # the canary's requests in flight at the rollback are answered by now: its
        # figures in the KPIs include them (the baseline's stay as of the rollback)
        pools = kpis.get("pools")
        if isinstance(pools, dict):
            pools.update(self._pool_figures(rollout, (pool,)))
        self._observe_rollback(seconds)
        self._update_history(rollout)
        self._save()

    def _pool_figures(self, rollout: Rollout, names: tuple[str, ...]) -> dict[str, Any]:
        """Requests, errors and error rate of each pool since the rollout started."""
        totals = self._totals()
        pools: dict[str, Any] = {}
        for pool in names:
            start = rollout.start_totals.get(pool)
            if start is None:
                continue  # restored after a restart: the counters started over
            sample = Sample.between(start, totals[pool])
            pools[pool] = {
                "requests": sample.requests,
                "errors": sample.errors,
                "error_rate": round(sample.error_rate, 6),
            }
        return pools

    def _observe_rollback(self, seconds: float) -> None:
        index = len(ROLLBACK_BUCKETS)
        for i, bound in enumerate(ROLLBACK_BUCKETS):
            if seconds <= bound:
                index = i
                break
        self.rollback_counts[index] += 1
        self.rollback_sum += seconds

    def _succeed(self, rollout: Rollout, actor: str) -> None:
        plan = rollout.plan
        self._transition(rollout, "succeed")
        weights = dict(self.runtime.pool_weights)
        weights[plan.to] += weights[plan.baseline]
        weights[plan.baseline] = 0
        # the weights and the baseline's drains: one snapshot swap
        with self.runtime.batch():
            self.runtime.apply(
                RolloutWeights(weights, "rollout.succeeded", self._target(rollout)), actor
            )
            if not plan.keep_warm:
                for backend in list(self.runtime.backends.values()):
                    if backend.pool == plan.baseline and backend.admin is Admin.ENABLED:
                        self.runtime.apply(Drain(backend.id), SYSTEM_ACTOR)
        self._finish(rollout, plan)

    def _finish(self, rollout: Rollout, plan: Plan) -> None:
        rollout.ended_at = self.wall()
        rollout.waiting = None
        result = RESULTS[rollout.phase]
        self.runtime.record_rollout(result)
        pools = self._pool_figures(rollout, (plan.baseline, plan.to))
        rollout.kpis.update(
            {
                "result": result,
                "duration_seconds": round(rollout.ended_at - rollout.started_at, 3),
                "steps_done": rollout.step + (1 if rollout.applied else 0),
                "pools": pools,
            }
        )
        log.info("rollout %d to %s: %s (%s)", rollout.id, plan.to, result, rollout.reason or "")
        if plan.webhooks.post_rollout is not None:
            self.outbox.append(
                HookCall(
                    "post_rollout",
                    plan.webhooks.post_rollout,
                    self._hook_body(rollout, "post_rollout"),
                    plan.webhooks.timeout,
                    rollout.id,
                )
            )
        self._update_history(rollout)
        self._save()

    def _update_history(self, rollout: Rollout) -> None:
        entry = self.summary(rollout)
        for i, item in enumerate(self.history):
            if item["id"] == rollout.id:
                self.history[i] = entry
                return
        self.history.append(entry)

    # ---- webhooks -----------------------------------------------------------------

    def hook_done(self, call: HookCall, error: str | None) -> None:
        """The driver's report on a webhook; only pre-step hooks steer the rollout."""
        if error is not None:
            log.warning(
                "rollout %d: %s webhook %s failed: %s", call.rollout, call.kind, call.url, error
            )
        rollout = self.current
        if call.kind != "pre_step" or rollout is None or rollout.id != call.rollout:
            return
        if rollout.hook_pending != call.step:
            return
        rollout.hook_pending = None
        if not rollout.active:
            return
        if error is None:
            rollout.hook_ok = call.step
            self._try_step(rollout, self.clock())
            return
        reason = f"pre-step webhook for step {rollout.step + 1} failed: {error}"
        rollout.waiting = None
        if rollout.phase is Phase.PROGRESSING:
            self._transition(rollout, "hold")
        rollout.reason = reason
        self._record(rollout, SYSTEM_ACTOR, "rollout.pause", None, self._brief(rollout))
        self._save()

    def _hook_body(self, rollout: Rollout, kind: str) -> dict[str, Any]:
        body = {"event": kind, "rollout": self.summary(rollout)}
        if kind == "pre_step":
            step = rollout.plan.steps[rollout.step]
            body["step"] = {"index": rollout.step + 1, "weight": step.weight, "pause": step.pause}
        return body

    # ---- views --------------------------------------------------------------------

    def _target(self, rollout: Rollout) -> str:
        return f"rollout-{rollout.id}"

    def _brief(self, rollout: Rollout) -> dict[str, Any]:
        return {
            "phase": rollout.phase.value,
            "step": rollout.step + 1,
            "weight": rollout.target_weight,
            "reason": rollout.reason,
        }

    def _record(self, rollout: Rollout, actor: str, action: str, before: Any, after: Any) -> None:
        note = rollout.reason if action in ("rollout.pause", "rollout.aborted") else None
        self.runtime.events.record(actor, action, self._target(rollout), before, after, note)

    def summary(self, rollout: Rollout) -> dict[str, Any]:
        plan = rollout.plan
        return {
            "id": rollout.id,
            "to": plan.to,
            "from": plan.baseline,
            "phase": rollout.phase.value,
            "result": RESULTS.get(rollout.phase),
            "reason": rollout.reason,
            "actor": rollout.actor,
            "started_at": iso_time(rollout.started_at),
            "ended_at": iso_time(rollout.ended_at) if rollout.ended_at is not None else None,
            "steps": len(plan.steps),
            "kpis": dict(rollout.kpis),
        }

    def status(self, rollout: Rollout) -> dict[str, Any]:
        """The full status: plan, step, weights, waits, verdicts, KPIs."""
        plan = rollout.plan
        now = self.clock()
        step = plan.steps[rollout.step]
        remaining = None
        if rollout.applied and rollout.active and step.pause is not None:
            remaining = round(max(0.0, rollout.step_started + step.pause - now), 3)
        return {
            **self.summary(rollout),
            "active": rollout.active,
            "step": rollout.step + 1,
            "step_weight": step.weight,
            "step_applied": rollout.applied,
            "step_pause_remaining": remaining,
            "weights": dict(self.runtime.pool_weights),
            "waiting": rollout.waiting,
            "inconclusive_streak": rollout.inconclusive_streak,
            "verdict_count": rollout.verdict_count,
            "last_verdict": rollout.verdicts[-1] if rollout.verdicts else None,
            "verdicts": list(rollout.verdicts),
            "plan": plan.body,
        }

    def history_view(self) -> dict[str, Any]:
        items = list(self.history)
        if self.current is not None and self.current.active:
            items.append(self.summary(self.current))
        finished = [i for i in items if i["result"] is not None]
        succeeded = sum(1 for i in finished if i["result"] == "succeeded")
        by_result = {r: sum(1 for i in finished if i["result"] == r) for r in RESULTS.values()}
        return {
            "rollouts": items[::-1],
            "finished": len(finished),
            "results": by_result,
            "success_rate": round(succeeded / len(finished), 4) if finished else None,
        }

    # ---- persistence ----------------------------------------------------------------

    def _save(self) -> None:
        current = self.current
        self.runtime.set_rollout_state(
            {
                "next_id": self.next_id,
                "current": current.to_state() if current is not None and current.active else None,
                "history": list(self.history),
            }
        )

    def _step_weights(self, plan: Plan, weight: int) -> dict[str, int]:
        """The weights with the target at ``weight``: the baseline gives or takes the
        difference, other pools keep theirs."""
        weights = dict(self.runtime.pool_weights)
        share = weights[plan.to] + weights[plan.baseline]
        weights[plan.to] = weight
        weights[plan.baseline] = share - weight
        return weights

    def checkpoint(self) -> Any:
        """What an operator call may change, for ``rollback`` when it cannot be saved."""
        current = self.current
        fields = None
        if current is not None:
            fields = {
                k: v.copy() if isinstance(v, dict | deque) else v for k, v in vars(current).items()
            }
        return current, fields, self.next_id, list(self.history)

    def rollback(self, checkpoint: Any) -> None:
        current, fields, next_id, history = checkpoint
        if current is not None and fields is not None:
            vars(current).clear()
            vars(current).update(fields)
        self.current = current
        self.next_id = next_id
        self.history.clear()
        self.history.extend(history)

    def take_history(self, state: Mapping[str, Any]) -> None:
        """The history and the id counter of saved or shared rollout state; entries
        that are not well-formed are dropped, and ids never go back."""
        history = state.get("history")
        self.history.clear()
        if isinstance(history, list):
            self.history.extend(h for h in history if isinstance(h, dict) and "id" in h)
        next_id = state.get("next_id")
        if type(next_id) is int:
            self.next_id = max(next_id, self.next_id)

    def restore(self) -> None:
        """Pick up the saved rollout (at start, after the runtime restored its
        state): the same step with the same weights; its pause starts over."""
        state = self.runtime.rollout_state
        if not isinstance(state, dict):
            return
        self.take_history(state)
        saved = state.get("current")
        if not isinstance(saved, dict):
            return
        try:
            rollout = self._revive(saved)
        except (ControlError, KeyError, TypeError, ValueError) as exc:
            log.error("saved rollout %s cannot be resumed: %s", saved.get("id"), exc)
            return
        self.current = rollout
        now = self.clock()
        if rollout.applied:
            plan = rollout.plan
            step = plan.steps[rollout.step]
            if self.runtime.pool_weights[plan.to] != step.weight:
                self.runtime.apply(
                    RolloutWeights(
                        self._step_weights(plan, step.weight),
                        "rollout.step",
                        self._target(rollout),
                        note=f"step {rollout.step + 1} restored after a restart",
                        extra={"step": rollout.step + 1},
                    ),
                    SYSTEM_ACTOR,
                )
            self._begin_step(rollout, now)
        rollout.start_totals = self._totals()
        self._record(rollout, SYSTEM_ACTOR, "rollout.restore", None, self._brief(rollout))
        log.info(
            "rollout %d to %s resumed after a restart: %s at step %d",
            rollout.id,
            rollout.plan.to,
            rollout.phase.value,
            rollout.step + 1,
        )

    def _revive(self, saved: dict[str, Any]) -> Rollout:
        weights = dict(self.runtime.pool_weights)
        body = dict(saved["plan"])
        # validate against the pools with the target at 0 (it is mid-rollout now)
        to, baseline = str(body.get("to")), str(body.get("from"))
        if to in weights and baseline in weights:
            weights[to], weights[baseline] = 0, weights[to] + weights[baseline]
        plan = parse_plan(body, weights)
        rollout = Rollout(int(saved["id"]), plan, str(saved["actor"]), float(saved["started_at"]))
        rollout.phase = Phase(saved["phase"])
        if not rollout.active:
            raise ValueError(f"it is {rollout.phase.value} already")
        rollout.step = int(saved["step"])
        if not 0 <= rollout.step < len(plan.steps):
            raise ValueError(f"step {rollout.step} out of range")
        rollout.applied = bool(saved["applied"])
        rollout.reason = saved.get("reason")
        rollout.verdicts.extend(saved.get("verdicts") or [])
        rollout.verdict_count = int(saved.get("verdict_count") or 0)
        hook_ok = saved.get("hook_ok")
        rollout.hook_ok = hook_ok if type(hook_ok) is int else None
        return rollout


# ---- the asyncio side -------------------------------------------------------------------


class RolloutDriver:
    """Ticks the controller and sends its webhooks (aiohttp client, JSON POST)."""

    def __init__(self, controller: RolloutController) -> None:
        self.controller = controller
        self._task: asyncio.Task[None] | None = None
        self._hooks: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def pause(self) -> None:
        """Stop ticking (a hot upgrade hands the state over); webhooks already
        sent finish. ``start`` ticks again."""
        if self._task is not None:
            self._task.cancel()
            self._task = None

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            self._task = None
        for task in list(self._hooks):
            task.cancel()
        if self._hooks:
            await asyncio.gather(*self._hooks, return_exceptions=True)

    async def _run(self) -> None:
        controller = self.controller
        while True:
            busy = (controller.current is not None and controller.current.active) or (
                controller.settling is not None
            )
            await asyncio.sleep(TICK_SECONDS if busy else 0.2)
            try:
                controller.tick()
            except Exception:
                log.exception("rollout tick failed")
            self.send_hooks()

    def send_hooks(self) -> None:
        outbox = self.controller.outbox
        while outbox:
            call = outbox.pop(0)
            task = asyncio.get_running_loop().create_task(self._send(call))
            self._hooks.add(task)
            task.add_done_callback(self._hooks.discard)

    async def _send(self, call: HookCall) -> None:
        import aiohttp

        error: str | None = None
        try:
            timeout = aiohttp.ClientTimeout(total=call.timeout)
            async with (
                aiohttp.ClientSession(timeout=timeout) as session,
                session.post(call.url, json=call.body) as response,
            ):
                await response.read()
                if response.status >= 300:
                    error = f"answered {response.status}"
        except TimeoutError:
            error = f"no answer within {call.timeout:g}s"
        except aiohttp.ClientError as exc:
            error = f"{type(exc).__name__}: {exc}"
        self.controller.hook_done(call, error)
