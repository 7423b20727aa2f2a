"""The runtime: sole owner of mutable routing state.

Admin calls, health checks and (later) rollouts change state only through its
methods. Each change rebuilds an immutable ``Snapshot`` and hands it to the
subscribers (the selector of the data path), so a request sees either the old
or the new state, never half of a change.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from zdproxy.balancing.model import (
    ROUTABLE_STATES,
    Admin,
    Backend,
    BackendState,
    Health,
    PoolView,
    Snapshot,
    derive_state,
)
from zdproxy.balancing.stats import PoolStats
from zdproxy.config.schema import Config

log = logging.getLogger("zdproxy.control")

SnapshotListener = Callable[[Snapshot], None]


class Runtime:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.version = 0
        self.pool_weights: dict[str, int] = {}
        self.pool_stats: dict[str, PoolStats] = {}
        self.backends: dict[str, Backend] = {}
        #: effective weights (slow start, outlier ejection) by backend id; default: the
        #: configured weight
        self.effective_weight: dict[str, int] = {}
        self._listeners: list[SnapshotListener] = []
        self._snapshot: Snapshot | None = None
        self.load_config(config)

    # ---- building ----------------------------------------------------------

    def load_config(self, config: Config) -> None:
        """Take pools and backends from the config (at start)."""
        self.config = config
        initial = Health.STARTING if config.health_check.enabled else Health.UP
        for name, pool in config.pools.items():
            self.pool_weights[name] = pool.weight
            self.pool_stats.setdefault(name, PoolStats())
        for pool_name, backend_id, spec in config.backend_ids():
            backend = Backend(
                backend_id, pool_name, spec.address.host, spec.address.port, spec.weight
            )
            backend.health = initial
            backend.state = derive_state(backend.admin, backend.health)
            self.backends[backend_id] = backend
        self.publish()

    def subscribe(self, listener: SnapshotListener) -> None:
        self._listeners.append(listener)

    @property
    def snapshot(self) -> Snapshot:
        assert self._snapshot is not None
        return self._snapshot

    def build_snapshot(self) -> Snapshot:
        self.version += 1
        pools: dict[str, PoolView] = {}
        for name, weight in self.pool_weights.items():
            members = tuple(b for b in self.backends.values() if b.pool == name)
            routable: list[Backend] = []
            weights: list[int] = []
            for backend in members:
                effective = self.effective_weight.get(backend.id, backend.weight)
                if backend.state in ROUTABLE_STATES and not backend.ejected and effective > 0:
                    routable.append(backend)
                    weights.append(effective)
            pools[name] = PoolView(
                name=name,
                weight=weight,
                backends=members,
                routable=tuple(routable),
                routable_weights=tuple(weights),
                stats=self.pool_stats[name],
                name_bytes=name.encode("ascii"),
            )
        return Snapshot(version=self.version, pools=pools, backends=dict(self.backends))

    def publish(self) -> None:
        snapshot = self.build_snapshot()
        self._snapshot = snapshot
        for listener in self._listeners:
            listener(snapshot)

    # ---- mutations (the admin API and health checks call these) -----------

    def set_pool_weights(self, weights: dict[str, int]) -> None:
        self.pool_weights = {name: weights.get(name, 0) for name in self.pool_weights}
        self.publish()

    def _update(self, backend: Backend) -> bool:
        """Re-derive the visible state; True when it changed."""
        state = derive_state(backend.admin, backend.health)
        if state is backend.state:
            return False
        log.info("backend %s: %s -> %s", backend.id, backend.state.value, state.value)
        backend.state = state
        return True

    def set_admin(self, backend_id: str, admin: Admin) -> None:
        backend = self.backends[backend_id]
        backend.admin = admin
        if self._update(backend):
            self.publish()

    def set_health(self, backend_id: str, health: Health) -> None:
        """Called by active health checks after rise/fall thresholds are met."""
        backend = self.backends.get(backend_id)
        if backend is None or backend.health is health:
            return
        backend.health = health
        if self._update(backend):
            self.publish()

    def set_ejected(self, backend_id: str, ejected: bool) -> None:
        """Called by passive health (outlier detection)."""
        backend = self.backends.get(backend_id)
        if backend is None or backend.ejected is ejected:
            return
        backend.ejected = ejected
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
