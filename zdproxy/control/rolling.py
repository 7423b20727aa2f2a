"""Rolling update of one pool: backend by backend (or in batches), through the runtime.

For teams with one pool (no blue/green): each backend in turn is drained,
waits until nothing is in flight on it, waits for the operator's deploy tool to
say it was replaced (``next``), is enabled again, waits until the health checks
pass ``rise`` times, waits out its slow start, and the next one follows. Never
more than ``batch`` backends at once, and never fewer than ``min_in_rotation``
backends of the pool in rotation (a batch shrinks, or waits, to respect it).

A backend that does not come back healthy within ``healthy_timeout`` (or is not
replaced within ``replace_timeout``, or is changed by someone else meanwhile)
stops the update: phase ``failed`` with the reason; the backends not reached
yet keep serving untouched.

The controller is a table-driven state machine advanced by ``tick`` (a task
calls it every 100 ms): each backend of the update has a step, and a step moves
on a condition of the runtime's state. It acts only through the runtime's
mutation API (``drain``, ``enable``) and records every transition in the audit
log (``rolling.start``, ``rolling.backend``, ``rolling.next``, ``rolling.done``,
``rolling.failed``, ``rolling.abort``). Its progress is a section of the saved
state, so a restarted proxy shows it and carries on where it was.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from zdproxy.balancing.model import Admin, BackendState
from zdproxy.config.schema import parse_duration
from zdproxy.control.commands import Drain, Enable
from zdproxy.control.events import iso_time
from zdproxy.control.runtime import Runtime
from zdproxy.errors import Conflict, ControlError, NotFound

log = logging.getLogger("zdproxy.control")

#: the actor of the drains and enables the controller makes
ACTOR = "rolling"
#: how often the controller looks at the runtime, seconds
TICK_SECONDS = 0.1
#: the saved-state section
SECTION = "rolling"
DEFAULT_HEALTHY_TIMEOUT = 60.0


class Phase(enum.StrEnum):
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    ABORTED = "aborted"


class Step(enum.StrEnum):
    """Where one backend of the update is."""

    QUEUED = "queued"
    DRAINING = "draining"  # no new requests; waiting for the in-flight ones
    REPLACE = "replace"  # drained; waiting for ``next`` (the deploy tool replaced it)
    STARTING = "starting"  # enabled; waiting for ``rise`` passing health checks
    SLOW_START = "slow_start"  # up; waiting for its slow start ramp to end
    DONE = "done"
    FAILED = "failed"


#: the steps of a backend in the current batch, in order
ACTIVE_STEPS = (Step.DRAINING, Step.REPLACE, Step.STARTING, Step.SLOW_START)


@dataclass(frozen=True, slots=True)
class Plan:
    batch: int = 1
    min_in_rotation: int = 1
    wait_replaced: bool = True
    healthy_timeout: float = DEFAULT_HEALTHY_TIMEOUT
    #: None: wait for ``next`` for as long as it takes
    replace_timeout: float | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "batch": self.batch,
            "min_in_rotation": self.min_in_rotation,
            "wait_replaced": self.wait_replaced,
            "healthy_timeout": self.healthy_timeout,
            "replace_timeout": self.replace_timeout,
        }


PLAN_KEYS = frozenset(Plan().to_json())


def parse_plan(body: Mapping[str, Any]) -> Plan:
    """The plan from an API body; ``ControlError`` (400) naming the first problem."""
    unknown = sorted(set(body) - PLAN_KEYS)
    if unknown:
        raise ControlError(f"unknown key {unknown[0]!r} (expected: {', '.join(sorted(PLAN_KEYS))})")
    batch = body.get("batch", 1)
    if type(batch) is not int or not 1 <= batch <= 1000:
        raise ControlError(f"batch must be an integer 1-1000, got {batch!r}")
    minimum = body.get("min_in_rotation", 1)
    if type(minimum) is not int or not 0 <= minimum <= 1000:
        raise ControlError(f"min_in_rotation must be an integer 0-1000, got {minimum!r}")
    wait = body.get("wait_replaced", True)
    if not isinstance(wait, bool):
        raise ControlError(f"wait_replaced must be true or false, got {wait!r}")
    healthy = _duration(body, "healthy_timeout", DEFAULT_HEALTHY_TIMEOUT)
    if healthy is None or healthy <= 0:
        raise ControlError("healthy_timeout must be a positive duration")
    replace = _duration(body, "replace_timeout", None)
    if replace is not None and replace <= 0:
        raise ControlError("replace_timeout must be a positive duration (or null: no limit)")
    return Plan(batch, minimum, wait, healthy, replace)


def _duration(body: Mapping[str, Any], key: str, default: float | None) -> float | None:
    if key not in body:
        return default
    value = body[key]
    if value is None:
        return None
    try:
        return parse_duration(value)
    except ValueError as exc:
        raise ControlError(f"{key}: {exc}") from None


@dataclass(slots=True)
class RollingUpdate:
    """One rolling update of one pool."""

    id: int
    pool: str
    plan: Plan
    actor: str
    #: the pool's backends in the order they are updated
    order: list[str]
    steps: dict[str, Step]
    phase: Phase = Phase.RUNNING
    reason: str | None = None
    started_at: float = field(default_factory=time.time)
    finished_at: float | None = None
    #: the backends of the current batch
    batch: list[str] = field(default_factory=list)
    #: clock time the current batch entered its current wait (for the timeouts)
    since: float = 0.0
    #: what the controller waits for when no batch can start (min_in_rotation)
    waiting: str | None = None
    batches: int = 0

    @property
    def running(self) -> bool:
        return self.phase is Phase.RUNNING

    def to_json(self, runtime: Runtime | None = None, now: float | None = None) -> dict[str, Any]:
        """The API view (with ``runtime``: the live figures of the batch's backends)."""
        counts = {step.value: 0 for step in Step}
        for step in self.steps.values():
            counts[step.value] += 1
        current = []
        for backend_id in self.batch:
            item: dict[str, Any] = {"id": backend_id, "step": self.steps[backend_id].value}
            backend = runtime.backends.get(backend_id) if runtime is not None else None
            if backend is not None:
                item.update(
                    address=backend.address,
                    state=backend.state.value,
                    in_flight=backend.in_flight,
                )
            current.append(item)
        waited = None
        if self.running and now is not None and (self.batch or self.waiting):
            waited = round(max(0.0, now - self.since), 3)
        return {
            "id": self.id,
            "pool": self.pool,
            "phase": self.phase.value,
            "reason": self.reason,
            "actor": self.actor,
            "plan": self.plan.to_json(),
            "started_at": iso_time(self.started_at),
            "finished_at": iso_time(self.finished_at) if self.finished_at is not None else None,
            "current": current,
            "waiting_for": self.waiting,
            "seconds_in_step": waited,
            "batches": self.batches,
            "backends": [{"id": b, "step": self.steps[b].value} for b in self.order],
            "done": counts[Step.DONE.value],
            "total": len(self.order),
            "counts": counts,
        }

    def export(self) -> dict[str, Any]:
        """What the state store keeps (enough to show and resume it)."""
        return {
            "id": self.id,
            "pool": self.pool,
            "plan": self.plan.to_json(),
            "actor": self.actor,
            "order": list(self.order),
            "steps": {k: v.value for k, v in self.steps.items()},
            "phase": self.phase.value,
            "reason": self.reason,
            "started_at": self.started_at,
            "finished_at": self.finished_at,
            "batch": list(self.batch),
            "batches": self.batches,
        }


def _load(data: Any, now: float) -> RollingUpdate:
    """A saved update (raises on any layout problem: the caller drops it)."""
    plan = parse_plan(data["plan"])
    steps = {str(k): Step(v) for k, v in data["steps"].items()}
    order = [str(b) for b in data["order"]]
    if set(order) != set(steps):
        raise ValueError("order and steps disagree")
    batch = [str(b) for b in data["batch"]]
    if not set(batch) <= set(steps):
        raise ValueError("batch names unknown backends")
    return RollingUpdate(
        id=int(data["id"]),
        pool=str(data["pool"]),
        plan=plan,
        actor=str(data["actor"]),
        order=order,
        steps=steps,
        phase=Phase(data["phase"]),
        reason=data["reason"] if isinstance(data["reason"], str) else None,
        started_at=float(data["started_at"]),
        finished_at=float(data["finished_at"]) if data["finished_at"] is not None else None,
        batch=batch,
        since=now,
        batches=int(data["batches"]),
    )


class RollingUpdates:
    """Every pool's rolling update (one running per pool at most) and the
    controller that advances them."""

    def __init__(
        self,
        runtime: Runtime,
        slow_start_percent: Callable[[str], int | None] | None = None,
        clock: Callable[[], float] | None = None,
    ) -> None:
        self.runtime = runtime
        #: whether a backend still ramps up (the health package's slow start)
        self.slow_start_percent = slow_start_percent or _no_slow_start
        self.clock = clock or runtime.clock
        #: the latest update of each pool, running or finished
        self.updates: dict[str, RollingUpdate] = {}
        self._next_id = 1
        self._task: asyncio.Task[None] | None = None
        runtime.add_state_section(SECTION, self.export, self.restore)

    # ---- operator calls ------------------------------------------------------

    def start(self, pool: Any, body: Mapping[str, Any], actor: str) -> RollingUpdate:
        if not isinstance(pool, str) or pool not in self.runtime.pool_weights:
            known = ", ".join(self.runtime.pool_weights)
            raise NotFound(f"no pool named {pool!r} (pools: {known})")
        plan = parse_plan(body)
        current = self.updates.get(pool)
        if current is not None and current.running:
            raise Conflict(
                f"a rolling update of pool {pool!r} is already running (id {current.id}); "
                "abort it first"
            )
        members = [b for b in self.runtime.backends.values() if b.pool == pool]
        if not members:
            raise ControlError(f"pool {pool!r} has no backends")
        if plan.min_in_rotation >= len(members):
            raise ControlError(
                f"min_in_rotation {plan.min_in_rotation} leaves no backend of the "
                f"{len(members)} in pool {pool!r} to update"
            )
        busy = [b.id for b in members if b.id in self.runtime.removing]
        if busy:
            raise Conflict(f"backend {busy[0]} of pool {pool!r} is being removed")
        update = RollingUpdate(
            id=self._next_id,
            pool=pool,
            plan=plan,
            actor=actor,
            order=[b.id for b in members],
            steps={b.id: Step.QUEUED for b in members},
        )
        self._next_id += 1
        self.updates[pool] = update
        log.info(
            "rolling update %d of pool %s by %s: %d backend(s), batch %d, at least %d in rotation",
            update.id,
            pool,
            actor,
            len(members),
            plan.batch,
            plan.min_in_rotation,
        )
        self._event(actor, "rolling.start", update, None, {"plan": plan.to_json()})
        self.tick()
        return update

    def find(self, pool: Any) -> RollingUpdate:
        """The update an operator call acts on: the pool's, or the only running one."""
        if pool is None:
            running = [u for u in self.updates.values() if u.running]
            if len(running) == 1:
                return running[0]
            if not running:
                raise NotFound("no rolling update is running")
            names = ", ".join(u.pool for u in running)
            raise ControlError(f"rolling updates run in several pools ({names}): name the pool")
        if not isinstance(pool, str) or pool not in self.runtime.pool_weights:
            raise NotFound(f"no pool named {pool!r}")
        update = self.updates.get(pool)
        if update is None:
            raise NotFound(f"pool {pool!r} has had no rolling update")
        return update

    def next(self, pool: Any, actor: str) -> RollingUpdate:
        """The deploy tool replaced the backend(s) waiting for it: bring them back."""
        update = self.find(pool)
        if not update.running:
            raise Conflict(f"the rolling update of pool {update.pool!r} is {update.phase.value}")
        waiting = [b for b in update.batch if update.steps[b] is Step.REPLACE]
        if not waiting:
            busy = ", ".join(f"{b} ({update.steps[b].value})" for b in update.batch)
            raise Conflict(
                "no backend is waiting to be replaced"
                + (f": {busy}" if busy else "")
                + "; call next once the current backend is drained"
            )
        not_yet = [b for b in update.batch if update.steps[b] is Step.DRAINING]
        if not_yet:
            raise Conflict(
                f"backend {not_yet[0]} is still draining; call next once the whole batch is drained"
            )
        self._event(actor, "rolling.next", update, None, {"replaced": waiting})
        for backend_id in waiting:
            self._bring_back(update, backend_id)
        return update

    def abort(self, pool: Any, actor: str) -> RollingUpdate:
        """Stop: the backends stay as they are (a drained one stays out of rotation
        until enabled), the ones not reached keep serving."""
        update = self.find(pool)
        if not update.running:
            raise Conflict(f"the rolling update of pool {update.pool!r} is {update.phase.value}")
        out = [b for b in update.batch if update.steps[b] in (Step.DRAINING, Step.REPLACE)]
        reason = f"aborted by {actor}"
        if out:
            reason += f"; left out of rotation: {', '.join(out)} (enable to bring back)"
        self._end(update, Phase.ABORTED, reason, actor, "rolling.abort")
        return update

    def view(self, pool: str | None = None) -> dict[str, Any]:
        now = self.clock()
        updates = [
            u.to_json(self.runtime, now)
            for name, u in self.updates.items()
            if pool is None or name == pool
        ]
        return {"updates": updates, "running": sum(1 for u in updates if u["phase"] == "running")}

    # ---- the controller ------------------------------------------------------

    async def run(self) -> None:
        while True:
            await asyncio.sleep(TICK_SECONDS)
            try:
                self.tick()
            except Exception:
                log.exception("rolling update controller tick failed")

    def start_task(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self.run())

    def stop_task(self) -> None:
        if self._task is not None:
            self._task.cancel()
            self._task = None

    def tick(self) -> None:
        for update in list(self.updates.values()):
            if update.running:
                self._advance(update)

    def _advance(self, update: RollingUpdate) -> None:
        runtime = self.runtime
        now = self.clock()
        for backend_id in update.batch:
            if backend_id not in runtime.backends:
                self._fail(update, f"backend {backend_id} was removed during the update")
                return
        if not update.batch:
            self._start_batch(update, now)
            return
        for backend_id in list(update.batch):
            if not self._advance_backend(update, backend_id, now):
                return
        if all(update.steps[b] is Step.DONE for b in update.batch):
            update.batch = []
            self._start_batch(update, now)

    def _start_batch(self, update: RollingUpdate, now: float) -> None:
        runtime = self.runtime
        queued = [b for b in update.order if update.steps[b] is Step.QUEUED]
        queued = [b for b in queued if b in runtime.backends]
        if not queued:
            self._end(update, Phase.SUCCEEDED, None, ACTOR, "rolling.done")
            return
        members = [b for b in runtime.backends.values() if b.pool == update.pool]
        in_rotation = sum(1 for b in members if b.state is BackendState.UP)
        room = in_rotation - update.plan.min_in_rotation
        picked: list[str] = []
        for backend_id in queued:
            if len(picked) == update.plan.batch:
                break
            # a backend out of rotation already costs nothing to take out
            cost = 1 if runtime.backends[backend_id].state is BackendState.UP else 0
            if cost > room:
                continue
            room -= cost
            picked.append(backend_id)
        if not picked:
            waiting = (
                f"{in_rotation} backend(s) of pool {update.pool} in rotation, at least "
                f"{update.plan.min_in_rotation} must stay"
            )
            if update.waiting is None:
                update.waiting = waiting
                update.since = now
                self._state_changed()
            elif now - update.since > update.plan.healthy_timeout:
                self._fail(update, f"waited {update.plan.healthy_timeout:g}s: {waiting}")
            return
        update.waiting = None
        update.batch = picked
        update.batches += 1
        update.since = now
        for backend_id in picked:
            backend = runtime.backends[backend_id]
            if backend.admin is Admin.DISABLED or backend.admin is Admin.DRAINED:
                # out of rotation already: nothing to drain
                self._set_step(update, backend_id, self._after_drain(update))
                if update.steps[backend_id] is Step.STARTING:
                    self._enable(update, backend_id)
                    if not update.running:
                        return
                continue
            try:
                runtime.apply(Drain(backend_id), ACTOR)
            except ControlError as exc:
                self._fail(update, f"cannot drain backend {backend_id}: {exc}")
                return
            self._set_step(update, backend_id, Step.DRAINING)

    def _after_drain(self, update: RollingUpdate) -> Step:
        return Step.REPLACE if update.plan.wait_replaced else Step.STARTING

    def _advance_backend(self, update: RollingUpdate, backend_id: str, now: float) -> bool:
        """Move one backend on when its condition holds; False when the update ended."""
        backend = self.runtime.backends[backend_id]
        step = update.steps[backend_id]
        plan = update.plan
        if step is Step.DRAINING:
            if backend.admin is Admin.DRAINED:
                new = self._after_drain(update)
                self._set_step(update, backend_id, new)
                if all(update.steps[b] is not Step.DRAINING for b in update.batch):
                    update.since = now
                if new is Step.STARTING:
                    self._enable(update, backend_id)
            elif backend.admin is not Admin.DRAINING:
                return self._fail(
                    update,
                    f"backend {backend_id} was set {backend.admin.value} by someone else "
                    "while it drained",
                )
        elif step is Step.REPLACE:
            if backend.admin is Admin.ENABLED:
                return self._fail(
                    update, f"backend {backend_id} was enabled by someone else before next"
                )
            timeout = plan.replace_timeout
            if timeout is not None and now - update.since > timeout:
                return self._fail(
                    update, f"backend {backend_id} was not replaced (next) within {timeout:g}s"
                )
        elif step is Step.STARTING:
            if backend.admin is not Admin.ENABLED:
                return self._fail(
                    update,
                    f"backend {backend_id} was set {backend.admin.value} by someone else "
                    "while it started",
                )
            if backend.state is BackendState.UP:
                ramping = self.slow_start_percent(backend_id) is not None
                self._set_step(update, backend_id, Step.SLOW_START if ramping else Step.DONE)
            elif now - update.since > plan.healthy_timeout:
                return self._fail(update, self._not_back(backend_id, plan.healthy_timeout))
        elif step is Step.SLOW_START:
            if backend.state is not BackendState.UP:
                self._set_step(update, backend_id, Step.STARTING)
            elif self.slow_start_percent(backend_id) is None:
                self._set_step(update, backend_id, Step.DONE)
        return True

    def _not_back(self, backend_id: str, timeout: float) -> str:
        backend = self.runtime.backends[backend_id]
        reason = (
            f"backend {backend_id} ({backend.address}) did not come back healthy within "
            f"{timeout:g}s (state {backend.state.value}"
        )
        info = self.runtime.health_info.get(backend_id) or {}
        error = info.get("last_error")
        if error:
            reason += f", last check: {error}"
        elif info.get("last_status") is not None:
            reason += f", last check: status {info['last_status']}"
        return reason + ")"

    def _bring_back(self, update: RollingUpdate, backend_id: str) -> None:
        update.since = self.clock()
        self._set_step(update, backend_id, Step.STARTING)
        self._enable(update, backend_id)

    def _enable(self, update: RollingUpdate, backend_id: str) -> None:
        try:
            self.runtime.apply(Enable(backend_id), ACTOR)
        except ControlError as exc:
            self._fail(update, f"cannot enable backend {backend_id}: {exc}")

    # ---- transitions ---------------------------------------------------------

    def _set_step(self, update: RollingUpdate, backend_id: str, step: Step) -> None:
        before = update.steps[backend_id]
        if before is step:
            return
        update.steps[backend_id] = step
        log.info(
            "rolling update %d of pool %s: backend %s %s -> %s",
            update.id,
            update.pool,
            backend_id,
            before.value,
            step.value,
        )
        self.runtime.events.record(
            ACTOR,
            "rolling.backend",
            backend_id,
            {"pool": update.pool, "step": before.value},
            {"pool": update.pool, "step": step.value},
        )
        self._state_changed()

    def _fail(self, update: RollingUpdate, reason: str) -> bool:
        for backend_id in update.batch:
            if update.steps[backend_id] in (Step.STARTING, Step.SLOW_START):
                update.steps[backend_id] = Step.FAILED
        self._end(update, Phase.FAILED, reason, ACTOR, "rolling.failed")
        return False

    def _end(
        self, update: RollingUpdate, phase: Phase, reason: str | None, actor: str, action: str
    ) -> None:
        before = update.phase.value
        update.phase = phase
        update.reason = reason
        update.finished_at = time.time()
        update.waiting = None
        if phase is Phase.FAILED:
            log.warning("rolling update %d of pool %s failed: %s", update.id, update.pool, reason)
        else:
            log.info(
                "rolling update %d of pool %s: %s%s",
                update.id,
                update.pool,
                phase.value,
                f" ({reason})" if reason else "",
            )
        self._event(actor, action, update, {"phase": before}, {"phase": phase.value}, reason)

    def _event(
        self,
        actor: str,
        action: str,
        update: RollingUpdate,
        before: Any,
        after: Any,
        note: str | None = None,
    ) -> None:
        after = {"id": update.id, **after} if isinstance(after, dict) else after
        self.runtime.events.record(actor, action, update.pool, before, after, note)
        self._state_changed()

    def _state_changed(self) -> None:
        self.runtime.state_changed()

    # ---- persistence ---------------------------------------------------------

    def export(self) -> dict[str, Any]:
        return {
            "next_id": self._next_id,
            "updates": {pool: u.export() for pool, u in self.updates.items()},
        }

    def checkpoint(self) -> Any:
        """The updates as saved, for ``rollback`` when an operator call cannot be saved."""
        return self.export()

    def rollback(self, checkpoint: Any) -> None:
        self.updates.clear()
        self.restore(checkpoint)

    def restore(self, saved: Any) -> None:
        """Take the saved section back; a running update carries on (its timeouts
        start over). A section that does not parse is logged and dropped."""
        if saved is None:
            return
        now = self.clock()
        try:
            self._next_id = int(saved["next_id"])
            updates = {str(pool): _load(data, now) for pool, data in saved["updates"].items()}
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            log.warning("saved state: the rolling updates section is unusable (%s); dropped", exc)
            return
        for pool, update in updates.items():
            if pool not in self.runtime.pool_weights:
                log.info("saved state: rolling update of pool %s, which is gone; dropped", pool)
                continue
            if update.running:
                log.info(
                    "resuming rolling update %d of pool %s (%s)",
                    update.id,
                    pool,
                    ", ".join(f"{b}: {update.steps[b].value}" for b in update.batch)
                    or "next batch",
                )
            self.updates[pool] = update
            self._next_id = max(self._next_id, update.id + 1)


def _no_slow_start(backend_id: str) -> int | None:
    return None
