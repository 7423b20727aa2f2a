"""The runtime: sole owner of mutable routing state.

Admin calls, health checks and (later) rollouts change state only through its
methods. Each change rebuilds an immutable ``Snapshot`` and hands it to the
subscribers (the selector of the data path), so a request sees either the old
or the new state, never half of a change.

Changes are typed commands (``zdproxy.control.commands``: ``SetWeights``,
``Flip``, ``Drain``, ``Enable``, ``Disable``, ``AddBackend``, ``RemoveBackend``,
``RolloutWeights``) applied by ``apply(command, actor)``. A command validates
everything first and raises ``ControlError`` (400), ``NotFound`` (404) or
``Conflict`` (409) with nothing changed; a change is applied with exactly one
snapshot swap, recorded in the audit log (``events``) and handed to the state
listeners (persistence). ``batch()`` applies several commands with one snapshot
swap and one save, all or nothing. The methods ``split``, ``flip``, ``drain``...
are thin wrappers kept for tests and callers that want their old return values.

Times are ``time.monotonic()`` seconds (``clock``), the clock the event loop
uses too; ``drain_started`` tells the data path since when a backend drains.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Any

from zdproxy.balancing.model import (
    ADMIN_FLAGS,
    HEALTH_FLAGS,
    Admin,
    Backend,
    BackendSpec,
    BackendState,
    Flag,
    Health,
    Snapshot,
    admin_flags,
    health_flags,
    health_of,
    with_flag,
)
from zdproxy.balancing.stats import PoolStats
from zdproxy.config.diff import ConfigDiff
from zdproxy.config.schema import BackendConfig, Config, parse_address
from zdproxy.control.commands import (
    AddBackend,
    Command,
    Disable,
    Drain,
    Enable,
    Flip,
    RemoveBackend,
    RolloutWeights,
    SetWeights,
)
from zdproxy.control.events import SYSTEM_ACTOR, Event, EventLog, iso_time
from zdproxy.control.store import STATE_FORMAT
from zdproxy.errors import Conflict, ControlError, NotFound

log = logging.getLogger("zdproxy.control")

SnapshotListener = Callable[[Snapshot], None]
StateListener = Callable[[dict[str, Any]], None]

_BACKEND_ID = re.compile(r"^[A-Za-z0-9_.:-]{1,128}$")
_MAX_BACKEND_WEIGHT = 1000

#: Operator actions on one backend: (action, current admin state) -> new admin state.
#: The same state means "nothing to do"; a missing pair is refused with 409.
ADMIN_TRANSITIONS: dict[tuple[str, Admin], Admin] = {
    ("drain", Admin.ENABLED): Admin.DRAINING,
    ("drain", Admin.DRAINING): Admin.DRAINING,
    ("drain", Admin.DRAINED): Admin.DRAINED,
    ("disable", Admin.ENABLED): Admin.DISABLED,
    ("disable", Admin.DRAINING): Admin.DISABLED,
    ("disable", Admin.DRAINED): Admin.DISABLED,
    ("disable", Admin.DISABLED): Admin.DISABLED,
    ("enable", Admin.ENABLED): Admin.ENABLED,
    ("enable", Admin.DRAINING): Admin.ENABLED,
    ("enable", Admin.DRAINED): Admin.ENABLED,
    ("enable", Admin.DISABLED): Admin.ENABLED,
}

_REFUSALS: dict[tuple[str, Admin], str] = {
    ("drain", Admin.DISABLED): "backend {id} is disabled: enable it before draining it",
}


@dataclass(frozen=True, slots=True)
class Checkpoint:
    """The operator-controlled part of the runtime at one moment (``Runtime.checkpoint``)."""

    pool_weights: dict[str, int]
    backends: dict[str, Backend]
    #: the flags of every backend
    flags: dict[str, Flag]
    added: dict[str, dict[str, Any]]
    removed: dict[str, dict[str, str]]
    drain_started: dict[str, float]
    removing: dict[str, float]
    effective_weight: dict[str, int]
    checked: dict[str, bool]
    health_info: dict[str, Mapping[str, Any]]
    next_event: int
    rollout_state: dict[str, Any] | None
    revoked_pins: frozenset[str] = frozenset()


class Runtime:
    def __init__(
        self,
        config: Config,
        clock: Callable[[], float] = time.monotonic,
        service: str = "default",
    ) -> None:
        self.config = config
        #: the service this control plane runs (set on every backend it creates)
        self.service = service
        self.clock = clock
        #: whether ``Backend.in_flight`` is current; with workers, the control's
        #: figures come from their reports, and a drain or removal must not end on
        #: one older than the state that started it (set by the worker set)
        self.in_flight_settled: Callable[[], bool] = _always
        self.version = 0
        self.pool_weights: dict[str, int] = {}
        self.pool_stats: dict[str, PoolStats] = {}
        self.backends: dict[str, Backend] = {}
        #: effective weights (slow start, outlier ejection) by backend id; default: the
        #: configured weight
        self.effective_weight: dict[str, int] = {}
        #: the audit log
        self.events = EventLog(config.admin.events_ring)
        #: with several services: default backend ids start with ``<service>-``, and
        #: an id another service uses is refused (connection pools are by backend id)
        self.id_prefix = ""
        self.id_in_use: Callable[[str], bool] = _never
        #: backends added through the API: id -> {id, pool, address, weight} (persisted)
        self.added: dict[str, dict[str, Any]] = {}
        #: config backends removed through the API: id -> {pool, address} (persisted)
        self.removed: dict[str, dict[str, str]] = {}
        #: since when (clock) a backend in admin state DRAINING drains, by id
        self.drain_started: dict[str, float] = {}
        #: backends being removed: id -> deadline (clock) after which they go anyway
        self.removing: dict[str, float] = {}
        #: whether active health checks apply to a backend, by id
        self.checked: dict[str, bool] = {}
        #: health-check details by backend id, filled by the health checker for the API
        self.health_info: dict[str, Mapping[str, Any]] = {}
        #: zdproxy_rollouts_total and zdproxy_config_reloads_total, by result
        self.rollout_results: dict[str, int] = {}
        self.config_reloads: dict[str, int] = {}
        #: zdproxy_upgrades_total, by result: "ok" in the process that took over,
        #: "failed" and "refused" in the one that stayed
        self.upgrades: dict[str, int] = {}
        #: the rollout engine's persisted part (plan, progress, history); opaque here
        self.rollout_state: dict[str, Any] | None = None
        #: asked before an operator's split or flip: raises ``Conflict`` to refuse it
        #: (a rollout runs), may abort the rollout when forced (action, actor, force)
        self.weights_guard: Callable[[str, str, bool], None] | None = None
        #: pools whose affinity pins are void at once when their weight is 0 (a
        #: rolled-back canary), whatever ``sticky.on_pool_zero`` says
        self.revoked_pins: set[str] = set()
        self._listeners: list[SnapshotListener] = []
        self._state_listeners: list[StateListener] = []
        self._snapshot: Snapshot | None = None
        #: inside ``batch()``: publication and saving wait for its end
        self._batching = False
        self._publish_pending = False
        self._save_pending = False
        #: more persisted sections (rolling updates, ...): key -> (export, restore)
        self._sections: dict[str, tuple[Callable[[], Any], Callable[[Any], None]]] = {}
        self.load_config(config)

    # ---- building ----------------------------------------------------------

    def load_config(self, config: Config) -> None:
        """Take pools and backends from the config (at start)."""
        self.config = config
        for name, pool in config.pools.items():
            self.pool_weights[name] = pool.weight
            self.pool_stats.setdefault(name, PoolStats())
        for pool_name, backend_id, spec in config.backend_ids():
            self._create(
                backend_id,
                pool_name,
                spec.address.host,
                spec.address.port,
                spec.weight,
                self._checks_enabled(pool_name, spec),
            )
        self.publish()

    def _checks_enabled(self, pool: str, spec: BackendConfig | None) -> bool:
        """Whether active health checks apply: the nearest ``enabled`` wins."""
        enabled = self.config.health_check.enabled
        pool_config = self.config.pools.get(pool)
        for override in (
            pool_config.health_check if pool_config is not None else None,
            spec.health_check if spec is not None else None,
        ):
            if override is not None and override.enabled is not None:
                enabled = override.enabled
        return enabled

    def _create(
        self, backend_id: str, pool: str, host: str, port: int, weight: int, checked: bool
    ) -> Backend:
        spec = BackendSpec(backend_id, pool, host, port, weight, self.service)
        backend = Backend.from_spec(spec, Flag.PENDING_ACTIVE_CHECK if checked else Flag(0))
        self.backends[backend_id] = backend
        self.checked[backend_id] = checked
        return backend

    def subscribe(self, listener: SnapshotListener) -> None:
        self._listeners.append(listener)

    def add_state_section(
        self, key: str, export: Callable[[], Any], restore: Callable[[Any], None]
    ) -> None:
        """A part of the control plane with state of its own to persist: ``export()``
        goes into the saved state under ``key``; ``restore(saved or None)`` gets it
        back at start."""
        self._sections[key] = (export, restore)

    def subscribe_state(self, listener: StateListener) -> None:
        """Called with ``export_state()`` after every change of persisted state."""
        self._state_listeners.append(listener)

    @property
    def snapshot(self) -> Snapshot:
        assert self._snapshot is not None
        return self._snapshot

    def build_snapshot(self) -> Snapshot:
        self.version += 1
        return Snapshot.build(
            self.version,
            self.pool_weights,
            self.backends.values(),
            self.pool_stats,
            effective=self.effective_weight,
            revoked=self.revoked_pins,
            drain_started=self.drain_started,
        )

    def publish(self) -> None:
        if self._batching:
            self._publish_pending = True
            return
        snapshot = self.build_snapshot()
        self._snapshot = snapshot
        for listener in self._listeners:
            listener(snapshot)

    def adopt(self, snapshot: Snapshot) -> None:
        """A replica (a worker's runtime) takes the control process's snapshot
        (``Snapshot.from_dict`` keeps the backend objects it can): weights,
        backends, effective weights, revoked pins and drain starts. The caller
        publishes."""
        self.pool_weights = snapshot.pool_weights()
        for pool in self.pool_weights:
            self.pool_stats.setdefault(pool, snapshot.pools[pool].stats)
        self.backends = dict(snapshot.backends)
        self.effective_weight = dict(snapshot.effective)
        self.revoked_pins = set(snapshot.revoked)
        self.drain_started = dict(snapshot.drain_started)

    # ---- health checks and passive health call these ----------------------

    def set_pool_weights(self, weights: dict[str, int]) -> None:
        """Bootstrap helper without checks or audit; operators go through ``split``."""
        self.pool_weights = {name: weights.get(name, 0) for name in self.pool_weights}
        self.publish()

    def _set(self, backend: Backend, flags: Flag) -> bool:
        """Replace a backend's flags; True when its visible state changed."""
        before = backend.set_flags(flags)
        if before is None:
            return False
        log.info("backend %s: %s -> %s", backend.id, before.value, backend.state.value)
        return True

    def _set_admin_flags(self, backend: Backend, admin: Admin) -> bool:
        """The operator's bit for ``admin``; the other causes (health, ejection,
        removal) stay as they are."""
        return self._set(backend, (backend.flags & ~ADMIN_FLAGS) | admin_flags(admin))

    def _set_health_flags(self, backend: Backend, health: Health) -> bool:
        return self._set(backend, (backend.flags & ~HEALTH_FLAGS) | health_flags(health))

    def set_admin(self, backend_id: str, admin: Admin) -> None:
        """Test and bootstrap helper, without checks or audit (operators go through
        ``apply``)."""
        backend = self.backends[backend_id]
        before = backend.flags
        self._set_admin_flags(backend, admin)
        if admin is not Admin.DRAINING:
            self.drain_started.pop(backend_id, None)
        elif backend_id not in self.drain_started:
            self.drain_started[backend_id] = self.clock()
        if backend.flags != before:
            self.publish()

    def set_health(self, backend_id: str, health: Health) -> None:
        """Called by active health checks after rise/fall thresholds are met."""
        backend = self.backends.get(backend_id)
        if backend is None or backend.health is health:
            return
        self._set_health_flags(backend, health)
        self.publish()

    def set_ejected(self, backend_id: str, ejected: bool) -> None:
        """Called by passive health (outlier detection)."""
        backend = self.backends.get(backend_id)
        if backend is None or backend.ejected is ejected:
            return
        self._set(backend, with_flag(backend.flags, Flag.EJECTED, ejected))
        log.info("backend %s: %s", backend_id, "ejected" if ejected else "back from ejection")
        self.publish()

    def set_effective_weight(self, backend_id: str, weight: int | None) -> None:
        """Slow start ramps; None restores the configured weight."""
        if weight is None:
            if self.effective_weight.pop(backend_id, None) is None:
                return
        elif self.effective_weight.get(backend_id) == weight:
            return
        else:
            self.effective_weight[backend_id] = weight
        self.publish()

    def set_backend_state(self, backend_id: str, state: BackendState) -> None:
        """Test and bootstrap helper: force the health part of a backend's state."""
        self.set_health(backend_id, Health(state.value))

    def set_health_info(self, backend_id: str, info: Mapping[str, Any]) -> None:
        """Health-check counters for the state API (no snapshot change)."""
        if backend_id in self.backends:
            self.health_info[backend_id] = info

    def record_config_reload(self, result: str) -> None:
        self.config_reloads[result] = self.config_reloads.get(result, 0) + 1

    def record_rollout(self, result: str) -> None:
        self.rollout_results[result] = self.rollout_results.get(result, 0) + 1

    # ---- commands (the admin API, rollouts and rolling updates) -----------

    def apply(self, command: Command, actor: str = SYSTEM_ACTOR) -> Event | None:
        """Apply one command: its audit event, or None when it changed nothing.
        Raises ``ControlError`` (or its ``NotFound``/``Conflict``) with nothing
        changed."""
        if isinstance(command, SetWeights):
            return self._split(command.weights, actor, command.force)
        if isinstance(command, Flip):
            return self._flip(command.to, actor, command.force)
        if isinstance(command, Drain):
            return self._admin_action("drain", command.backend_id, actor)
        if isinstance(command, Disable):
            return self._admin_action("disable", command.backend_id, actor)
        if isinstance(command, Enable):
            return self._admin_action("enable", command.backend_id, actor)
        if isinstance(command, AddBackend):
            return self._add_backend(
                command.pool, command.address, command.backend_id, command.weight, actor
            )
        if isinstance(command, RemoveBackend):
            return self._remove_backend(command.backend_id, actor)
        if isinstance(command, RolloutWeights):
            return self._rollout_weights(command, actor)
        raise ControlError(f"unknown command {command!r}")

    @contextmanager
    def batch(self) -> Iterator[None]:
        """Several commands, one snapshot publication and one save at the end.

        All or nothing: when a command (or anything else) raises inside the
        batch, every change made since the batch began is undone as ``rollback``
        does (the batch's audit events leave the ring), nothing is published or
        saved, and the error propagates. A batch inside a batch is part of the
        outer one. No ``await`` inside: the batch is one step of the event loop.
        """
        if self._batching:
            yield
            return
        checkpoint = self.checkpoint()
        self._batching = True
        self._publish_pending = self._save_pending = False
        try:
            yield
        except BaseException:
            self._restore(checkpoint)
            self._batching = False
            raise
        self._batching = False
        if self._publish_pending:
            self.publish()
        if self._save_pending:
            self._state_changed()

    # ---- thin wrappers ------------------------------------------------------

    def split(self, weights: Mapping[str, Any], actor: str, force: bool = False) -> Event | None:
        return self.apply(SetWeights(weights, force), actor)

    def flip(self, to: Any, actor: str, force: bool = False) -> Event | None:
        return self.apply(Flip(to, force), actor)

    def drain(self, backend_id: Any, actor: str = SYSTEM_ACTOR) -> Event | None:
        """No new requests; the ones in flight (and, per ``draining``, affinity-bound
        clients) finish; the state goes ``draining`` then ``drained``."""
        return self.apply(Drain(backend_id), actor)

    def disable(self, backend_id: Any, actor: str = SYSTEM_ACTOR) -> Event | None:
        """Out of rotation at once (maintenance); requests in flight finish."""
        return self.apply(Disable(backend_id), actor)

    def enable(self, backend_id: Any, actor: str = SYSTEM_ACTOR) -> Event | None:
        """Back into rotation; with active health checks it starts over in
        ``starting`` and takes traffic after ``rise`` passing checks."""
        return self.apply(Enable(backend_id), actor)

    def add_backend(
        self,
        pool: Any,
        address: Any,
        backend_id: Any = None,
        weight: Any = 1,
        actor: str = SYSTEM_ACTOR,
    ) -> Backend:
        event = self.apply(AddBackend(pool, address, backend_id, weight), actor)
        assert event is not None
        return self.backends[event.target]

    def remove_backend(self, backend_id: Any, actor: str) -> bool:
        """True when the backend is gone already (nothing was in flight)."""
        event = self.apply(RemoveBackend(backend_id), actor)
        return event is None or event.after is None

    def apply_rollout_weights(
        self,
        new: Mapping[str, int],
        action: str,
        target: str,
        actor: str,
        note: str | None = None,
        revoke: frozenset[str] = frozenset(),
        extra: Mapping[str, Any] | None = None,
    ) -> Event:
        event = self.apply(RolloutWeights(new, action, target, note, revoke, extra or {}), actor)
        assert event is not None
        return event

    # ---- what the commands do ---------------------------------------------

    def _split(self, weights: Mapping[str, Any], actor: str, force: bool) -> Event | None:
        """Set every pool's percent of new traffic at once; pools left out get 0.
        Returns the audit event, or None when nothing changed."""
        if not isinstance(weights, Mapping) or not weights:
            raise ControlError('expected pool weights, e.g. {"blue": 90, "green": 10}')
        for name, weight in weights.items():
            self._pool(name)
            if type(weight) is not int or not 0 <= weight <= 100:
                raise ControlError(
                    f"weight of pool {name!r} must be an integer 0-100, got {weight!r}"
                )
        new = {name: weights.get(name, 0) for name in self.pool_weights}
        total = sum(new.values())
        if total != 100:
            split = ", ".join(f"{name}={weight}" for name, weight in new.items())
            raise ControlError(f"pool weights must sum to 100, got {total} ({split})")
        return self._set_weights(new, "split", ",".join(new), actor, force)

    def _flip(self, to: Any, actor: str, force: bool) -> Event | None:
        """100 % of new traffic to pool ``to`` at once; requests in flight on the
        other pools finish where they are."""
        if not isinstance(to, str) or not to:
            raise ControlError("expected the name of the pool to flip to")
        self._pool(to)
        new = {name: 100 if name == to else 0 for name in self.pool_weights}
        return self._set_weights(new, "flip", to, actor, force)

    def _set_weights(
        self, new: dict[str, int], action: str, target: str, actor: str, force: bool
    ) -> Event | None:
        if self.weights_guard is not None:
            self.weights_guard(action, actor, force)
        unusable = [name for name, w in new.items() if w > 0 and not self.usable(name)]
        note = None
        if unusable:
            names = ", ".join(repr(name) for name in unusable)
            problem = f"pool {names} has no usable backend (none is up)"
            if not force:
                raise Conflict(f'{problem}; send "force": true to do it anyway')
            note = f"forced: {problem}"
        if new == self.pool_weights:
            return None
        before = dict(self.pool_weights)
        self.pool_weights = new
        self.publish()
        return self._changed(actor, action, target, before, dict(new), note)

    def _rollout_weights(self, command: RolloutWeights, actor: str) -> Event:
        """The rollout engine's weight changes: one snapshot swap and one audit
        event named ``action`` (``rollout.step``, ``rollout.rollback``, ...) whose
        before/after are the weights (plus ``extra`` in after). Pins to the pools
        in ``revoke`` stop at once; a pool that gets weight again is no longer
        revoked."""
        new, action, target = command.weights, command.action, command.target
        note, revoke, extra = command.note, command.revoke, command.extra
        weights = {name: int(new.get(name, 0)) for name in self.pool_weights}
        if sum(weights.values()) != 100 or any(w < 0 for w in weights.values()):
            raise ControlError(f"rollout weights must sum to 100, got {weights}")
        before = dict(self.pool_weights)
        self.pool_weights = weights
        self.revoked_pins = {p for p in self.revoked_pins | revoke if weights.get(p, 0) == 0}
        self.publish()
        log.info("%s by %s: %s", action, actor, _weights_text(weights))
        after: dict[str, Any] = dict(weights)
        if extra:
            after.update(extra)
        return self._changed(actor, action, target, before, after, note)

    def set_rollout_state(self, state: dict[str, Any] | None) -> None:
        """Store the rollout engine's persisted part and save the state."""
        self.rollout_state = state
        self._state_changed()

    def usable(self, pool: str) -> bool:
        """Whether a pool has a backend that takes new requests now."""
        view = self.snapshot.pools.get(pool)
        return view is not None and bool(view.routable)

    def _add_backend(
        self, pool: Any, address: Any, backend_id: Any, weight: Any, actor: str
    ) -> Event:
        """A new backend in ``pool``. It takes traffic once healthy: it starts in
        ``starting`` when active health checks apply to the pool, else ``up``."""
        if not isinstance(pool, str):
            raise ControlError("pool must be a pool name")
        self._pool(pool)
        if not isinstance(address, str):
            raise ControlError("address must be a string host:port")
        try:
            host_port = parse_address(address)
        except ValueError as exc:
            raise ControlError(str(exc)) from None
        host, port = host_port["host"], host_port["port"]
        if type(weight) is not int or not 0 <= weight <= _MAX_BACKEND_WEIGHT:
            raise ControlError(f"weight must be an integer 0-{_MAX_BACKEND_WEIGHT}, got {weight!r}")
        if backend_id is None:
            backend_id = self._free_id(pool)
        elif not isinstance(backend_id, str) or not _BACKEND_ID.match(backend_id):
            raise ControlError(
                f"invalid backend id {backend_id!r}: use 1-128 letters, digits and _ . : -"
            )
        if backend_id in self.backends or self.id_in_use(backend_id):
            raise Conflict(f"backend id {backend_id!r} is already in use")
        for other in self.backends.values():
            if other.pool == pool and (other.host, other.port) == (host, port):
                raise Conflict(f"pool {pool!r} already has backend {other.id!r} at {other.address}")
        backend = self._create(
            backend_id, pool, host, port, weight, self._checks_enabled(pool, None)
        )
        spec = {"id": backend_id, "pool": pool, "address": backend.address, "weight": weight}
        self.removed.pop(backend_id, None)
        self.added[backend_id] = spec
        self.publish()
        return self._changed(actor, "backend.add", backend_id, None, _brief(backend))

    def _free_id(self, pool: str) -> str:
        prefix = f"{self.id_prefix}{pool}-"
        n = 1
        while (
            f"{prefix}{n}" in self.backends
            or f"{prefix}{n}" in self.removed
            or self.id_in_use(f"{prefix}{n}")
        ):
            n += 1
        return f"{prefix}{n}"

    def _remove_backend(self, backend_id: Any, actor: str) -> Event:
        """Drain a backend, then delete it: at once when nothing is in flight, else
        once its requests finish or after ``draining.timeout``. The event's
        ``after`` is None when it is gone already."""
        backend = self._backend(backend_id)
        if backend.id in self.removing:
            raise Conflict(f"backend {backend.id} is already being removed")
        before = _brief(backend)
        if backend.id in self.added:
            del self.added[backend.id]
        else:
            self.removed[backend.id] = {"pool": backend.pool, "address": backend.address}
        if self._idle_now(backend):
            self._delete(backend)
            self.publish()
            return self._changed(actor, "backend.remove", backend.id, before, None)
        self._start_removal(backend)
        self.publish()
        after = {**_brief(backend), "removing": True}
        return self._changed(actor, "backend.remove", backend.id, before, after)

    def _delete(self, backend: Backend) -> None:
        del self.backends[backend.id]
        self.effective_weight.pop(backend.id, None)
        self.drain_started.pop(backend.id, None)
        self.removing.pop(backend.id, None)
        self.checked.pop(backend.id, None)
        self.health_info.pop(backend.id, None)

    def _admin_action(self, action: str, backend_id: Any, actor: str) -> Event | None:
        backend = self._backend(backend_id)
        if backend.id in self.removing:
            raise Conflict(f"backend {backend.id} is being removed")
        current = backend.admin
        new = ADMIN_TRANSITIONS.get((action, current))
        if new is None:
            message = _REFUSALS.get((action, current), "cannot {action} backend {id} ({admin})")
            raise Conflict(message.format(id=backend.id, action=action, admin=current.value))
        if new is current:
            return None
        before = _brief(backend)
        flags = (backend.flags & ~ADMIN_FLAGS) | admin_flags(new)
        if new is Admin.DRAINING:
            self.drain_started[backend.id] = self.clock()
        else:
            self.drain_started.pop(backend.id, None)
        if new is Admin.ENABLED and self.checked.get(backend.id, False):
            # re-checked from the start; ejection (its own cause) is left alone
            flags = (flags & ~HEALTH_FLAGS) | Flag.PENDING_ACTIVE_CHECK
        self._set(backend, flags)
        self.publish()
        return self._changed(actor, f"backend.{action}", backend.id, before, _brief(backend))

    # ---- config reload ------------------------------------------------------

    def apply_config(
        self, config: Config, plan: ConfigDiff, actor: str, before: Any, after: Any
    ) -> Event:
        """Apply a reloaded config (``plan`` = ``diff(self.config, config)``) in one
        snapshot swap and one ``config.reload`` audit event.

        Unchanged backends keep their objects (health, statistics, pooled
        connections). Removed ones drain first, as ``remove_backend`` does; a
        backend whose pool or address changed is replaced at once under its id
        (its requests in flight finish on the old object). The config wins over
        the API where both define a backend (id, or address in a pool). Pool
        weights: the file's when they (or the pool set) changed since the last
        loaded file, else the running ones are kept (as at restart); when the file
        wins, a rollout in progress is aborted (as by a forced split).
        """
        if plan.weights_changed and self.weights_guard is not None:
            # the file's weights win, as a forced split: a running rollout is aborted
            self.weights_guard("config.reload", actor, True)
        self.config = config
        specs = {backend_id: (pool, spec) for pool, backend_id, spec in config.backend_ids()}
        for name in plan.pools_added:
            self.pool_weights[name] = 0
            self.pool_stats.setdefault(name, PoolStats())
        for backend_id in plan.backends_removed:
            self.removed.pop(backend_id, None)
            backend = self.backends.get(backend_id)
            if backend is not None and backend_id not in self.added:
                self._retire(backend)
        for name in plan.pools_removed:
            for backend in [b for b in self.backends.values() if b.pool == name]:
                self.added.pop(backend.id, None)
                if backend.id not in self.removing:
                    self._retire(backend)
            del self.pool_weights[name]
            self.revoked_pins.discard(name)
        for added in (*plan.backends_replaced, *plan.backends_added):
            pool, spec = specs[added.id]
            self._take_over(added.id, pool, spec)
        for backend_id, weight in plan.backends_reweighted.items():
            backend = self.backends.get(backend_id)
            if backend is not None:
                backend.set_spec(replace(backend.spec, weight=weight))
        self._recheck(specs)
        if plan.weights_changed:
            self.pool_weights = dict(plan.weights)
        for name in plan.pools_removed:
            # after the weights: the stats of a drained pool's last requests are dropped
            self.pool_stats.pop(name, None)
        self.publish()
        return self._changed(actor, "config.reload", "config", before, after)

    def _retire(self, backend: Backend) -> None:
        """Out of the config: deleted now when idle, else drained then deleted."""
        if self._idle_now(backend):
            self._delete(backend)
            return
        self._start_removal(backend)

    def _idle_now(self, backend: Backend) -> bool:
        """Nothing in flight now, as far as this process knows (with workers, from
        their last reports; a removal that must wait for settled figures is not
        built: the removal answer would change from gone to removing)."""
        return backend.in_flight <= 0

    def _start_removal(self, backend: Backend) -> None:
        """``REMOVING`` (and draining when it was enabled) until its requests
        finish or the drain timeout."""
        now = self.clock()
        flags = backend.flags | Flag.REMOVING
        if backend.admin is Admin.ENABLED:
            flags |= Flag.ADMIN_DRAIN
            self.drain_started[backend.id] = now
        self._set(backend, flags)
        self.removing[backend.id] = now + self.config.draining.timeout

    def _take_over(self, backend_id: str, pool: str, spec: BackendConfig) -> None:
        """Create the config's backend ``backend_id``; an API-made one with its id
        or its address in ``pool``, or the entry it replaces, makes room."""
        host, port = spec.address.host, spec.address.port
        for other in list(self.backends.values()):
            same_address = other.pool == pool and (other.host, other.port) == (host, port)
            if other.id == backend_id or (same_address and other.id in self.added):
                self.added.pop(other.id, None)
                self._delete(other)
        self.removed.pop(backend_id, None)
        self._create(backend_id, pool, host, port, spec.weight, self._checks_enabled(pool, spec))

    def _recheck(self, specs: Mapping[str, tuple[str, BackendConfig]]) -> None:
        """Health-check switches may have changed: an unchecked backend is up."""
        for backend in self.backends.values():
            pool, spec = specs.get(backend.id, (backend.pool, None))
            checked = self._checks_enabled(pool, spec)
            self.checked[backend.id] = checked
            if not checked and backend.health is not Health.UP:
                self._set_health_flags(backend, Health.UP)

    # ---- time-driven progress ---------------------------------------------

    def tick(self, now: float | None = None) -> None:
        """Advance drains and removals (the admin layer calls this every 100 ms).

        A draining backend becomes ``drained`` when nothing is in flight on it
        (with ``draining.sticky_until_timeout``: at the timeout), or at the latest
        after ``draining.timeout``. A backend being removed is deleted when nothing
        is in flight on it or at its deadline. All of one tick is one snapshot swap.
        """
        if not self.drain_started and not self.removing:
            return
        if now is None:
            now = self.clock()
        timeout = self.config.draining.timeout
        wait_for_timeout = self.config.draining.sticky_until_timeout
        settled = self.in_flight_settled()
        done: list[tuple[str, str, Any, Any]] = []
        for backend_id, started in list(self.drain_started.items()):
            backend = self.backends.get(backend_id)
            if backend is None or backend.admin is not Admin.DRAINING:
                del self.drain_started[backend_id]
                continue
            if backend_id in self.removing:
                continue
            idle = backend.in_flight <= 0 and not wait_for_timeout and settled
            if idle or now >= started + timeout:
                before = _brief(backend)
                del self.drain_started[backend_id]
                self._set_admin_flags(backend, Admin.DRAINED)
                if not idle:
                    log.info(
                        "backend %s: drain timeout with %d in flight", backend_id, backend.in_flight
                    )
                done.append(("backend.drained", backend_id, before, _brief(backend)))
        for backend_id, deadline in list(self.removing.items()):
            backend = self.backends.get(backend_id)
            if backend is None:
                del self.removing[backend_id]
                continue
            if (backend.in_flight <= 0 and settled) or now >= deadline:
                before = {**_brief(backend), "removing": True}
                self._delete(backend)
                log.info("backend %s removed (%d in flight)", backend_id, backend.in_flight)
                done.append(("backend.removed", backend_id, before, None))
        if done:
            self.publish()
            for action, target, before, after in done:
                self.events.record(SYSTEM_ACTOR, action, target, before, after)
            self._state_changed()

    # ---- persistence ------------------------------------------------------

    def export_state(self) -> dict[str, Any]:
        """What survives a restart, as plain JSON (the ``StateStore`` layout)."""
        return {
            "format": STATE_FORMAT,
            "saved_at": iso_time(time.time()),
            "config_weights": {name: pool.weight for name, pool in self.config.pools.items()},
            "weights": dict(self.pool_weights),
            "admin": {
                b.id: b.admin.value
                for b in self.backends.values()
                if b.admin is not Admin.ENABLED and b.id not in self.removing
            },
            "added": [dict(spec) for spec in self.added.values()],
            "removed": {k: dict(v) for k, v in self.removed.items()},
            **{key: export() for key, (export, _) in self._sections.items()},
            **({"rollouts": self.rollout_state} if self.rollout_state is not None else {}),
        }

    def restore(self, state: Mapping[str, Any]) -> None:
        """Merge saved state (checked by ``store.check_state``) into the state built
        from the config. The config wins where they disagree, field by field:

        * a backend the config no longer has is gone, whatever the state says;
        * a config backend removed through the API stays removed while the config
          still has it with the same pool and address (a changed entry is back);
        * a backend added through the API comes back, unless its pool left the
          config or the config now defines its id or address (the config's wins);
        * admin states (drained, disabled, ...) of the remaining backends come back;
        * saved pool weights win while the config's weights (and pool set) are the
          ones the state was saved under; an edited config's weights win.
        """
        rollouts = state.get("rollouts")
        if isinstance(rollouts, dict):
            self.rollout_state = rollouts
        for backend_id, where in state["removed"].items():
            backend = self.backends.get(backend_id)
            if backend is None:
                log.info("saved state: removed backend %s is not in the config either", backend_id)
            elif (backend.pool, backend.address) == (where["pool"], where["address"]):
                self._delete(backend)
                self.removed[backend_id] = {"pool": where["pool"], "address": where["address"]}
            else:
                log.info(
                    "saved state: backend %s was removed through the API, but the config "
                    "changed it since: the config's entry is used",
                    backend_id,
                )
        for spec in state["added"]:
            self._restore_added(spec)
        for backend_id, admin in state["admin"].items():
            backend = self.backends.get(backend_id)
            if backend is None:
                log.info(
                    "saved state: backend %s is no longer configured; its admin state "
                    "%s is dropped",
                    backend_id,
                    admin,
                )
                continue
            self._set_admin_flags(backend, Admin(admin))
            if backend.admin is Admin.DRAINING:
                self.drain_started[backend_id] = self.clock()
        config_weights = {name: pool.weight for name, pool in self.config.pools.items()}
        saved = state["weights"]
        if state["config_weights"] != config_weights:
            log.info(
                "saved state: the config's pool weights changed since the state was "
                "saved; using the config's weights %s",
                _weights_text(config_weights),
            )
        elif set(saved) != set(self.pool_weights) or sum(saved.values()) != 100:
            log.warning("saved state: weights %s do not fit the pools; using the config's", saved)
        else:
            self.pool_weights = {name: saved[name] for name in self.pool_weights}
        log.info(
            "restored state: weights %s, %d backend(s) added and %d removed through "
            "the API, %d not enabled",
            _weights_text(self.pool_weights),
            len(self.added),
            len(self.removed),
            sum(1 for b in self.backends.values() if b.admin is not Admin.ENABLED),
        )
        for key, (_, restore_section) in self._sections.items():
            restore_section(state.get(key))
        self.publish()

    def _restore_added(self, spec: Mapping[str, Any]) -> None:
        backend_id, pool = spec["id"], spec["pool"]
        if pool not in self.pool_weights:
            log.warning(
                "saved state: backend %s was added to pool %s, which is no longer "
                "configured; dropped",
                backend_id,
                pool,
            )
            return
        if backend_id in self.backends:
            log.info(
                "saved state: the config now defines backend %s; the config's entry wins",
                backend_id,
            )
            return
        try:
            host_port = parse_address(spec["address"])
        except ValueError as exc:
            log.warning("saved state: added backend %s: %s; dropped", backend_id, exc)
            return
        host, port = host_port["host"], host_port["port"]
        for other in self.backends.values():
            if other.pool == pool and (other.host, other.port) == (host, port):
                log.info(
                    "saved state: added backend %s has the address of %s, which the "
                    "config defines; the config's entry wins",
                    backend_id,
                    other.id,
                )
                return
        weight = min(max(spec["weight"], 0), _MAX_BACKEND_WEIGHT)
        self._create(backend_id, pool, host, port, weight, self._checks_enabled(pool, None))
        self.added[backend_id] = {
            "id": backend_id,
            "pool": pool,
            "address": self.backends[backend_id].address,
            "weight": weight,
        }

    # ---- undoing a change that could not be saved -------------------------

    def checkpoint(self) -> Checkpoint:
        """What an operator mutation may change, to undo it with ``rollback``."""
        return Checkpoint(
            pool_weights=dict(self.pool_weights),
            backends=dict(self.backends),
            flags={b.id: b.flags for b in self.backends.values()},
            added=dict(self.added),
            removed=dict(self.removed),
            drain_started=dict(self.drain_started),
            removing=dict(self.removing),
            effective_weight=dict(self.effective_weight),
            checked=dict(self.checked),
            health_info=dict(self.health_info),
            next_event=self.events.next_id,
            rollout_state=self.rollout_state,
            revoked_pins=frozenset(self.revoked_pins),
        )

    def rollback(self, checkpoint: Checkpoint) -> None:
        """Undo every operator change made since ``checkpoint`` (its state could not
        be saved): one snapshot swap back, and its audit events leave the ring.

        Health measured meanwhile is kept, except the ``starting`` an ``enable``
        set: the backend goes back to the health it had.
        """
        self._restore(checkpoint)
        self.publish()

    def _restore(self, checkpoint: Checkpoint) -> None:
        self.pool_weights = dict(checkpoint.pool_weights)
        self.backends = dict(checkpoint.backends)
        self.rollout_state = checkpoint.rollout_state
        self.revoked_pins = set(checkpoint.revoked_pins)
        kept = ADMIN_FLAGS | Flag.REMOVING
        for backend_id, saved in checkpoint.flags.items():
            backend = self.backends[backend_id]
            flags = (backend.flags & ~kept) | (saved & kept)
            if backend.health is Health.STARTING and health_of(saved) is not Health.STARTING:
                flags = (flags & ~HEALTH_FLAGS) | (saved & HEALTH_FLAGS)
            self._set(backend, flags)
        self.added = dict(checkpoint.added)
        self.removed = dict(checkpoint.removed)
        self.drain_started = dict(checkpoint.drain_started)
        self.removing = dict(checkpoint.removing)
        self.effective_weight = dict(checkpoint.effective_weight)
        self.checked = dict(checkpoint.checked)
        self.health_info = dict(checkpoint.health_info)
        self.events.discard_from(checkpoint.next_event)

    # ---- helpers ----------------------------------------------------------

    def _pool(self, name: Any) -> str:
        if not isinstance(name, str) or name not in self.pool_weights:
            known = ", ".join(self.pool_weights)
            raise NotFound(f"no pool named {name!r} (pools: {known})")
        return name

    def _backend(self, backend_id: Any) -> Backend:
        backend = self.backends.get(backend_id) if isinstance(backend_id, str) else None
        if backend is None:
            raise NotFound(f"no backend with id {backend_id!r}")
        return backend

    def _changed(
        self,
        actor: str,
        action: str,
        target: str,
        before: Any,
        after: Any,
        note: str | None = None,
    ) -> Event:
        event = self.events.record(actor, action, target, before, after, note)
        self._state_changed()
        return event

    def state_changed(self) -> None:
        """Persist now (a state section changed)."""
        self._state_changed()

    def _state_changed(self) -> None:
        if self._batching:
            self._save_pending = True
            return
        if self._state_listeners:
            state = self.export_state()
            for listener in self._state_listeners:
                listener(state)


def _always() -> bool:
    return True


def _never(backend_id: str) -> bool:
    return False


def _brief(backend: Backend) -> dict[str, Any]:
    """A backend as the audit log shows it before and after a change."""
    return {
        "pool": backend.pool,
        "address": backend.address,
        "weight": backend.weight,
        "admin": backend.admin.value,
        "state": backend.state.value,
    }


def _weights_text(weights: Mapping[str, int]) -> str:
    return " ".join(f"{name}={weight}" for name, weight in weights.items())
