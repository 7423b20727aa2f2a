"""Several zdproxy instances, one deployment: state shared through etcd.

Layout under ``state.etcd.prefix`` (``P``)::

    P services/<service>/state          the shared part of Runtime.export_state (JSON)
    P services/<service>/events/<id>    one audit event each (id: 12 digits, global)
    P leader                            the rollout leader's instance id (leased)
    P instances/<instance>              its traffic counters per service and pool (leased)

Writes are compare-and-swap transactions on the state key's revision: a change
is applied to the local runtime, then written with its audit events in one
transaction that succeeds only if nobody wrote the state since this instance
read it. When another instance won, the change is undone, the fresh state
applied, and the command run again against it (``mutate``); a command that no
longer applies raises its own 409 (``Conflict``) there. Event ids come from a
counter in the state document, so they are unique and in commit order.

Every instance watches the prefix and applies what others wrote (``converge``)
within milliseconds of the commit. When etcd cannot be reached, the instance
serves on with what it last knew, refuses operator changes with 503
(``EtcdDown``), and on reconnection re-reads everything at the current
revision before it watches again (a compacted watch revision leads there too).

One instance drives rollouts: the one holding the ``leader`` key, written with
its lease (``lease_ttl``); the others mirror the rollout from the shared state
and do not tick it. When the leader dies, its lease expires and the first
instance to create the key again resumes the rollout at the stored step. Each
instance publishes its cumulative per-pool counters (status classes and the
fine latency histogram of ``balancing.stats``) under a leased key; the leader's
analysis reads the sum over all instances (``merge_totals``).
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import json
import logging
import os
import random
import secrets
import socket
import ssl
import time
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any, TypeVar

from zdproxy.balancing.model import Admin
from zdproxy.control.etcd import (
    EtcdClient,
    EtcdCompacted,
    EtcdError,
    EtcdUnavailable,
    KeyValue,
    WatchEvent,
    create_equals,
    mod_equals,
    put_op,
    range_op,
    sleep_backoff,
)
from zdproxy.control.events import Event
from zdproxy.errors import Conflict, ControlError, ZdproxyError

if TYPE_CHECKING:
    from zdproxy.config.schema import EtcdConfig
    from zdproxy.control.rollout import RolloutController
    from zdproxy.control.runtime import Runtime

log = logging.getLogger("zdproxy.etcd")

_T = TypeVar("_T")
Totals = tuple[tuple[int, ...], tuple[int, ...]]

#: the parts of ``Runtime.export_state`` that all instances share (rolling updates
#: and shadow settings stay per instance)
#: state sections of other parts that are shared: the generated sticky signing key
#: (a pin made by one instance is honoured by all)
SHARED_SECTIONS = ("sticky",)
SHARED_KEYS = (
    "format",
    "config_weights",
    "weights",
    "admin",
    "added",
    "removed",
    "rollouts",
    *SHARED_SECTIONS,
)
#: a command is tried this often against fresh state before the caller gets 409
MAX_ATTEMPTS = 30
#: audit events kept in etcd per service, in rings of ``admin.events_ring``
EVENTS_KEPT_RINGS = 10
#: refusals that depend on the state (not on the request): checked against etcd
_STATE_REFUSALS = frozenset({404, 409})


class EtcdDown(ControlError):
    """etcd cannot be reached: operator changes are refused, nothing changed."""

    def __init__(self, detail: str) -> None:
        super().__init__(
            f"etcd is unreachable ({detail}): changes are refused until it is back, "
            "the proxy keeps serving with the last known state",
            status=503,
        )


class EtcdSettingsError(ZdproxyError):
    """The etcd credentials cannot be read; zdproxy refuses to start."""


class Outcome(enum.Enum):
    COMMITTED = "committed"
    CONFLICT = "conflict"
    UNAVAILABLE = "unavailable"


def retry_decision(outcome: Outcome, attempt: int, max_attempts: int = MAX_ATTEMPTS) -> str:
    """What ``mutate`` does after a commit: ``done``, ``retry`` (another instance
    wrote first: apply its state and run the command again), ``unavailable``
    (503) or ``give_up`` (409: the state kept changing under the command)."""
    if outcome is Outcome.COMMITTED:
        return "done"
    if outcome is Outcome.UNAVAILABLE:
        return "unavailable"
    return "retry" if attempt + 1 < max_attempts else "give_up"


def merge_totals(parts: Iterable[Mapping[str, Totals]]) -> dict[str, Totals]:
    """The sum of several instances' cumulative counters, pool by pool (a pool
    missing in one part counts 0 there; lengths are the ``PoolStats`` ones)."""
    merged: dict[str, tuple[list[int], list[int]]] = {}
    for part in parts:
        for pool, (classes, fine) in part.items():
            into = merged.get(pool)
            if into is None:
                merged[pool] = (list(classes), list(fine))
                continue
            for target, source in ((into[0], classes), (into[1], fine)):
                if len(target) < len(source):
                    target.extend([0] * (len(source) - len(target)))
                for i, n in enumerate(source):
                    target[i] += n
    return {pool: (tuple(c), tuple(f)) for pool, (c, f) in merged.items()}


def shared_doc(state: Mapping[str, Any]) -> dict[str, Any]:
    return {key: state[key] for key in SHARED_KEYS if key in state}


def instance_name() -> str:
    return f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}"


# ---- applying a shared state to a runtime -------------------------------------------


def converge(runtime: Runtime, doc: Mapping[str, Any]) -> None:
    """Make the runtime's operator state (weights, admin states, backends added
    and removed) what ``doc`` says, in one snapshot swap. Unlike ``restore``
    (start-up: the config wins), this undoes local differences: the shared state
    is the truth. A backend to remove with requests in flight drains first."""
    removed = doc.get("removed") or {}
    for backend_id, where in removed.items():
        backend = runtime.backends.get(backend_id)
        if backend_id not in runtime.removed:
            runtime.removed[backend_id] = {"pool": where["pool"], "address": where["address"]}
        if (
            backend is not None
            and backend_id not in runtime.added
            and backend_id not in runtime.removing
            and (backend.pool, backend.address) == (where["pool"], where["address"])
        ):
            runtime._retire(backend)
    for backend_id in [b for b in runtime.removed if b not in removed]:
        del runtime.removed[backend_id]
    added = {spec["id"]: spec for spec in doc.get("added") or []}
    for backend_id in [b for b in runtime.added if b not in added]:
        del runtime.added[backend_id]
        backend = runtime.backends.get(backend_id)
        if backend is not None and backend_id not in runtime.removing:
            runtime._retire(backend)
    for backend_id, spec in added.items():
        if backend_id in runtime.added:
            continue
        old = runtime.backends.get(backend_id)
        if old is not None and backend_id in runtime.removing:
            runtime._delete(old)  # removed here, added again elsewhere: the new one wins
        runtime._restore_added(spec)
    admin = doc.get("admin") or {}
    for backend in runtime.backends.values():
        if backend.id in runtime.removing:
            continue
        want = Admin(admin.get(backend.id, Admin.ENABLED.value))
        if backend.admin is want:
            continue
        runtime._set_admin_flags(backend, want)
        if want is Admin.DRAINING:
            runtime.drain_started[backend.id] = runtime.clock()
        else:
            runtime.drain_started.pop(backend.id, None)
    weights = doc.get("weights") or {}
    if set(weights) == set(runtime.pool_weights) and sum(weights.values()) == 100:
        runtime.pool_weights = {name: int(weights[name]) for name in runtime.pool_weights}
    elif weights:
        log.warning(
            "shared state: weights %s do not fit this instance's pools %s (is its config "
            "the same as the others'?); keeping %s",
            weights,
            sorted(runtime.pool_weights),
            runtime.pool_weights,
        )
    rollouts = doc.get("rollouts")
    runtime.rollout_state = rollouts if isinstance(rollouts, dict) else None
    for key in SHARED_SECTIONS:
        section = runtime._sections.get(key)
        if section is not None and key in doc and doc[key] != section[0]():
            section[1](doc[key])
    runtime.publish()


#: Rollout fields rebuilt from the clock, kept when the leader's mirror is the
#: same rollout at the same step (a remote pause must not restart the step's timer)
_TIMERS = (
    "step_started",
    "next_judgement",
    "window_started",
    "window",
    "start_totals",
    "first_bad",
    "last_result",
    "inconclusive_streak",
)


def mirror_rollouts(controller: RolloutController, state: Mapping[str, Any] | None) -> None:
    """Make the rollout controller show the shared rollout state (history, the
    current rollout and its step) without recording or applying anything: the
    weights came with the state already."""
    from zdproxy.control.rollout import Phase

    state = state or {}
    old = controller.current
    controller.take_history(state)
    saved = state.get("current")
    if not isinstance(saved, dict):
        if old is not None and old.active:
            # it ended elsewhere: show how
            entry = next((h for h in controller.history if h.get("id") == old.id), None)
            phase = entry.get("phase") if entry is not None else None
            if isinstance(phase, str) and phase in Phase._value2member_map_:
                old.phase = Phase(phase)
                old.reason = entry.get("reason") if entry is not None else old.reason
                old.waiting = None
            else:
                controller.current = None
        return
    try:
        rollout = controller._revive(saved)
    except (ControlError, KeyError, TypeError, ValueError) as exc:
        log.error("shared rollout %s cannot be followed: %s", saved.get("id"), exc)
        return
    same = (
        old is not None
        and old.id == rollout.id
        and old.step == rollout.step
        and old.applied == rollout.applied
    )
    if same:
        assert old is not None
        for name in _TIMERS:
            setattr(rollout, name, getattr(old, name))
    else:
        now = controller.clock()
        if rollout.applied:
            controller._begin_step(rollout, now)
        rollout.start_totals = controller._totals()
    controller.current = rollout


# ---- one service's shared state ---------------------------------------------------------


class ServiceState:
    """One service's runtime kept equal to its etcd document."""

    def __init__(
        self,
        cluster: Cluster,
        name: str,
        runtime: Runtime,
        rollouts: RolloutController | None,
    ) -> None:
        self.cluster = cluster
        self.name = name
        self.runtime = runtime
        self.rollouts = rollouts
        base = f"{cluster.prefix}services/{name}/"
        self.state_key = base + "state"
        self.events_prefix = base + "events/"
        #: mod revision of the state key this runtime is at (0: none read yet)
        self.revision = 0
        #: the last state document read or written
        self.doc: dict[str, Any] | None = None
        self.next_event = 1
        #: events recorded here since the last commit
        self.pending: list[Event] = []
        #: audit events read from etcd, by id (the newest ``events_ring``)
        self.cache: dict[int, dict[str, Any]] = {}
        self.lock = asyncio.Lock()
        #: set while a remote state is applied or a command runs: no push
        self.applying = False
        self.in_mutation = False
        self.dirty = False
        self._push: asyncio.Task[None] | None = None
        self.commits = 0
        self.conflicts = 0
        #: event keys below this id have been deleted from etcd (leader only)
        self.trimmed_below = 0
        runtime.subscribe_state(self._on_state)
        runtime.events.subscribe(self._on_event)

    # ---- local changes --------------------------------------------------------------

    def _on_event(self, event: Event) -> None:
        if self.applying:
            return
        self.pending.append(event)
        self._schedule()

    def _on_state(self, state: dict[str, Any]) -> None:
        if not self.applying:
            self._schedule()

    def _schedule(self) -> None:
        """A change made here outside a command (a drain that completes, a rollout
        step of the leader): write it in the background."""
        self.dirty = True
        if self.in_mutation or self.applying or not self.cluster.running:
            return
        if self._push is None or self._push.done():
            self._push = asyncio.get_running_loop().create_task(self.push())

    async def push(self) -> None:
        async with self.lock:
            if not self.dirty:
                return
            outcome = await self._commit_locked()
            if outcome is Outcome.CONFLICT:
                # someone else wrote first: theirs stands (a tick redoes ours if it
                # still applies)
                try:
                    await self._resync_locked()
                except EtcdError as exc:
                    self.cluster.mark_down(str(exc))

    async def mutate(
        self, change: Callable[[], _T], controllers: list[Any]
    ) -> _T:  # controllers: objects with checkpoint() and rollback(point)
        """Run an operator command and commit it; on a lost compare-and-swap,
        undo it, apply the winner's state and run it again."""
        if not self.cluster.available:
            raise EtcdDown(self.cluster.down_reason or "not connected yet")
        runtime = self.runtime
        for attempt in range(MAX_ATTEMPTS):
            async with self.lock:
                checkpoint = runtime.checkpoint()
                saved = [(c, c.checkpoint()) for c in controllers]
                self.in_mutation = True
                try:
                    result = change()
                except ControlError as exc:
                    # refused (404, 409) by this instance's view of the state: answer
                    # only if that view is the current one, else run it on fresh state
                    if exc.status not in _STATE_REFUSALS or await self._current_locked():
                        raise
                    for controller, point in saved:
                        controller.rollback(point)
                    runtime.rollback(checkpoint)
                    await self._fresh_locked()
                    continue
                finally:
                    self.in_mutation = False
                # verify=True: a command that changed nothing still checks that it was
                # judged on the current state
                outcome = await self._commit_locked(verify=True)
                decision = retry_decision(outcome, attempt)
                if decision == "done":
                    return result
                for controller, point in saved:
                    controller.rollback(point)
                self.applying = True
                try:
                    runtime.rollback(checkpoint)
                finally:
                    self.applying = False
                self.pending.clear()
                self._refresh_ring()
                if decision == "unavailable":
                    raise EtcdDown(self.cluster.down_reason or "a write failed")
                self.conflicts += 1
                await self._fresh_locked()
                if decision == "give_up":
                    break
            # another instance is writing too: let it finish before trying again
            await asyncio.sleep(random.uniform(0, 0.005 * (attempt + 1)))
        raise Conflict(
            f"the shared state kept changing under this change ({MAX_ATTEMPTS} attempts): retry it"
        )

    async def _fresh_locked(self) -> None:
        """Apply the current state before a command runs again (raises ``EtcdDown``)."""
        try:
            await self._resync_locked()
        except EtcdError as exc:
            self.cluster.mark_down(str(exc))
            raise EtcdDown(str(exc)) from None

    async def _current_locked(self) -> bool:
        """Whether the state key is still at ``revision`` (raises ``EtcdDown``)."""
        try:
            kv = await self.cluster.client.get(self.state_key)
        except EtcdError as exc:
            self.cluster.mark_down(str(exc))
            raise EtcdDown(str(exc)) from None
        return (kv.mod_revision if kv is not None else 0) == self.revision

    async def _commit_locked(self, verify: bool = False) -> Outcome:
        """Write the runtime's shared state and the pending events in one
        transaction, if the state key is still at ``revision``. With nothing to
        write: COMMITTED, or with ``verify`` CONFLICT when the key moved on."""
        doc = shared_doc(self.runtime.export_state())
        known = None if self.doc is None else shared_doc(self.doc)
        events = list(self.pending)
        if doc == known and not events:
            if verify:
                try:
                    if not await self._current_locked():
                        return Outcome.CONFLICT
                except EtcdDown:
                    return Outcome.UNAVAILABLE
            self.dirty = False
            return Outcome.COMMITTED
        first = self.next_event
        records = []
        for offset, event in enumerate(events):
            record = event.to_json()
            record["id"] = first + offset
            record["instance"] = self.cluster.instance
            records.append(record)
        new_doc = {**doc, "next_event": first + len(records)}
        ops = [put_op(self.state_key, json.dumps(new_doc, separators=(",", ":")))]
        ops.extend(
            put_op(f"{self.events_prefix}{r['id']:012d}", json.dumps(r, separators=(",", ":")))
            for r in records
        )
        try:
            result = await self.cluster.client.txn(
                [mod_equals(self.state_key, self.revision)], ops, [range_op(self.state_key)]
            )
        except EtcdUnavailable as exc:
            self.cluster.mark_down(str(exc))
            return Outcome.UNAVAILABLE
        except EtcdError as exc:
            log.error("etcd refused a write: %s", exc)
            self.cluster.mark_down(str(exc))
            return Outcome.UNAVAILABLE
        if not result.succeeded:
            return Outcome.CONFLICT
        self.revision = result.revision
        self.doc = new_doc
        self.next_event = first + len(records)
        self.pending.clear()
        self.dirty = False
        self.commits += 1
        self._remember(records)
        return Outcome.COMMITTED

    # ---- remote changes ----------------------------------------------------------------

    async def resync(self) -> None:
        async with self.lock:
            await self._resync_locked()

    async def _resync_locked(self) -> None:
        """Read the state key and every event, and apply them (after a lost CAS, at
        start and after a reconnection). The first instance writes its state."""
        _, kvs = await self.cluster.client.get_prefix(self.state_key.rpartition("/")[0] + "/")
        state_kv = next((kv for kv in kvs if kv.key == self.state_key), None)
        self.add_events(kv for kv in kvs if kv.key.startswith(self.events_prefix))
        if state_kv is None:
            # the first instance (or the prefix was wiped): this state is the truth
            self.revision = 0
            self.doc = None
            self.dirty = True
            if await self._commit_locked() is Outcome.CONFLICT:
                await self._resync_locked()
            return
        if state_kv.mod_revision == self.revision:
            # changed here while etcd was away, and nowhere else: write it now
            if self.dirty and await self._commit_locked() is Outcome.CONFLICT:
                await self._resync_locked()
            return
        self._apply(state_kv)

    async def apply_remote(self, kv: KeyValue) -> None:
        async with self.lock:
            if kv.mod_revision > self.revision:
                self._apply(kv)

    def _apply(self, kv: KeyValue) -> None:
        try:
            doc = json.loads(kv.value)
        except (ValueError, RecursionError):
            log.error("etcd key %s is not JSON: ignored", kv.key)
            return
        if not isinstance(doc, dict):
            log.error("etcd key %s is not a JSON object: ignored", kv.key)
            return
        runtime = self.runtime
        self.applying = True
        try:
            changed_rollout = doc.get("rollouts") != runtime.rollout_state
            converge(runtime, doc)
            if changed_rollout and self.rollouts is not None:
                mirror_rollouts(self.rollouts, runtime.rollout_state)
        except Exception:
            log.exception("applying the shared state of %s failed", self.name)
        finally:
            self.applying = False
        self.revision = kv.mod_revision
        self.doc = doc
        self.next_event = max(self.next_event, int(doc.get("next_event") or 1))
        self.pending.clear()
        self.dirty = False
        self._refresh_ring()

    def add_events(self, kvs: Iterable[KeyValue]) -> None:
        records = []
        for kv in kvs:
            try:
                records.append(json.loads(kv.value))
            except (ValueError, RecursionError):
                log.error("etcd key %s is not JSON: ignored", kv.key)
        self._remember(records)

    def _remember(self, records: Iterable[Any]) -> None:
        for record in records:
            if isinstance(record, dict) and type(record.get("id")) is int:
                self.cache[record["id"]] = record
        capacity = self.runtime.config.admin.events_ring
        if len(self.cache) > capacity:
            for event_id in sorted(self.cache)[: len(self.cache) - capacity]:
                del self.cache[event_id]
        self._refresh_ring()

    def _refresh_ring(self) -> None:
        """The audit ring shows etcd's events, then the ones not committed yet."""
        local = [e.to_json() for e in self.pending]
        self.runtime.events.replace([self.cache[i] for i in sorted(self.cache)] + local)

    def current(self) -> dict[str, Any]:
        """The shared state as this instance has it now, in short (for a 409/404)."""
        runtime = self.runtime
        return {
            "revision": self.revision,
            "weights": dict(runtime.pool_weights),
            "backends": {b.id: b.admin.value for b in runtime.backends.values()},
            "rollout": (runtime.rollout_state or {}).get("current"),
        }

    def view(self) -> dict[str, Any]:
        return {
            "key": self.state_key,
            "revision": self.revision,
            "commits": self.commits,
            "conflicts": self.conflicts,
        }


