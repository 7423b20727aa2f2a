"""Several applications behind one proxy: one control plane per service.

Each service has its own runtime (pools, weights, backends, drains, audit log),
selector, rolling updates, rollouts and health checks, built from
``Config.service_config(name)`` (its pools, its settings over the top-level
ones). The data path asks the route table (``zdproxy.http.routes``) which
service's selector takes a request. A config without ``services`` is one
service named ``default`` and runs exactly as before: no route table, the
server's runtime and selector are that service's.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

from zdproxy.balancing.failures import Failure
from zdproxy.balancing.model import Backend
from zdproxy.balancing.passive import PassiveObserver
from zdproxy.balancing.selector import Selector, WeightedSelector
from zdproxy.config.schema import DEFAULT_SERVICE, Config
from zdproxy.control.rolling import RollingUpdates
from zdproxy.control.rollout import RolloutController
from zdproxy.control.runtime import Runtime
from zdproxy.http.routes import RouteSpec, RouteTable

if TYPE_CHECKING:
    from zdproxy.control.sticky_key import StickyKey
    from zdproxy.health.checker import HealthService
    from zdproxy.proxy.context import ProxyContext
    from zdproxy.proxy.upstream import UpstreamPools


class DataPath(Protocol):
    """What a service reads of the data path: its context (None until the server
    started, replaced by a hot upgrade's hand-over) and its upstream pools. The
    server is one; a service is never given more of it."""

    @property
    def ctx(self) -> ProxyContext | None: ...

    @property
    def upstreams(self) -> UpstreamPools: ...


class Service:
    """One service's control plane; the ``HealthHost`` (runtime, config, ctx) that
    its health checks and tunnel drainer are given."""

    def __init__(self, data_path: DataPath, name: str, config: Config, named: bool) -> None:
        self.data_path = data_path
        self.name = name
        self.config = config
        self.runtime = Runtime(config, service=name)
        if named:
            # audit events and default ids say which service they belong to
            self.runtime.events.service = name
            self.runtime.id_prefix = "" if name == DEFAULT_SERVICE else f"{name}-"
        # one drain clock: the selector reads the runtime's
        self.selector = WeightedSelector(self.runtime.snapshot, monotonic=self.runtime.clock)
        self.runtime.subscribe(self.selector.update)
        self.rolling = RollingUpdates(self.runtime)
        self.rollouts = RolloutController(self.runtime)
        #: set by the composition root (``server.wire``)
        self.health: HealthService | None = None
        self.sticky_key: StickyKey | None = None

    @property
    def ctx(self) -> ProxyContext | None:
        return self.data_path.ctx

    @property
    def upstreams(self) -> UpstreamPools:
        return self.data_path.upstreams


def build_services(data_path: DataPath, config: Config) -> dict[str, Service]:
    named = bool(config.services)
    return {
        name: Service(data_path, name, config.service_config(name), named)
        for name in config.service_names()
    }


def service_state_path(path: str, name: str) -> str:
    """Where a service's saved state goes: ``state.path`` for ``default`` (so a
    config that gains services keeps its state), ``<stem>.<service><ext>`` else."""
    if name == DEFAULT_SERVICE:
        return path
    stem, dot, ext = path.rpartition(".")
    if not dot or "/" in ext:
        return f"{path}.{name}"
    return f"{stem}.{name}.{ext}"


def primary_name(config: Config) -> str:
    """The service the server's own ``runtime`` is: ``default``, else the first."""
    names = config.service_names()
    return DEFAULT_SERVICE if DEFAULT_SERVICE in names else names[0]


def route_table(config: Config, services: dict[str, Service]) -> RouteTable[Selector] | None:
    """The data path's route table; None without services and routes (no cost)."""
    if not config.services and not config.routes:
        return None
    specs: list[RouteSpec[Selector]] = [
        RouteSpec(
            index=index,
            service=route.service,
            target=services[route.service].selector,
            host=route.match.host,
            path_exact=route.match.path_exact,
            path_prefix=route.match.path_prefix,
            path_regex=route.match.path_regex,
            methods=None if route.match.methods is None else frozenset(route.match.methods),
            headers=tuple(route.match.headers.items()),
            strip_prefix=route.strip_prefix,
        )
        for index, route in enumerate(config.routes)
    ]
    default = config.default_service
    return RouteTable(specs, services[default].selector if default is not None else None)


class ServiceObservers:
    """Passive health of several services: a result goes to the detector of the
    service that owns the backend (failures are rare; a success is reported only
    after a failure streak, so this loop is off the common path)."""

    def __init__(self, observers: list[tuple[Runtime, PassiveObserver]]) -> None:
        self.observers = observers

    def _owner(self, backend: Backend) -> PassiveObserver | None:
        for runtime, observer in self.observers:
            if runtime.backends.get(backend.id) is backend:
                return observer
        return None

    def failure(self, backend: Backend, kind: Failure, now: float) -> None:
        observer = self._owner(backend)
        if observer is None:
            backend.failures += 1
        else:
            observer.failure(backend, kind, now)

    def success(self, backend: Backend, now: float) -> None:
        observer = self._owner(backend)
        if observer is None:
            backend.failures = 0
        else:
            observer.success(backend, now)
