"""Composition root: build every part from the config, serve, stop in order.

Shutdown order (as uvicorn does it): stop accepting, ask every connection to
finish (idle ones close now, busy ones after their response, with
``Connection: close``), wait up to ``shutdown_timeout``, then abort the rest.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import time
from collections.abc import Awaitable, Callable, Mapping
from functools import partial
from typing import TYPE_CHECKING

from zdproxy import heap
from zdproxy.admin.app import build_control_plane
from zdproxy.balancing.model import Backend, BackendState, Snapshot
from zdproxy.balancing.passive import PassiveObserver
from zdproxy.balancing.retry import RetryBudget
from zdproxy.balancing.selector import WeightedSelector
from zdproxy.config.schema import Address, AdminConfig, Config
from zdproxy.control.rolling import RollingUpdates
from zdproxy.control.rollout import RolloutController, RolloutDriver
from zdproxy.control.runtime import Runtime
from zdproxy.control.shadow import ShadowControl
from zdproxy.control.sticky_key import StickyKey
from zdproxy.control.ticker import RuntimeTicker
from zdproxy.errors import ListenError
from zdproxy.health.checker import HealthService, build_health
from zdproxy.metrics import DataPathCounts
from zdproxy.proxy.accesslog import AccessLog
from zdproxy.proxy.context import ProxyContext
from zdproxy.proxy.fdlimit import fd_budget
from zdproxy.proxy.shadow import ShadowSender
from zdproxy.proxy.upstream import UpstreamPools
from zdproxy.reload import Reloader, ReloadResult
from zdproxy.services import (
    Service,
    ServiceObservers,
    build_services,
    primary_name,
    route_table,
)
from zdproxy.tls import ListenerTlsSet, protocol_factory
from zdproxy.upgrade import Handover, Upgrader, notify_ready
from zdproxy.workers import WorkerSet

if TYPE_CHECKING:
    from zdproxy.control.store import Persistence

log = logging.getLogger("zdproxy.error")

#: start/stop hooks of the parts (health checks, admin API, ...), in order; the
#: composition root binds what each needs (a part is never handed the server)
Hook = Callable[[], Awaitable[None]]


#: listen backlog: where connections wait while limits.max_connections is reached
BACKLOG = 4096


def bind_socket(address: Address, backlog: int = BACKLOG) -> socket.socket:
    """A listening TCP socket; created here (not by asyncio) so that it can be
    handed to a new process on hot upgrade."""
    family = socket.AF_INET6 if ":" in address.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((address.host, address.port))
    sock.listen(backlog)
    sock.setblocking(False)
    return sock


def bind_listener(address: Address, backlog: int = BACKLOG) -> socket.socket:
    """``bind_socket``, with a failure turned into ``ListenError``: one line that
    names the address and the reason (``address already in use``), no traceback."""
    try:
        return bind_socket(address, backlog)
    except OSError as exc:
        reason = exc.strerror or str(exc)
        if isinstance(exc, socket.gaierror):
            reason = f"cannot resolve {address.host} ({reason})"
        raise ListenError(f"cannot listen on {address}: {reason[:1].lower()}{reason[1:]}") from None


class ProxyServer:
    def __init__(self, config: Config, config_path: str | None = None) -> None:
        self.config = config
        self.config_path = config_path
        #: one control plane per service (``default`` alone without ``services``)
        self.services = build_services(self, config)
        primary = self.services[primary_name(config)]
        #: the primary service's parts (``default``, else the first): without services,
        #: the only ones, as before
        self.runtime: Runtime = primary.runtime
        self.selector: WeightedSelector = primary.selector
        self.upstreams = UpstreamPools(config.limits.max_idle_upstream_per_backend)
        for service in self.services.values():
            service.runtime.subscribe(self._close_idle_to_unroutable)
            if len(self.services) > 1:
                service.runtime.id_in_use = self._id_owner_check(service)
        #: rolling updates of one pool; built before the state is restored (it keeps a
        #: section of it), ticked by a task of its own once serving
        self.rolling: RollingUpdates = primary.rolling
        #: shadow traffic settings (control side); the data path's sender subscribes
        self.shadow = ShadowControl(self.runtime, config.shadow)
        self.shadow_sender: ShadowSender | None = None
        #: progressive rollouts: plain logic here, ticked by a driver task once serving
        self.rollouts: RolloutController = primary.rollouts
        self.ctx: ProxyContext | None = None
        #: the primary service's health checks and outlier detection (set by ``wire``)
        self.health: HealthService | None = None
        #: SIGHUP and POST /api/v1/reload: the config file applied in place
        self.reloader = Reloader(self)
        #: the certificates of the TLS listeners (re-read on reload)
        self.tls = ListenerTlsSet(config.listen)
        self._reloads: set[asyncio.Task[ReloadResult]] = set()
        #: SIGUSR2: hot upgrade to a new process
        self.upgrader = Upgrader(self)
        #: set in a process started by a hot upgrade: the sockets and state passed to it
        self.handover: Handover | None = None
        #: the admin listener and the state persistence (set by ``wire``): a hot
        #: upgrade passes the one on and pauses the other
        self.admin_socket: socket.socket | None = None
        self.persistences: list[Persistence] = []
        #: a hot upgrade: control tasks that change the state (rollouts, rolling
        #: updates) pause while it is handed over, resume if the upgrade fails;
        #: once it succeeded, the retire hooks run before draining (the admin
        #: listener stops accepting)
        self.pause_hooks: list[Hook] = []
        self.resume_hooks: list[Hook] = []
        self.retire_hooks: list[Hook] = []
        self.servers: list[asyncio.Server] = []
        self.sockets: list[socket.socket] = []
        #: ``workers`` > 1: worker processes serve the data path, this one controls
        count = config.worker_count()
        self.workers: WorkerSet | None = (
            WorkerSet(self, count) if count > 1 and config_path is not None else None
        )
        self.start_hooks: list[Hook] = []
        self.stop_hooks: list[Hook] = []
        self._stopped = asyncio.Event()
        #: set once serving: a reload asked for earlier (SIGHUP) waits for it
        self.started = asyncio.Event()
        self._sweeper: asyncio.Task[None] | None = None
        self._stopping = False
        self._limit_logged_at: float | None = None

    def _close_idle_to_unroutable(self, snapshot: Snapshot) -> None:
        """Pooled connections to a backend that left rotation (drained, disabled,
        down, removed) are closed; busy ones close after their response."""
        several = len(self.services) > 1
        for backend_id in self.upstreams.backend_ids():
            backend = snapshot.backends.get(backend_id)
            if backend is None and several:
                # another service's backend (ids are unique across services)
                backend = self._find_backend(backend_id)
            if backend is None or backend.state is not BackendState.UP:
                self.upstreams.close_backend(backend_id)

    def _find_backend(self, backend_id: str) -> Backend | None:
        for service in self.services.values():
            backend = service.runtime.backends.get(backend_id)
            if backend is not None:
                return backend
        return None

    def _id_owner_check(self, owner: Service) -> Callable[[str], bool]:
        """For ``owner``'s runtime: whether another service uses a backend id."""

        def in_use(backend_id: str) -> bool:
            return any(
                backend_id in service.runtime.backends or backend_id in service.runtime.removed
                for service in self.services.values()
                if service is not owner
            )

        return in_use

    @property
    def data_path_closed(self) -> bool:
        """Not serving (not started yet, or shutting down): ``/healthz`` says 503."""
        ctx = self.ctx
        return ctx is None or ctx.closing

    def data_path_counts(self) -> DataPathCounts:
        """The data path's connection and retry counters (all workers' with workers)."""
        if self.workers is not None:
            return self.workers.data_path_counts()
        ctx = self.ctx
        if ctx is None:
            return DataPathCounts()
        counters = ctx.counters
        return DataPathCounts(
            client_connections=len(ctx.connections),
            upstream_connections=self.upstreams.open_count,
            tunnels=len(ctx.tunnels),
            connections_accepted=counters.connections_accepted,
            retries=counters.retries,
            tunnels_total=counters.tunnels_total,
        )

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        return asyncio.get_running_loop()

    @property
    def stopping(self) -> bool:
        return self._stopping

    def bind(self, sockets: Mapping[str, socket.socket] | None = None) -> None:
        """Bind the data listeners (once): before anything else starts, so that a
        port in use ends the start with one line and nothing changed on disk.
        ``sockets`` (address -> listening socket) are used instead of binding
        where the address matches: a hot upgrade passes them on."""
        if self.sockets:
            return
        for address in self.config.listen:
            passed = sockets.get(str(address)) if sockets is not None else None
            self.sockets.append(passed if passed is not None else bind_listener(address))

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self.ctx = ctx = ProxyContext(self.config, self.selector, self.upstreams, loop)
        ctx.routes = route_table(self.config, self.services)
        # one retry budget for the data path (replaced on reload)
        ctx.retry_policy = RetryBudget(self.config.retries.budget_percent)
        self.bind()
        self._apply_fd_budget(ctx)
        log_config = self.config.log
        if log_config.access_log != "off":
            ctx.access_log = AccessLog(log_config.access_log, log_config.access_log_path, loop)
        for address in self.config.listen:
            log.info("listening on %s", address)
        ctx.accept_control = self._accept_control
        self.shadow_sender = sender = ShadowSender(ctx)
        ctx.shadow = sender
        self.shadow.figures = sender.figures
        self.shadow.subscribe(sender.configure)
        self._sweeper = loop.create_task(self._sweep())
        # hooks first (health checks' first results, admin API, restored state):
        # connections made meanwhile wait in the listen backlog instead of
        # meeting backends that are not known to be up yet
        for hook in self.start_hooks:
            await hook()
        if self.workers is not None:
            await self.workers.start()
        else:
            await self._serve_sockets()
        self.started.set()

    def _apply_fd_budget(self, ctx: ProxyContext) -> None:
        """Keep client connections within the open-file limit, with descriptors
        left for upstream connections and the admin API."""
        configured = self.config.limits.max_connections
        budget = fd_budget(configured)
        warning = budget.warning(configured)
        if warning is not None:
            log.warning("%s", warning)
            ctx.fd_cap = budget.max_connections
            ctx.apply(self.config)

    async def _serve_sockets(self) -> None:
        """Accept on every listening socket. The server gets a duplicate of the
        socket: closing the server (to stop accepting) closes only the duplicate,
        so the socket keeps listening and new connections wait in its backlog
        instead of being refused or reset."""
        assert self.ctx is not None
        ctx = self.ctx
        loop = asyncio.get_running_loop()
        listen = self.config.listen
        for listener, sock in zip(listen, self.sockets, strict=True):
            context = self.tls.context_for(listener)
            server = await loop.create_server(
                protocol_factory(ctx, listener, listen),
                sock=sock.dup(),
                backlog=BACKLOG,
                ssl=context,
                # a handshake gets the time a request head gets
                ssl_handshake_timeout=self.config.timeouts.request_header if context else None,
            )
            self.servers.append(server)

    def _accept_control(self, accepting: bool) -> None:
        """limits.max_connections reached (False) or left (True)."""
        if self._stopping:
            return
        if not accepting:
            now = time.monotonic()
            if self._limit_logged_at is None or now - self._limit_logged_at >= 60:
                self._limit_logged_at = now
                assert self.ctx is not None
                log.warning(
                    "limits.max_connections (%d) reached: new connections wait in the backlog",
                    self.ctx.max_connections,
                )
            self._stop_accepting()
        elif not self.servers:
            asyncio.get_running_loop().create_task(self._resume_accepting())

    def _stop_accepting(self) -> None:
        for server in self.servers:
            server.close()
        self.servers = []

    async def _resume_accepting(self) -> None:
        ctx = self.ctx
        if self._stopping or self.servers or ctx is None or ctx.accept_paused:
            return
        await self._serve_sockets()
        if self._stopping or ctx.accept_paused:
            self._stop_accepting()

    def _tick(self) -> float:
        t = self.config.timeouts
        shortest = min(
            t.request_header, t.idle, t.upstream_response, t.request_body, t.connect, t.tunnel_idle
        )
        return min(0.5, max(0.05, shortest / 4))

    async def _sweep(self) -> None:
        """Coarse timers: one pass over connections per tick instead of a timer
        handle per request."""
        assert self.ctx is not None
        ctx = self.ctx
        loop = asyncio.get_running_loop()
        reported = ctx.requests
        while True:
            # read each pass: a reload may change the timeouts
            await asyncio.sleep(self._tick())
            upstream_idle = self.config.timeouts.upstream_idle
            now = ctx.now = loop.time()
            for conn in list(ctx.connections):
                conn.check_deadline(now)
            self.upstreams.sweep(now, upstream_idle)
            if ctx.requests != reported:
                ctx.retry_policy.record_requests(now, ctx.requests - reported)
                reported = ctx.requests

    def request_stop(self, idle_grace: float = 0.0) -> None:
        if not self._stopping:
            self._stopping = True
            asyncio.get_running_loop().create_task(self.shutdown(idle_grace))

    async def shutdown(self, idle_grace: float = 0.0) -> None:
        """``idle_grace``: how long a connection waiting for its next request is
        kept (a hot upgrade: see ``ClientConnection.shutdown``)."""
        ctx = self.ctx
        log.info("shutting down: no new connections, finishing in-flight requests")
        self._stopping = True
        self._stop_accepting()
        if self.workers is not None:
            # each worker drains as one process does (after a hot upgrade, keep-alive
            # clients get their next answer, with Connection: close)
            await self.workers.stop(idle_grace)
        for sock in self.sockets:
            sock.close()
        if ctx is not None:
            ctx.closing = True
            for conn in list(ctx.connections):
                conn.shutdown(idle_grace)
            loop = asyncio.get_running_loop()
            deadline = loop.time() + self.config.shutdown_timeout
            while (ctx.connections or ctx.tunnels) and loop.time() < deadline:
                await asyncio.sleep(0.05)
            for conn in list(ctx.connections):
                if conn.transport is not None:
                    conn.transport.abort()
            for tunnel in list(ctx.tunnels):
                tunnel.close()
        for hook in reversed(self.stop_hooks):
            try:
                await hook()
            except Exception:
                log.exception("error while stopping")
        if self._sweeper is not None:
            self._sweeper.cancel()
        if self.shadow_sender is not None:
            self.shadow_sender.stop()
        self.upstreams.close_all()
        if ctx is not None and ctx.access_log is not None:
            # last: the requests finished (or cut) during the stop are in it
            ctx.access_log.close()
        self._stopped.set()

    async def wait_stopped(self) -> None:
        await self._stopped.wait()

    def install_signal_handlers(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.request_stop)
        loop.add_signal_handler(signal.SIGUSR1, self.reopen_logs)
        self.install_reload_signal()

    def install_reload_signal(self) -> None:
        """SIGHUP reloads, SIGUSR2 upgrades (early: the listeners are bound before
        the start ends, and a signal then must not kill the process)."""
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGHUP, self.reload_on_signal)
        loop.add_signal_handler(signal.SIGUSR2, self.upgrader.on_signal)

    def reload_on_signal(self) -> None:
        """SIGHUP: reload the config file in place (queued behind one running)."""
        if self._stopping:
            return
        task = asyncio.get_running_loop().create_task(self.reloader.reload("sighup"))
        self._reloads.add(task)
        task.add_done_callback(self._reloads.discard)

    def reopen_logs(self) -> None:
        """SIGUSR1, as nginx: reopen the access log file after log rotation."""
        if self.ctx is not None and self.ctx.access_log is not None:
            self.ctx.access_log.reopen()


