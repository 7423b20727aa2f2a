"""Backends, pools and the immutable snapshot the data path reads.

A ``Backend`` is long-lived: its identity survives snapshot swaps so the data
path can keep per-backend connection pools and counters on it. Everything that
decides *where* traffic goes (weights, states, membership) lives in the
``Snapshot``, which the runtime rebuilds and swaps whole.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

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


def derive_state(admin: Admin, health: Health) -> BackendState:
    """The one visible state: the operator's choice wins over health."""
    if admin is Admin.ENABLED:
        return BackendState(health.value)
    return BackendState(admin.value)


class Backend:
    """One backend server. The runtime owns ``state`` and ``weight``; the data
    path owns ``in_flight`` and the response counters (plain ints, no locks:
    everything runs on one event loop)."""

    __slots__ = (
        "address",
        "admin",
        "codes",
        "ejected",
        "failures",
        "health",
        "host",
        "id",
        "in_flight",
        "pool",
        "port",
        "service",
        "state",
        "upstream_errors",
        "weight",
    )

    def __init__(self, backend_id: str, pool: str, host: str, port: int, weight: int = 1):
        self.id = backend_id
        self.pool = pool
        #: the service whose pool this is (pool names repeat across services)
        self.service = "default"
        self.host = host
        self.port = port
        self.address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        self.weight = weight
        self.admin = Admin.ENABLED
        self.health = Health.STARTING
        #: outlier detection took it out of rotation for now
        self.ejected = False
        #: consecutive failures (5xx, connect, reset); reset by a success
        self.failures = 0
        #: derived from admin and health by the runtime; what the API shows
        self.state = BackendState.STARTING
        self.in_flight = 0
        #: responses by status code, for zdproxy_requests_total
        self.codes: dict[int, int] = {}
        #: upstream failures by kind, for zdproxy_upstream_errors_total
        self.upstream_errors: dict[str, int] = {}

    def __repr__(self) -> str:
        return f"Backend({self.id!r}, {self.address}, {self.state.value})"


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

    def pool_weights(self) -> dict[str, int]:
        return {name: pool.weight for name, pool in self.pools.items()}