# ---- the process's connection to etcd ------------------------------------------------------


def build_client(config: EtcdConfig) -> EtcdClient:
    context: ssl.SSLContext | None = None
    if config.tls is not None or any(e.startswith("https://") for e in config.endpoints):
        context = ssl.create_default_context(
            cafile=config.tls.ca if config.tls is not None else None
        )
        if config.tls is not None and config.tls.cert is not None:
            context.load_cert_chain(config.tls.cert, config.tls.key)
    username = password = None
    if config.auth is not None:
        username = config.auth.username
        if config.auth.password_file is not None:
            try:
                with open(config.auth.password_file, encoding="utf-8") as f:
                    password = f.read().strip()
            except OSError as exc:
                raise EtcdSettingsError(
                    f"state.etcd.auth.password_file: cannot read {config.auth.password_file} "
                    f"({exc.strerror or exc})"
                ) from None
        elif config.auth.password_env is not None:
            password = os.environ.get(config.auth.password_env, "")
            if not password:
                raise EtcdSettingsError(
                    f"state.etcd.auth: the environment variable {config.auth.password_env} "
                    "(password_env) is not set"
                )
    return EtcdClient(
        config.endpoints,
        ssl_context=context,
        username=username,
        password=password,
        timeout=config.timeout,
    )


