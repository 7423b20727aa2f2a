"""The data path's settings: one frozen value computed from the config.

``DataPathSettings.from_config`` is a pure function of the config (and of the
open-file cap of the process); it reads the upstream CA files, so a bad one
fails here, before anything is changed. The context installs the value whole
(``ProxyContext.install``), at start and on reload; the context's mutable state
(connections, counters, the coarse clock, the accept switch) is kept apart.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from zdproxy.config.schema import Config
from zdproxy.http.requestid import RequestIds
from zdproxy.proxy.exchange import header_kinds
from zdproxy.proxy.upstream_tls import UpstreamTlsMap

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True, slots=True)
class DataPathSettings:
    """Everything config-derived that the data path reads per connection or per
    request, precomputed (encoded header names, seconds as floats)."""

    #: which backends are reached over TLS (CA files read when this is built)
    upstream_tls: UpstreamTlsMap
    #: timeouts, seconds
    t_connect: float
    t_header: float
    t_body: float
    t_upstream: float
    t_idle: float
    t_tunnel: float
    #: request limits
    max_header_bytes: int
    max_headers: int
    max_body: int
    #: limits.max_connections, within the open-file cap when there is one
    max_connections: int
    #: the longest response head taken from a backend
    max_response_header_bytes: int
    #: routing overrides: lower-case request header / cookie name (None: off)
    override_header: bytes | None
    override_cookie: str | None
    #: the affinity cookie, read when a service pins with it (its name is process-wide)
    affinity_cookie: str | None
    #: sticky.mode hash: what fills hints.hash_key (b"": the client address; else a
    #: lower-case header name); None: nothing
    hash_on: bytes | None
    #: ``b"X-Zdproxy-Pool: "`` (None: the response header is off)
    pool_header: bytes | None
    strict: bool
    trusted: tuple[Network, ...]
    request_ids: RequestIds | None
    #: what the exchange does with a request header, by lower-case name (read only)
    header_kinds: dict[bytes, int]
    retry_attempts: int
    retry_buffer: int

    @property
    def selector_wants_affinity(self) -> bool:
        return self.affinity_cookie is not None

    @classmethod
    def from_config(cls, config: Config, fd_cap: int | None = None) -> DataPathSettings:
        """The settings ``config`` gives; ``fd_cap``: the client connections the
        open-file limit allows (None: no cap below limits.max_connections)."""
        t = config.timeouts
        limits = config.limits
        max_connections = limits.max_connections
        if fd_cap is not None:
            max_connections = min(max_connections, fd_cap)
        routing = config.routing
        sticky = config.sticky
        modes = {config.service_config(name).sticky.mode for name in config.service_names()}
        hash_on = None
        if sticky.mode == "hash":
            hash_on = sticky.hash_on.partition("header:")[2].lower().encode("latin-1")
        http = config.http
        request_id = http.request_id
        request_ids = (
            RequestIds(request_id.header, request_id.trust_incoming) if request_id.enabled else None
        )
        return cls(
            upstream_tls=UpstreamTlsMap(config),
            t_connect=t.connect,
            t_header=t.request_header,
            t_body=t.request_body,
            t_upstream=t.upstream_response,
            t_idle=t.idle,
            t_tunnel=t.tunnel_idle,
            max_header_bytes=limits.max_header_bytes,
            max_headers=limits.max_headers,
            max_body=limits.max_body_bytes,
            max_connections=max_connections,
            max_response_header_bytes=limits.max_response_header_bytes,
            override_header=(
                routing.header.name.lower().encode("ascii") if routing.header.enabled else None
            ),
            override_cookie=routing.cookie.name if routing.cookie.enabled else None,
            affinity_cookie=sticky.cookie if modes & {"pool", "backend"} else None,
            hash_on=hash_on,
            pool_header=(
                http.pool_response_header_name.encode("ascii") + b": "
                if http.pool_response_header
                else None
            ),
            strict=http.strictness == "strict",
            trusted=tuple(ipaddress.ip_network(n, strict=False) for n in http.trusted_proxies),
            request_ids=request_ids,
            header_kinds=header_kinds(None if request_ids is None else request_ids.header_lower),
            retry_attempts=config.retries.attempts,
            retry_buffer=config.retries.buffer_body_bytes,
        )
