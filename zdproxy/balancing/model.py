"""Backends, pools and the immutable snapshot the data path reads.

A backend is three things kept apart (as pingora and Envoy do):

* ``BackendSpec``: what it *is*, an immutable value (id, pool, service, address,
  configured weight). A config reload that changes it swaps the value whole.
* ``Flag``: why it is out of rotation, one bit per cause (Envoy's host health
  flags): failed active check, still starting, ejected, drained by the operator,
  disabled, being removed. Several causes can hold at once (drained *and*
  ejected); clearing one leaves the others. The visible ``BackendState`` and
  whether it takes new requests are computed from the bits, nothing else.
* counters: what the data path counts on it (``in_flight``, ``codes``,
  ``upstream_errors``, ``failures``): plain ints written on the event loop, never
  part of a snapshot.

The ``Backend`` object is long-lived: its identity survives snapshot swaps so the
data path can keep per-backend connection pools and counters on it. Everything
that decides *where* traffic goes (weights, flags, membership, drain starts) is in
the ``Snapshot``, which the runtime rebuilds and swaps whole, and which is a value
(``to_dict``/``from_dict``) that can be sent to another process.

Times in a snapshot (``drain_started``) are ``time.monotonic()`` seconds: one
clock for every drain decision. CLOCK_MONOTONIC is system-wide on Linux, so the
workers of one host read the same clock. Wall-clock time is for display only.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from zdproxy.balancing.stats import PoolStats


class BackendState(enum.StrEnum):
    UP = "up"
    DOWN = "down"
    STARTING = "starting"
    DRAINING = "draining"
    DRAINED = "drained"
    DISABLED = "disabled"


#: States in which a backend takes new, unpinned requests.
ROUTABLE_STATES = frozenset({BackendState.UP})


class Admin(enum.StrEnum):
    """What the operator asked for."""

    ENABLED = "enabled"
    DISABLED = "disabled"
    DRAINING = "draining"
    DRAINED = "drained"


class Health(enum.StrEnum):
    """What the health checks found."""

    STARTING = "starting"
    UP = "up"
    DOWN = "down"


class Flag(enum.IntFlag):
    """Why a backend is out of rotation: one bit per cause. No bit set: it takes
    new requests."""

    #: active checks apply and have not passed ``rise`` times yet (health starting)
    PENDING_ACTIVE_CHECK = 0x01
    #: active checks failed ``fall`` times (health down)
    FAILED_ACTIVE_CHECK = 0x02
    #: outlier detection took it out for now
    EJECTED = 0x04
    #: the operator drains it: in-flight (and maybe pinned) requests finish
    ADMIN_DRAIN = 0x08
    #: the drain finished
    DRAINED = 0x10
    #: the operator disabled it
    DISABLED = 0x20
    #: being removed (API or config reload): drains, then is deleted
    REMOVING = 0x40


#: the operator's bits: at most one is set (``ADMIN_TRANSITIONS`` moves between them)
ADMIN_FLAGS = Flag.ADMIN_DRAIN | Flag.DRAINED | Flag.DISABLED
#: the active checks' bits: at most one is set
HEALTH_FLAGS = Flag.PENDING_ACTIVE_CHECK | Flag.FAILED_ACTIVE_CHECK
_ALL = (1 << len(Flag)) - 1

_ADMIN_BY_FLAG = {
    Flag(0): Admin.ENABLED,
    Flag.ADMIN_DRAIN: Admin.DRAINING,
    Flag.DRAINED: Admin.DRAINED,
    Flag.DISABLED: Admin.DISABLED,
}
_FLAG_BY_ADMIN = {admin: flag for flag, admin in _ADMIN_BY_FLAG.items()}
_HEALTH_BY_FLAG = {
    Flag(0): Health.UP,
    Flag.PENDING_ACTIVE_CHECK: Health.STARTING,
    Flag.FAILED_ACTIVE_CHECK: Health.DOWN,
}
_FLAG_BY_HEALTH = {health: flag for flag, health in _HEALTH_BY_FLAG.items()}


def admin_of(flags: int) -> Admin:
    """The operator's choice; the strongest bit wins if several are set."""
    if flags & Flag.DISABLED:
        return Admin.DISABLED
    if flags & Flag.DRAINED:
        return Admin.DRAINED
    if flags & Flag.ADMIN_DRAIN:
        return Admin.DRAINING
    return Admin.ENABLED


