"""Shared state of the data path in one process.

The config-derived part is one frozen ``DataPathSettings`` value, installed
whole at start and on reload (``ProxyContext.install``); the rest is mutable
state (connections, counters, the coarse clock, the accept switch). Protocols
hold a reference and read precomputed values from it instead of walking the
config per request.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

from zdproxy.balancing.passive import (
    NullObserver,
    PassiveObserver,
    RetryPolicy,
    UnboundedRetries,
)
from zdproxy.balancing.selector import Selector
from zdproxy.config.schema import Config
from zdproxy.http.routes import RouteTable
from zdproxy.proxy.settings import DataPathSettings

if TYPE_CHECKING:
    from zdproxy.proxy.accesslog import AccessLog
    from zdproxy.proxy.downstream import ClientConnection
    from zdproxy.proxy.exchange import Exchange
    from zdproxy.proxy.tunnel import Tunnel
    from zdproxy.proxy.upstream import UpstreamPools

log = logging.getLogger("zdproxy.error")


def _ignore(accepting: bool) -> None:
    pass


class ShadowHook(Protocol):
    def sample(self, exchange: Exchange) -> None:
        """The shadow accumulator picked ``exchange``: copy it (``proxy.shadow``)."""


class _NoShadow:
    def sample(self, exchange: Exchange) -> None:
        pass  # never called: the step is 0 until a real sender is installed


class Counters:
    """Process-wide data-path counters, read by the metrics collector."""

    __slots__ = ("connections_accepted", "retries", "tunnels_total")

    def __init__(self) -> None:
        self.connections_accepted = 0
        self.retries = 0
        self.tunnels_total = 0


class ProxyContext:
    """Everything a connection needs, precomputed from the config."""

    __slots__ = (
        "accept_control",
        "accept_paused",
        "access_log",
        "affinity_cookie",
        "clock",
        "closing",
        "connections",
        "counters",
        "fd_cap",
        "fd_logged_at",
        "hash_on",
        "header_kinds",
        "idle",
        "loop",
        "max_body",
        "max_connections",
        "max_header_bytes",
        "max_headers",
        "now",
        "observer",
        "override_cookie",
        "override_header",
        "pool_header",
        "reclaiming",
        "request_ids",
        "requests",
        "retry_attempts",
        "retry_buffer",
        "retry_policy",
        "routes",
        "selector",
        "selector_wants_affinity",
        "settings",
        "shadow",
        "shadow_acc",
        "shadow_step",
        "strict",
        "t_body",
        "t_connect",
        "t_header",
        "t_idle",
        "t_tunnel",
        "t_upstream",
        "trusted",
        "tunnels",
        "upstream_tls",
        "upstreams",
    )

    def __init__(
        self,
        config: Config,
        selector: Selector,
        upstreams: UpstreamPools,
        loop: asyncio.AbstractEventLoop,
    ) -> None:
        self.loop = loop
        #: ``loop.time``, bound once: a call through it skips the method lookup that
        #: ``loop.time()`` costs compiled code (three reads a request)
        self.clock: Callable[[], float] = loop.time
        self.selector = selector
        #: with services: the route table, whose matches name a service's selector;
        #: None: every request goes to ``selector`` (no routing cost)
        self.routes: RouteTable[Selector] | None = None
        self.upstreams = upstreams
        self.connections: set[ClientConnection] = set()
        self.tunnels: set[Tunnel] = set()
        self.counters = Counters()
        self.closing = False
        #: limits.max_connections: the server installs ``accept_control(False)`` to stop
        #: accepting (new connections wait in the listen backlog) and ``(True)`` to resume
        self.accept_control: Callable[[bool], None] = _ignore
        self.accept_paused = False
        #: keep-alive connections between requests, oldest first: at the limit,
        #: the oldest is closed to make room for a new client (as nginx does)
        self.idle: dict[ClientConnection, None] = {}
        #: idle connections closed for room whose close has not completed yet
        self.reclaiming = 0
        #: passive health feed and retry budget; the health package installs real ones
        self.observer: PassiveObserver = NullObserver()
        self.retry_policy: RetryPolicy = UnboundedRetries()
        #: the server installs one when log.access_log is not off
        self.access_log: AccessLog | None = None
        #: requests started, in total; the sweeper reports the growth to the retry budget
        self.requests = 0
        #: shadow traffic: ``shadow_acc`` loses ``shadow_step`` per request and the
        #: request is copied when it drops below 0 (see ``proxy.shadow``)
        self.shadow: ShadowHook = _NoShadow()
        self.shadow_acc = 0
        self.shadow_step = 0
        #: coarse clock, refreshed by the sweeper; good enough for deadlines
        self.now = loop.time()
        #: client connections the open-file limit allows (set by the server at start)
        self.fd_cap: int | None = None
        self.fd_logged_at = -1.0
        self.apply(config)

    def apply(self, config: Config) -> None:
        """Install the settings ``config`` gives (``install``); at start."""
        self.install(DataPathSettings.from_config(config, self.fd_cap))

    def install(self, settings: DataPathSettings) -> None:
        """Take ``settings`` whole, in one synchronous step (no request runs between
        the first assignment and the last). The hot path reads flat copies in this
        object's slots (``ctx.t_header``, ``ctx.max_body``...): one slot read per
        use instead of two (``ctx.settings.t_header``) on every request, and the
        readers (exchange, downstream, upstream) keep their names. ``settings``
        is the value they were copied from; nothing else writes these slots."""
        self.settings = settings
        self.upstream_tls = settings.upstream_tls
        self.t_connect = settings.t_connect
        self.t_header = settings.t_header
        self.t_body = settings.t_body
        self.t_upstream = settings.t_upstream
        self.t_idle = settings.t_idle
        self.t_tunnel = settings.t_tunnel
        self.max_header_bytes = settings.max_header_bytes
        self.max_headers = settings.max_headers
        self.max_body = settings.max_body
        self.max_connections = settings.max_connections
        self.upstreams.max_head_bytes = settings.max_response_header_bytes
        self.override_header = settings.override_header
        self.override_cookie = settings.override_cookie
        self.affinity_cookie = settings.affinity_cookie
        self.selector_wants_affinity = settings.selector_wants_affinity
        self.hash_on = settings.hash_on
        self.pool_header = settings.pool_header
        self.strict = settings.strict
        self.trusted = settings.trusted
        self.request_ids = settings.request_ids
        self.header_kinds = settings.header_kinds
        self.retry_attempts = settings.retry_attempts
        self.retry_buffer = settings.retry_buffer

    def at_connection_limit(self) -> None:
        """A connection was accepted at limits.max_connections: close the oldest
        idle keep-alive connections to stay at the limit; with none left to
        close, stop accepting (new clients wait in the listen backlog)."""
        idle = self.idle
        while idle and len(self.connections) - self.reclaiming > self.max_connections:
            next(iter(idle)).reclaim()
        if (
            not idle
            and not self.accept_paused
            and len(self.connections) - self.reclaiming >= self.max_connections
        ):
            self.accept_paused = True
            self.accept_control(False)

    def resume_accepting(self) -> None:
        """At the limit, a connection became idle: it can make room for the next
        client, so accept again."""
        self.accept_paused = False
        self.accept_control(True)

    def out_of_fds(self, where: str, exc: OSError) -> None:
        """This process ran out of file descriptors: say so, at most once a second
        (an exhausted process meets it on every attempt)."""
        now = self.loop.time()
        if now - self.fd_logged_at >= 1.0:
            self.fd_logged_at = now
            log.error(
                "out of file descriptors while %s (%s): raise the open-file limit or "
                "lower limits.max_connections",
                where,
                exc.strerror or exc,
            )

    def is_trusted(self, ip: str) -> bool:
        if not self.trusted:
            return False
        try:
            address = ipaddress.ip_address(ip)
        except ValueError:
            return False
        return any(address in network for network in self.trusted)