class Cluster:
    """This instance's part in the deployment: the watch, the lease, rollout
    leadership and the published counters."""

    def __init__(self, config: EtcdConfig, client: EtcdClient | None = None) -> None:
        self.config = config
        self.prefix = config.prefix
        self.client = client or build_client(config)
        self.instance = instance_name()
        self.services: dict[str, ServiceState] = {}
        self.available = False
        self.down_reason: str | None = None
        self.down_since: float | None = None
        self.running = False
        self.leader = False
        self.lease = 0
        #: the latest counters of every instance seen: instance -> service -> totals.
        #: An instance that left keeps its last figures (the sum never goes back)
        self.peers: dict[str, dict[str, dict[str, Totals]]] = {}
        self.leader_changes = 0
        self._tasks: list[asyncio.Task[None]] = []
        self._last_ok = time.monotonic()
        #: the counters last written, and under which lease
        self._published: tuple[str, int] | None = None

    def add_service(
        self, name: str, runtime: Runtime, rollouts: RolloutController | None
    ) -> ServiceState:
        state = ServiceState(self, name, runtime, rollouts)
        self.services[name] = state
        if rollouts is not None:
            rollouts.passive = self.not_leading
            rollouts.totals_source = lambda: self.merged_totals(name, runtime)
        return state

    def not_leading(self) -> bool:
        return not (self.leader and self.available)

    def mark_down(self, reason: str) -> None:
        if self.available:
            log.error("etcd unreachable: %s; serving with the last known state", reason)
            self.down_since = time.monotonic()
        self.available = False
        self.down_reason = reason

    def mark_up(self) -> None:
        if not self.available:
            log.info("etcd reachable again (%s)", ", ".join(self.client.endpoints))
        self.available = True
        self.down_reason = None
        self.down_since = None

    # ---- lifecycle -------------------------------------------------------------------

    async def start(self) -> None:
        """Read the shared state before traffic is served (a few seconds at most:
        with etcd down, the instance starts from its config and catches up)."""
        self.running = True
        try:
            revision = await asyncio.wait_for(self._full_resync(), self.config.timeout * 2)
        except (EtcdError, TimeoutError) as exc:
            self.mark_down(str(exc) or "no answer")
            revision = 0
        loop = asyncio.get_running_loop()
        self._tasks = [
            loop.create_task(self._watch(revision)),
            loop.create_task(self._lead()),
        ]

    async def stop(self) -> None:
        self.running = False
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._tasks = []
        if self.lease and self.available:
            # let another instance lead at once instead of after the lease's TTL
            with contextlib.suppress(EtcdError):
                await asyncio.wait_for(self.client.revoke(self.lease), 1.0)
        self.lease = 0
        self.leader = False
        await self.client.close()

    async def pause(self) -> None:
        """A hot upgrade: the new process takes over the writes and the lead."""
        await self.stop()

    async def resume(self) -> None:
        await self.start()

    async def _full_resync(self) -> int:
        revision, _ = await self.client.get_prefix(self.prefix + "leader")
        for state in self.services.values():
            await state.resync()
        self.mark_up()
        return revision

    # ---- the watch ----------------------------------------------------------------------

    async def _watch(self, revision: int) -> None:
        attempt = 0
        need_resync = revision == 0
        while True:
            try:
                if need_resync:
                    revision = await self._full_resync()
                    need_resync = False
                async for batch in self.client.watch(self.prefix + "services/", revision + 1):
                    attempt = 0
                    self.mark_up()
                    revision = max(revision, await self._dispatch(batch))
            except EtcdCompacted as exc:
                log.warning("etcd watch: %s; re-reading the whole state", exc)
                need_resync = True
            except (EtcdError, TimeoutError) as exc:
                self.mark_down(str(exc))
                need_resync = True
                attempt += 1
                await sleep_backoff(attempt)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("etcd watch failed")
                need_resync = True
                await sleep_backoff(attempt)

    async def _dispatch(self, batch: list[WatchEvent]) -> int:
        revision = 0
        events: dict[str, list[KeyValue]] = {}
        states: dict[str, KeyValue] = {}
        base = self.prefix + "services/"
        for event in batch:
            kv = event.kv
            revision = max(revision, kv.mod_revision)
            if event.kind != "PUT" or not kv.key.startswith(base):
                continue
            name, _, rest = kv.key[len(base) :].partition("/")
            if name not in self.services:
                continue
            if rest == "state":
                states[name] = kv
            elif rest.startswith("events/"):
                events.setdefault(name, []).append(kv)
        for name, kvs in events.items():
            self.services[name].add_events(kvs)
        for name, kv in states.items():
            await self.services[name].apply_remote(kv)
        return revision

    # ---- lease, leadership, counters -------------------------------------------------

    async def _lead(self) -> None:
        interval = max(0.2, self.config.lease_ttl / 6)
        while True:
            try:
                await self._lead_once()
                self._last_ok = time.monotonic()
            except asyncio.CancelledError:
                raise
            except (EtcdError, TimeoutError) as exc:
                self.mark_down(str(exc))
                if self.leader and time.monotonic() - self._last_ok > self.config.lease_ttl:
                    self._set_leader(False, "its lease could not be renewed")
            except Exception:
                log.exception("etcd lease loop failed")
            await asyncio.sleep(interval)

    async def _lead_once(self) -> None:
        client = self.client
        if self.lease and await client.keepalive(self.lease) <= 0:
            log.warning("etcd lease %x expired: taking a new one", self.lease)
            self.lease = 0
            self._set_leader(False, "its lease expired")
        if not self.lease:
            self.lease = await client.grant(self.config.lease_ttl)
        key = self.prefix + "leader"
        if not self.leader:
            result = await client.txn(
                [create_equals(key, 0)],
                [put_op(key, self.instance, self.lease)],
                [range_op(key)],
            )
            if result.succeeded:
                self._set_leader(True, "the leader key was free")
            elif any(
                kv.value == self.instance.encode() and kv.lease == self.lease for kv in result.kvs
            ):
                # still ours (etcd was away longer than the TTL, and kept the lease)
                self._set_leader(True, "its leader key outlived an etcd outage")
        else:
            current = await client.get(key)
            if current is None or current.value.decode("utf-8", "replace") != self.instance:
                self._set_leader(False, "another instance holds the leader key")
        counters = json.dumps(self._local_counters(), separators=(",", ":"))
        if self._published != (counters, self.lease):
            # only when they changed: every put is a revision etcd keeps until compacted
            await client.put(f"{self.prefix}instances/{self.instance}", counters, self.lease)
            self._published = (counters, self.lease)
        if self.leader:
            await self._trim_events()
        for state in self.services.values():
            # a safety net under the watch (a stream that died without a word): the
            # state key read here is applied when it is ahead of this instance
            kv = await client.get(state.state_key)
            if kv is not None and kv.mod_revision > state.revision:
                await state.apply_remote(kv)
        _, kvs = await client.get_prefix(self.prefix + "instances/")
        for kv in kvs:
            other = kv.key.rpartition("/")[2]
            if other == self.instance:
                continue
            with contextlib.suppress(ValueError, TypeError, AttributeError):
                self.peers[other] = _parse_counters(json.loads(kv.value))
        self.mark_up()

    async def _trim_events(self) -> None:
        """The leader keeps the newest ``EVENTS_KEPT_RINGS`` rings of audit events
        in etcd per service and deletes older event keys."""
        for state in self.services.values():
            keep = EVENTS_KEPT_RINGS * state.runtime.config.admin.events_ring
            cut = state.next_event - keep
            if cut > state.trimmed_below:
                await self.client.delete_range(
                    f"{state.events_prefix}{0:012d}", f"{state.events_prefix}{cut:012d}"
                )
                state.trimmed_below = cut

    def _set_leader(self, leader: bool, why: str) -> None:
        if leader == self.leader:
            return
        self.leader = leader
        self.leader_changes += 1
        log.info(
            "instance %s %s the rollout leader: %s",
            self.instance,
            "is now" if leader else "is no longer",
            why,
        )
        if leader:
            for state in self.services.values():
                controller = state.rollouts
                if controller is None or controller.current is None:
                    continue
                rollout = controller.current
                if rollout.active and rollout.applied:
                    # analysis starts over on the merged counters as they are now
                    controller._new_window(rollout, controller.clock())

    def _local_counters(self) -> dict[str, Any]:
        return {
            "services": {
                name: {
                    pool: [list(c), list(f)]
                    for pool, (c, f) in (
                        (pool, stats.totals()) for pool, stats in state.runtime.pool_stats.items()
                    )
                }
                for name, state in self.services.items()
            }
        }

    def merged_totals(self, service: str, runtime: Runtime) -> dict[str, Totals]:
        """This instance's live counters plus every other instance's last published."""
        local = {pool: stats.totals() for pool, stats in runtime.pool_stats.items()}
        others = [peer.get(service, {}) for peer in self.peers.values()]
        merged = merge_totals([local, *others])
        # analysis reads the pools this instance knows
        return {pool: merged[pool] for pool in local}

    def figures(self) -> dict[str, Any]:
        """For the metrics: the link, the lead, commits and conflicts by service."""
        return {
            "connected": self.available,
            "leader": self.leader,
            "services": {
                name: {"commits": state.commits, "conflicts": state.conflicts}
                for name, state in self.services.items()
            },
        }

    def view(self) -> dict[str, Any]:
        return {
            "endpoints": list(self.client.endpoints),
            "prefix": self.prefix,
            "instance": self.instance,
            "connected": self.available,
            "error": self.down_reason,
            "leader": self.leader,
            "instances_seen": len(self.peers) + 1,
        }


def _parse_counters(data: Any) -> dict[str, dict[str, Totals]]:
    out: dict[str, dict[str, Totals]] = {}
    for service, pools in data["services"].items():
        out[service] = {
            pool: (tuple(int(n) for n in pair[0]), tuple(int(n) for n in pair[1]))
            for pool, pair in pools.items()
        }
    return out