def health_of(flags: int) -> Health:
    if flags & Flag.FAILED_ACTIVE_CHECK:
        return Health.DOWN
    if flags & Flag.PENDING_ACTIVE_CHECK:
        return Health.STARTING
    return Health.UP


def admin_flags(admin: Admin) -> Flag:
    return _FLAG_BY_ADMIN[admin]


def health_flags(health: Health) -> Flag:
    return _FLAG_BY_HEALTH[health]


def _state_of(flags: int) -> BackendState:
    admin = admin_of(flags)
    if admin is not Admin.ENABLED:
        return BackendState(admin.value)
    return BackendState(health_of(flags).value)


#: the visible state of every combination of bits, computed once
_STATES: tuple[BackendState, ...] = tuple(_state_of(f) for f in range(_ALL + 1))


def state_of(flags: int) -> BackendState:
    """The one visible state: the operator's choice wins over health; ejection and
    removal do not change it (they show as ``ejected`` and ``removing``)."""
    return _STATES[flags & _ALL]


def eligible(flags: int) -> bool:
    """Whether a backend with these bits takes new, unpinned requests."""
    return not flags


def derive_state(admin: Admin, health: Health) -> BackendState:
    """The visible state of an (admin, health) pair (as before the bits)."""
    return state_of(admin_flags(admin) | health_flags(health))


