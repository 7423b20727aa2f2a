"""Shared, read-mostly state of the data path in one process.

Built once from the config (and rebuilt on reload); protocols hold a reference
and read precomputed values from it instead of walking the config per request.
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
from zdproxy.http.requestid import RequestIds
from zdproxy.http.routes import RouteTable
from zdproxy.proxy.exchange import header_kinds
from zdproxy.proxy.upstream_tls import UpstreamTlsMap

if TYPE_CHECKING:
    from zdproxy.proxy.accesslog import AccessLog
    from zdproxy.proxy.downstream import ClientConnection
    from zdproxy.proxy.exchange import Exchange
    from zdproxy.proxy.tunnel import Tunnel
    from zdproxy.proxy.upstream import UpstreamPools

log = logging.getLogger("zdproxy.error")

_Network = ipaddress.IPv4Network | ipaddress.IPv6Network


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
        "closing",
        "connections",
        "counters",
        "fd_cap",
        "fd_logged_at",
        "hash_on",
        "header_kinds",
        "idle",
        "limits",
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
        """(Re)read every config-derived value; used at start and on reload."""
        #: which backends are reached over TLS (CA files re-read on each reload)
        self.upstream_tls = UpstreamTlsMap(config)
        t = config.timeouts
        self.t_connect = t.connect
        self.t_header = t.request_header
        self.t_body = t.request_body
        self.t_upstream = t.upstream_response
        self.t_idle = t.idle
        self.t_tunnel = t.tunnel_idle
        limits = config.limits
        self.limits = limits
        self.max_header_bytes = limits.max_header_bytes
        self.max_headers = limits.max_headers
        self.max_body = limits.max_body_bytes
        self.max_connections = limits.max_connections
        if self.fd_cap is not None:
            self.max_connections = min(self.max_connections, self.fd_cap)
        self.upstreams.max_head_bytes = limits.max_response_header_bytes
        routing = config.routing
        self.override_header = (
            routing.header.name.lower().encode("ascii") if routing.header.enabled else None
        )
        self.override_cookie = routing.cookie.name if routing.cookie.enabled else None
        sticky = config.sticky
        # the cookie is read when a service pins with it (its name is process-wide)
        modes = {config.service_config(name).sticky.mode for name in config.service_names()}
        self.affinity_cookie = sticky.cookie if modes & {"pool", "backend"} else None
        self.selector_wants_affinity = self.affinity_cookie is not None
        #: sticky.mode hash: what fills hints.hash_key (b"": the client address; else a
        #: lower-case header name); None: nothing
        self.hash_on: bytes | None = None
        if sticky.mode == "hash":
            header = sticky.hash_on.partition("header:")[2]
            self.hash_on = header.lower().encode("latin-1")
        http = config.http
        self.pool_header = (
            http.pool_response_header_name.encode("ascii") + b": "
            if http.pool_response_header
            else None
        )
        self.strict = http.strictness == "strict"
        self.trusted: tuple[_Network, ...] = tuple(
            ipaddress.ip_network(n, strict=False) for n in http.trusted_proxies
        )
        request_id = http.request_id
        self.request_ids: RequestIds | None = (
            RequestIds(request_id.header, request_id.trust_incoming) if request_id.enabled else None
        )
        #: what the exchange does with a request header, by lower-case name
        self.header_kinds = header_kinds(
            None if self.request_ids is None else self.request_ids.header_lower
        )
        self.retry_attempts = config.retries.attempts
        self.retry_buffer = config.retries.buffer_body_bytes

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
