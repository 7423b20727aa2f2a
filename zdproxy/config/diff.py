"""What changed between two configs: the plan of a reload in place (pure, no I/O).

``diff(old, new)`` compares the previously loaded file with the new one. Backends
are matched by id (explicit or the default ``<pool>-<n>``): a backend whose pool
or address changed is removed and added again; a weight change is made in place.
Sections that only a restart can change (listeners, the admin listener and its
tokens, the state store, the log format and access log) are listed in
``restart_needed`` and left as they are; everything else is applied.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from zdproxy.config.schema import BackendConfig, Config

#: top-level sections applied in place (besides pools, handled backend by backend)
IN_PLACE_SECTIONS = (
    "health_check",
    "outlier_detection",
    "slow_start",
    "sticky",
    "routing",
    "draining",
    "retries",
    "timeouts",
    "limits",
    "http",
    "shadow",
    "shutdown_timeout",
    "services",
    "routes",
    "default_service",
)


@dataclass(frozen=True, slots=True)
class BackendSpec:
    """A backend as the config defines it."""

    id: str
    pool: str
    address: str
    weight: int


@dataclass(frozen=True)
class ConfigDiff:
    pools_added: tuple[str, ...] = ()
    pools_removed: tuple[str, ...] = ()
    #: the file's pool weights (or pool set) changed: they replace the running weights
    weights_changed: bool = False
    weights: dict[str, int] = field(default_factory=dict)
    backends_added: tuple[BackendSpec, ...] = ()
    #: ids removed (drained first)
    backends_removed: tuple[str, ...] = ()
    #: pool or address changed: removed and added again under the same id
    backends_replaced: tuple[BackendSpec, ...] = ()
    #: id -> new weight
    backends_reweighted: dict[str, int] = field(default_factory=dict)
    #: pools whose health-check override changed (their probes restart)
    pool_health_changed: tuple[str, ...] = ()
    #: backends whose own health-check override changed
    backend_health_changed: tuple[str, ...] = ()
    #: in-place sections that changed, in ``IN_PLACE_SECTIONS`` order
    sections: tuple[str, ...] = ()
    log_level: str | None = None
    #: changes kept out of this reload: one message each
    restart_needed: tuple[str, ...] = ()

    @property
    def empty(self) -> bool:
        return not (
            self.pools_added
            or self.pools_removed
            or self.weights_changed
            or self.backends_added
            or self.backends_removed
            or self.backends_replaced
            or self.backends_reweighted
            or self.pool_health_changed
            or self.backend_health_changed
            or self.sections
            or self.log_level
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "pools_added": list(self.pools_added),
            "pools_removed": list(self.pools_removed),
            "weights": dict(self.weights) if self.weights_changed else None,
            "backends_added": [b.id for b in self.backends_added],
            "backends_removed": list(self.backends_removed),
            "backends_replaced": [b.id for b in self.backends_replaced],
            "backends_reweighted": dict(self.backends_reweighted),
            "pool_health_changed": list(self.pool_health_changed),
            "backend_health_changed": list(self.backend_health_changed),
            "sections": list(self.sections),
            "log_level": self.log_level,
            "restart_needed": list(self.restart_needed),
        }

    def lines(self) -> list[str]:
        """One readable line per change (``zdproxy ctl reload`` prints them)."""
        out: list[str] = []
        for name in self.pools_added:
            out.append(f"pool {name} added")
        for name in self.pools_removed:
            out.append(f"pool {name} removed")
        if self.weights_changed:
            split = " ".join(f"{n}={w}" for n, w in self.weights.items())
            out.append(f"pool weights from the file: {split}")
        for spec in self.backends_added:
            out.append(f"backend {spec.id} added to pool {spec.pool} at {spec.address}")
        for backend_id in self.backends_removed:
            out.append(f"backend {backend_id} removed (after draining)")
        for spec in self.backends_replaced:
            out.append(f"backend {spec.id} replaced: now pool {spec.pool} at {spec.address}")
        for backend_id, weight in self.backends_reweighted.items():
            out.append(f"backend {backend_id} weight {weight}")
        for name in self.pool_health_changed:
            out.append(f"pool {name}: health checks changed")
        for backend_id in self.backend_health_changed:
            out.append(f"backend {backend_id}: health checks changed")
        for section in self.sections:
            out.append(f"{section} changed")
        if self.log_level:
            out.append(f"log.level {self.log_level}")
        for message in self.restart_needed:
            out.append(f"not applied: {message}")
        return out


def backend_specs(config: Config) -> dict[str, BackendSpec]:
    return {
        backend_id: _spec(backend_id, pool, backend)
        for pool, backend_id, backend in config.backend_ids()
    }


def _spec(backend_id: str, pool: str, backend: BackendConfig) -> BackendSpec:
    return BackendSpec(backend_id, pool, str(backend.address), backend.weight)


def diff(old: Config, new: Config) -> ConfigDiff:
    old_specs, new_specs = backend_specs(old), backend_specs(new)
    old_hc = {b_id: b.health_check for _, b_id, b in old.backend_ids()}
    new_hc = {b_id: b.health_check for _, b_id, b in new.backend_ids()}
    added: list[BackendSpec] = []
    replaced: list[BackendSpec] = []
    reweighted: dict[str, int] = {}
    health: list[str] = []
    for backend_id, spec in new_specs.items():
        before = old_specs.get(backend_id)
        if before is None:
            added.append(spec)
        elif (before.pool, before.address) != (spec.pool, spec.address):
            replaced.append(spec)
        else:
            if before.weight != spec.weight:
                reweighted[backend_id] = spec.weight
            if old_hc[backend_id] != new_hc[backend_id]:
                # same backend (stats, connections), a fresh probe
                health.append(backend_id)
    removed = tuple(b for b in old_specs if b not in new_specs)
    old_weights = {name: pool.weight for name, pool in old.pools.items()}
    new_weights = {name: pool.weight for name, pool in new.pools.items()}
    pool_health = tuple(
        name
        for name, pool in new.pools.items()
        if name in old.pools and old.pools[name].health_check != pool.health_check
    )
    sections = tuple(s for s in IN_PLACE_SECTIONS if getattr(old, s) != getattr(new, s))
    return ConfigDiff(
        pools_added=tuple(n for n in new.pools if n not in old.pools),
        pools_removed=tuple(n for n in old.pools if n not in new.pools),
        weights_changed=old_weights != new_weights,
        weights=new_weights,
        backends_added=tuple(added),
        backends_removed=removed,
        backends_replaced=tuple(replaced),
        backends_reweighted=reweighted,
        pool_health_changed=pool_health,
        backend_health_changed=tuple(health),
        sections=sections,
        log_level=new.log.level if new.log.level != old.log.level else None,
        restart_needed=tuple(restart_needed(old, new)),
    )


def _listener_kinds(config: Config) -> list[tuple[str, int, bool, bool | int]]:
    """The listeners as a restart changes them: a TLS listener's certificates and
    versions are applied by a reload."""
    return [(a.host, a.port, a.tls is not None, a.redirect_https) for a in config.listen]


def restart_needed(old: Config, new: Config) -> list[str]:
    """Changes a reload does not apply, each with why."""
    out: list[str] = []
    if _listener_kinds(old) != _listener_kinds(new):
        before = ", ".join(str(a) for a in old.listen)
        after = ", ".join(str(a) for a in new.listen)
        out.append(f"listen changes need a restart (serving {before}; the file says {after})")
    if old.admin != new.admin:
        out.append("admin section changes (listener, tokens, limits) need a restart")
    if old.state != new.state:
        out.append("state changes (state.path, state.etcd) need a restart")
    if (old.log.format, old.log.access_log, old.log.access_log_path) != (
        new.log.format,
        new.log.access_log,
        new.log.access_log_path,
    ):
        out.append("log.format and access log changes need a restart")
    if old.workers != new.workers:
        out.append("workers changes need a restart or a hot upgrade (SIGUSR2)")
    return out