@dataclass(frozen=True, slots=True)
class BackendSpec:
    """What a backend is: an immutable value, replaced whole when it changes."""

    id: str
    pool: str
    host: str
    port: int
    #: the configured weight (slow start and ejection give an effective one)
    weight: int = 1
    #: the service whose pool this is (pool names repeat across services)
    service: str = "default"

    @property
    def address(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "pool": self.pool,
            "host": self.host,
            "port": self.port,
            "weight": self.weight,
            "service": self.service,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> BackendSpec:
        return cls(
            str(data["id"]),
            str(data["pool"]),
            str(data["host"]),
            int(data["port"]),
            int(data["weight"]),
            str(data.get("service", "default")),
        )


class Backend:
    """One backend server: its ``spec``, its ``flags`` (owned by the runtime) and
    the data path's counters (plain ints, no locks: everything runs on one event
    loop). ``id``, ``pool``, ``address``... are read-only copies of the spec's
    fields, kept as plain attributes for the hot path; ``state`` and ``ejected``
    are derived from ``flags`` and kept in step by ``set_flags`` (plain attributes
    too: the data path reads them per request, an enum operation would cost more)."""

    __slots__ = (
        "_codes",
        "_run",
        "_run_code",
        "address",
        "ejected",
        "failures",
        "flags",
        "host",
        "id",
        "in_flight",
        "pool",
        "port",
        "service",
        "spec",
        "state",
        "upstream_errors",
        "weight",
    )

    def __init__(
        self,
        backend_id: str,
        pool: str,
        host: str,
        port: int,
        weight: int = 1,
        service: str = "default",
        flags: Flag = Flag.PENDING_ACTIVE_CHECK,
    ) -> None:
        self.set_spec(BackendSpec(backend_id, pool, host, port, weight, service))
        self.flags = flags
        self.state = state_of(flags)
        self.ejected = bool(flags & Flag.EJECTED)
        # ---- data-path counters ----
        self.in_flight = 0
        #: consecutive failures (5xx, connect, reset); reset by a success
        self.failures = 0
        #: responses by status code (``codes``), but the latest run of one code
        self._codes: dict[int, int] = {}
        #: that run: its code and its length (``count``)
        self._run_code = 0
        self._run = 0
        #: upstream failures by kind, for zdproxy_upstream_errors_total
        self.upstream_errors: dict[str, int] = {}

    @classmethod
    def from_spec(cls, spec: BackendSpec, flags: Flag = Flag.PENDING_ACTIVE_CHECK) -> Backend:
        return cls(spec.id, spec.pool, spec.host, spec.port, spec.weight, spec.service, flags)

    def set_spec(self, spec: BackendSpec) -> None:
        """A new spec (a reload changed the weight); identity and counters stay."""
        self.spec = spec
        self.id = spec.id
        self.pool = spec.pool
        self.service = spec.service
        self.host = spec.host
        self.port = spec.port
        self.address = spec.address
        self.weight = spec.weight

    def set_flags(self, flags: Flag) -> BackendState | None:
        """Replace the bits; the previous visible state when it changed, else None."""
        self.flags = flags
        self.ejected = bool(flags & Flag.EJECTED)
        state = _STATES[flags & _ALL]
        if state is self.state:
            return None
        before, self.state = self.state, state
        return before

    def count(self, status: int) -> None:
        """One response of ``status``, counted by the data path: a run of one code
        (most traffic) costs an integer increment, where a dict update costs about
        500 instructions compiled; the run goes into the dict when the code changes
        and whenever ``codes`` is read."""
        if status == self._run_code:
            self._run += 1
        else:
            self._fold()
            self._run_code = status
            self._run = 1

    def _fold(self) -> None:
        run = self._run
        if run:
            codes = self._codes
            code = self._run_code
            codes[code] = codes.get(code, 0) + run
            self._run = 0

    @property
    def codes(self) -> dict[int, int]:
        """Responses by status code, for zdproxy_requests_total (the run folded in)."""
        self._fold()
        return self._codes

    @codes.setter
    def codes(self, value: dict[int, int]) -> None:
        self._run = 0
        self._codes = value

    @property
    def admin(self) -> Admin:
        return admin_of(self.flags)

    @property
    def health(self) -> Health:
        return health_of(self.flags)

    @property
    def removing(self) -> bool:
        return bool(self.flags & Flag.REMOVING)

    @property
    def eligible(self) -> bool:
        return not self.flags

    def __repr__(self) -> str:
        return f"Backend({self.id!r}, {self.address}, {self.state.value})"


def flag_names(flags: int) -> list[str]:
    """The bits set, by name (for the API and logs: "why is it out")."""
    return [flag.name.lower() for flag in Flag if flags & flag and flag.name]


@dataclass(frozen=True, slots=True)
class PoolView:
    """A pool as one snapshot sees it."""

    name: str
    weight: int
    #: every member, in config order
    backends: tuple[Backend, ...]
    #: members that take new requests, with their effective weights
    routable: tuple[Backend, ...]
    routable_weights: tuple[int, ...]
    stats: PoolStats
    #: pool name as bytes, for the response header
    name_bytes: bytes = b""


@dataclass(frozen=True, slots=True)
class Snapshot:
    """Immutable routing state: swapped whole, never edited in place."""

    version: int
    pools: dict[str, PoolView]
    #: backends by id, across pools
    backends: dict[str, Backend] = field(default_factory=dict)
    #: pools whose affinity pins are void as soon as their weight is 0 (rollback)
    revoked: frozenset[str] = frozenset()
    #: since when (monotonic) each draining backend drains, by id
    drain_started: Mapping[str, float] = field(default_factory=dict)
    #: effective weights (slow start) where they differ from the configured one
    effective: Mapping[str, int] = field(default_factory=dict)
    #: each backend's flags when the snapshot was built (the objects' flags move on)
    flags: Mapping[str, Flag] = field(default_factory=dict)

    def pool_weights(self) -> dict[str, int]:
        return {name: pool.weight for name, pool in self.pools.items()}

    @classmethod
    def build(
        cls,
        version: int,
        weights: Mapping[str, int],
        backends: Iterable[Backend],
        stats: Mapping[str, PoolStats],
        *,
        effective: Mapping[str, int] | None = None,
        revoked: Iterable[str] = (),
        drain_started: Mapping[str, float] | None = None,
    ) -> Snapshot:
        """The one place that decides which members are routable: no bit set and an
        effective weight above 0."""
        effective = dict(effective or {})
        members: dict[str, list[Backend]] = {name: [] for name in weights}
        by_id: dict[str, Backend] = {}
        for backend in backends:
            by_id[backend.id] = backend
            if backend.pool in members:
                members[backend.pool].append(backend)
        pools: dict[str, PoolView] = {}
        for name, weight in weights.items():
            routable: list[Backend] = []
            routable_weights: list[int] = []
            for backend in members[name]:
                share = effective.get(backend.id, backend.weight)
                if not backend.flags and share > 0:
                    routable.append(backend)
                    routable_weights.append(share)
            pools[name] = PoolView(
                name=name,
                weight=weight,
                backends=tuple(members[name]),
                routable=tuple(routable),
                routable_weights=tuple(routable_weights),
                stats=stats[name] if name in stats else PoolStats(),
                name_bytes=name.encode("ascii"),
            )
        return cls(
            version=version,
            pools=pools,
            backends=by_id,
            revoked=frozenset(p for p in revoked if weights.get(p) == 0),
            drain_started=dict(drain_started or {}),
            effective=effective,
            flags={b.id: b.flags for b in by_id.values()},
        )

    # ---- as a value: to another process and back -----------------------------

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON: weights, every backend's spec and flags, effective weights,
        revoked pools and drain starts (monotonic seconds). No counters."""
        return {
            "version": self.version,
            "pools": {name: view.weight for name, view in self.pools.items()},
            "backends": [
                {**b.spec.to_dict(), "flags": int(self.flags.get(b.id, b.flags))}
                for b in self.backends.values()
            ],
            "effective": dict(self.effective),
            "revoked": sorted(self.revoked),
            "drain_started": dict(self.drain_started),
        }

    @classmethod
    def from_dict(
        cls,
        data: Mapping[str, Any],
        reuse: Mapping[str, Backend] | None = None,
        stats: Mapping[str, PoolStats] | None = None,
    ) -> Snapshot:
        """Rebuild a snapshot. Backends in ``reuse`` with the same id, pool and
        address keep their object (and so their counters and connection pools);
        their spec and flags are set from ``data``. ``stats``: each pool's
        statistics object to keep (fresh ones otherwise)."""
        reuse = reuse or {}
        backends: list[Backend] = []
        for item in data["backends"]:
            spec = BackendSpec.from_dict(item)
            flags = Flag(int(item["flags"]) & _ALL)
            backend = reuse.get(spec.id)
            if backend is None or (backend.pool, backend.host, backend.port) != (
                spec.pool,
                spec.host,
                spec.port,
            ):
                backend = Backend.from_spec(spec, flags)
            else:
                if backend.spec != spec:
                    backend.set_spec(spec)
                backend.set_flags(flags)
            backends.append(backend)
        weights = {str(name): int(weight) for name, weight in data["pools"].items()}
        return cls.build(
            int(data["version"]),
            weights,
            backends,
            stats or {},
            effective={str(k): int(v) for k, v in data.get("effective", {}).items()},
            revoked=[str(p) for p in data.get("revoked", ())],
            drain_started={str(k): float(v) for k, v in data.get("drain_started", {}).items()},
        )


def with_flag(flags: Flag, flag: Flag, on: bool) -> Flag:
    """``flags`` with ``flag`` set (on) or cleared."""
    return flags | flag if on else flags & ~flag