async def serve(
    config: Config, config_path: str | None = None, handover: Handover | None = None
) -> ProxyServer:
    """Serve until stopped; the server is returned for what follows its end (a
    supervisor after a hot upgrade as PID 1). ``handover``: this process was
    started by a hot upgrade, with these sockets and state."""
    server = ProxyServer(config, config_path)
    server.handover = handover
    if handover is not None:
        server.bind(handover.take_listeners([str(a) for a in config.listen]))
    else:
        server.bind()
    server.install_reload_signal()
    wire(server)
    if handover is not None:
        handover.close_unused()
    # before the first request: the collection it makes must not stall one
    heap.settle()
    await server.start()
    server.install_signal_handlers()
    log.info("zdproxy %s serving (pid %d)", _version(), os.getpid())
    if handover is not None:
        server.upgrader.took_over(handover)
        handover.report({"ready": os.getpid()})
    notify_ready()
    await server.wait_stopped()
    return server


def wire(server: ProxyServer) -> None:
    """The composition root's second half: build the control parts of ``server``
    (before ``server.start()``) and connect each to the narrow interface it
    needs; every lifecycle hook is registered here, with what the part needs
    bound in (no part is handed the server). Every part is required: a part that
    cannot be imported fails the start (an ImportError), never turns a feature
    off in silence.

    Start order (the hooks run in this order, stop in reverse): the data path's
    passive results to the outlier detectors, a generated sticky key saved, the
    health checks (their first verdicts before serving), rolling updates, the
    shared state (etcd), the admin API with the saved state restored, drain
    progress, rollouts.
    """
    handover = server.handover
    for service in server.services.values():
        # signs the service's affinity cookies; a state section of its runtime
        service.sticky_key = StickyKey(service.runtime, service.selector, service.config)
    health = build_health(server.services)
    for name, service in server.services.items():
        service.health = health[name]
        # a rolling update waits for a re-enabled backend's ramp to end
        service.rolling.slow_start_percent = health[name].slow_start.weight_percent
    server.health = health[primary_name(server.config)]
    server.start_hooks.append(partial(_observe_passive_health, server))
    server.start_hooks.append(partial(_save_sticky_keys, server))
    handed = handover.state if handover is not None else None
    for service_health in health.values():
        server.start_hooks.append(partial(service_health.start, handed))
        server.stop_hooks.append(service_health.stop)
    server.start_hooks.append(partial(_start_rolling, server))
    server.stop_hooks.append(partial(_stop_rolling, server))
    _wire_admin(server, handover)
    # drains end and removals complete on time (the control process owns them)
    ticker = RuntimeTicker([service.runtime for service in server.services.values()])
    server.start_hooks.append(_call(ticker.start))
    server.stop_hooks.append(_call(ticker.stop))
    # after the admin part restored the saved state: the rollout in progress resumes
    # (same step, same weights) before the first request is served
    for service in server.services.values():
        service.rollouts.restore()
        driver = RolloutDriver(service.rollouts)
        server.start_hooks.append(driver.start)
        server.stop_hooks.append(driver.stop)
        # during a hot upgrade nothing steps: the new process goes on from the state
        server.pause_hooks.append(driver.pause)
        server.resume_hooks.append(driver.start)
    server.pause_hooks.append(partial(_stop_rolling, server))
    server.resume_hooks.append(partial(_start_rolling, server))


