"""TLS on the data listeners: the SSL contexts of HTTPS listeners (certificates
chosen by SNI, swapped on reload), and which protocol serves each listener.
(TLS to backends: ``zdproxy.proxy.upstream_tls``.)

A listener's server is created once with a *front* context; its SNI callback
(called by OpenSSL for every ClientHello, with or without a name) hands each
handshake the context of the certificate for the name asked, from the set
installed last. A reload builds a new set from the files first (any error
refuses it and the set serving stays), then swaps it in one assignment: new
handshakes use the new certificates, established connections keep theirs.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from zdproxy.config.schema import Listener, ListenerTls
from zdproxy.config.tlsfiles import certificate_names, load_pair
from zdproxy.proxy.context import ProxyContext
from zdproxy.proxy.downstream import ClientConnection
from zdproxy.proxy.redirect import RedirectConnection

ALPN = ["http/1.1"]
_VERSIONS = {"1.2": ssl.TLSVersion.TLSv1_2, "1.3": ssl.TLSVersion.TLSv1_3}


def _server_context(min_version: str) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = _VERSIONS[min_version]
    context.set_alpn_protocols(ALPN)
    # no TLS compression (CRIME); the server's order of OpenSSL's default suites
    context.options |= ssl.OP_NO_COMPRESSION | ssl.OP_CIPHER_SERVER_PREFERENCE
    return context


@dataclass(frozen=True, slots=True)
class _CertificateSet:
    default: ssl.SSLContext
    exact: dict[str, ssl.SSLContext]
    #: ``*.example.com`` is kept under ``example.com``: one label matches the star
    wildcard: dict[str, ssl.SSLContext]

    def select(self, server_name: str | None) -> ssl.SSLContext:
        if server_name is None:
            return self.default
        name = server_name.lower().rstrip(".")
        context = self.exact.get(name)
        if context is None:
            context = self.wildcard.get(name.partition(".")[2], self.default)
        return context


def _load_set(settings: ListenerTls) -> _CertificateSet:
    """Every certificate of a listener, read now; raises ``ValueError``."""
    exact: dict[str, ssl.SSLContext] = {}
    wildcard: dict[str, ssl.SSLContext] = {}
    contexts = []
    for pair in settings.pairs():
        context = _server_context(settings.min_version)
        load_pair(context, pair.cert, pair.key)
        contexts.append(context)
        for name in certificate_names(pair.cert):
            # the first certificate listed wins a name two of them have
            if name.startswith("*."):
                wildcard.setdefault(name[2:], context)
            else:
                exact.setdefault(name, context)
    return _CertificateSet(contexts[0], exact, wildcard)


class ServerTls:
    """The TLS side of one listener: ``context`` goes to ``create_server``."""

    def __init__(self, settings: ListenerTls) -> None:
        self.settings = settings
        self._set = _load_set(settings)
        self.context = _server_context(settings.min_version)
        first = settings.pairs()[0]
        # a certificate of its own too, in case a handshake gets past the callback
        load_pair(self.context, first.cert, first.key)
        self.context.sni_callback = self._on_client_hello

    def _on_client_hello(
        self, connection: ssl.SSLObject | ssl.SSLSocket, server_name: str | None, _: object
    ) -> None:
        connection.context = self._set.select(server_name)

    def install(self, settings: ListenerTls, certificates: _CertificateSet) -> None:
        """Serve ``certificates`` from the next handshake on (one assignment)."""
        # the versions accepted are the front context's (copied into each handshake
        # before the callback runs)
        self.context.minimum_version = _VERSIONS[settings.min_version]
        self._set = certificates
        self.settings = settings


class ListenerTlsSet:
    """The ``ServerTls`` of every TLS listener, by address."""

    def __init__(self, listen: Sequence[Listener]) -> None:
        self.servers: dict[tuple[str, int], ServerTls] = {}
        for listener in listen:
            if listener.tls is not None:
                self.servers[(listener.host, listener.port)] = ServerTls(listener.tls)

    def context_for(self, listener: Listener) -> ssl.SSLContext | None:
        server = self.servers.get((listener.host, listener.port))
        return None if server is None else server.context

    def merge(self, serving: Sequence[Listener], new: Sequence[Listener]) -> tuple[Listener, ...]:
        """The listeners after a reload: the ones serving (a new address needs a
        restart), with the TLS settings the file now gives the same address."""
        by_address = {(listener.host, listener.port): listener for listener in new}
        out = []
        for listener in serving:
            fresh = by_address.get((listener.host, listener.port))
            if listener.tls is not None and fresh is not None and fresh.tls is not None:
                listener = listener.model_copy(update={"tls": fresh.tls})
            out.append(listener)
        return tuple(out)

    def reload(self, listen: Sequence[Listener]) -> list[str]:
        """Re-read every listener's certificates: all or none (``ValueError``).
        Returns the addresses reloaded."""
        loaded: list[tuple[ServerTls, ListenerTls, _CertificateSet]] = []
        for listener in listen:
            server = self.servers.get((listener.host, listener.port))
            if server is not None and listener.tls is not None:
                loaded.append((server, listener.tls, _load_set(listener.tls)))
        for server, settings, certificates in loaded:
            server.install(settings, certificates)
        return [str(listener) for listener in listen if listener.tls is not None]


def redirect_port(listener: Listener, listen: Sequence[Listener]) -> int:
    """The https port a redirect listener sends clients to."""
    if listener.redirect_https is not True:
        return int(listener.redirect_https)
    return next(other.port for other in listen if other.tls is not None)


def protocol_factory(
    ctx: ProxyContext, listener: Listener, listen: Sequence[Listener]
) -> Callable[[], asyncio.Protocol]:
    """What ``create_server`` makes of each connection to ``listener``."""
    if listener.redirect_https is not False:
        port = redirect_port(listener, listen)
        return lambda: RedirectConnection(ctx, port)
    proto = b"https" if listener.tls is not None else b"http"
    return lambda: ClientConnection(ctx, proto)
