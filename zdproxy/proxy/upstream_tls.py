"""TLS to backends: the client contexts of pools (or backends) with ``tls``, used
by proxied requests and by health checks. Rebuilt from the config (CA files
re-read) at start and on every reload."""

from __future__ import annotations

import ssl
from collections.abc import Iterable
from dataclasses import dataclass

from zdproxy.config.schema import DEFAULT_SERVICE, Config, UpstreamTls

ALPN = ["http/1.1"]


@dataclass(frozen=True, slots=True)
class UpstreamTlsTarget:
    context: ssl.SSLContext
    #: the name checked in the backend's certificate and sent as SNI; None: the host
    server_name: str | None
    settings: UpstreamTls


def client_context(settings: UpstreamTls) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=settings.ca)
    if not settings.verify:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    context.set_alpn_protocols(ALPN)
    return context


class UpstreamTlsMap:
    """Which backends are reached over TLS: a backend's own ``tls``, else its
    pool's (backends added through the API take their pool's). Pools are keyed
    by service too: two services may both have a pool ``blue``."""

    def __init__(self, config: Config | None = None) -> None:
        self.backends: dict[str, UpstreamTlsTarget] = {}
        self.pools: dict[tuple[str, str], UpstreamTlsTarget] = {}
        if config is not None:
            self._build(config)

    def _build(self, config: Config) -> None:
        contexts: dict[UpstreamTls, ssl.SSLContext] = {}

        def target(settings: UpstreamTls) -> UpstreamTlsTarget:
            context = contexts.get(settings)
            if context is None:
                context = contexts[settings] = client_context(settings)
            return UpstreamTlsTarget(context, settings.server_name, settings)

        for service in config.service_names():
            plane = config.service_config(service)
            for name, pool in plane.pools.items():
                if pool.tls is not None:
                    self.pools[service, name] = target(pool.tls)
            for _, backend_id, spec in plane.backend_ids():
                if spec.tls is not None:
                    self.backends[backend_id] = target(spec.tls)

    def lookup(
        self, backend_id: str, pool: str, service: str = DEFAULT_SERVICE
    ) -> UpstreamTlsTarget | None:
        found = self.backends.get(backend_id)
        return found if found is not None else self.pools.get((service, pool))


def tls_changed(
    old: UpstreamTlsMap, new: UpstreamTlsMap, backends: Iterable[tuple[str, str, str]]
) -> list[str]:
    """The ids among ``backends`` ((id, pool, service)) whose TLS settings differ:
    their pooled connections were made with the old ones."""
    out = []
    for backend_id, pool, service in backends:
        before = old.lookup(backend_id, pool, service)
        after = new.lookup(backend_id, pool, service)
        if (before and before.settings) != (after and after.settings):
            out.append(backend_id)
    return out