def _wire_admin(server: ProxyServer, handover: Handover | None) -> None:
    """The admin API and the state persistence: the tokens checked (the process
    exits on a missing one), the admin socket chosen, the saved state restored
    before traffic is served."""
    plane = build_control_plane(server)
    # first: a failed start (the admin address in use) leaves the saved state untouched
    sock = admin_listener(server.config.admin, handover)
    server.admin_socket = sock
    server.persistences.extend(plane.persistences)
    plane.restore(handover.service_state if handover is not None else _nothing_handed)
    cluster = plane.cluster
    if cluster is not None:
        # before the admin API and the rollout drivers: the shared state is read first
        server.start_hooks.append(cluster.start)
        server.stop_hooks.append(cluster.stop)
        server.pause_hooks.append(cluster.pause)
        server.resume_hooks.append(cluster.resume)
    server.start_hooks.append(partial(plane.start, sock))
    server.retire_hooks.append(plane.retire)
    server.stop_hooks.append(plane.stop)


def admin_listener(admin: AdminConfig, handover: Handover | None) -> socket.socket | None:
    """The admin API's listening socket: the one a hot upgrade passed on for the
    same address, else a fresh one (None: ``admin.enabled`` is off)."""
    if not admin.enabled:
        return None
    passed = handover.take_admin(str(admin.listen)) if handover is not None else None
    return passed or bind_listener(admin.listen, backlog=128)


def _nothing_handed(name: str) -> None:
    return None


def _call(function: Callable[[], None]) -> Hook:
    """A plain call as a start/stop hook."""

    async def hook() -> None:
        function()

    return hook


async def _observe_passive_health(server: ProxyServer) -> None:
    """The data path reports failures and successes to the outlier detection of
    the service that owns the backend."""
    ctx = server.ctx
    assert ctx is not None
    detectors: list[tuple[Runtime, PassiveObserver]] = [
        (service.runtime, service.health.outlier)
        for service in server.services.values()
        if service.health is not None
    ]
    if len(detectors) == 1:
        ctx.observer = detectors[0][1]
    else:
        ctx.observer = ServiceObservers(detectors)


async def _save_sticky_keys(server: ProxyServer) -> None:
    for service in server.services.values():
        if service.sticky_key is not None:
            service.sticky_key.save_if_new()


async def _start_rolling(server: ProxyServer) -> None:
    for service in server.services.values():
        service.rolling.start_task()


async def _stop_rolling(server: ProxyServer) -> None:
    for service in server.services.values():
        service.rolling.stop_task()


def _version() -> str:
    from zdproxy import __version__

    return __version__
