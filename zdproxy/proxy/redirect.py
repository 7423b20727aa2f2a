"""A plain-HTTP listener that answers every request with a redirect to https.

``listen: [{address: 0.0.0.0:80, redirect_https: true}]``: each request gets
``308 Permanent Redirect`` (method and body kept by the client, unlike 301) to
``https://HOST[:PORT]/path?query``, HOST from the request (its port dropped),
PORT the TLS listener's (left out when 443). One response per connection; a
head not complete within timeouts.request_header or over limits.max_header_bytes
is refused. Nothing is proxied: no backend is ever involved.
"""

from __future__ import annotations

import asyncio
from typing import cast

import httptools

from zdproxy.http.head import error_response
from zdproxy.http.target import TargetError, split_absolute, valid_host
from zdproxy.proxy.context import ProxyContext


def location(host: bytes, target: bytes, port: int) -> bytes | None:
    """The redirect's Location, or None when the request names no usable host."""
    if not target.startswith(b"/"):
        try:
            absolute = split_absolute(target)
        except TargetError:
            return None
        host, target = absolute.authority, absolute.origin_form
    if not valid_host(host):
        return None
    # the port the client used is the plain one: it goes
    name = host[: host.index(b"]") + 1] if host.startswith(b"[") else host.partition(b":")[0]
    authority = name if port == 443 else b"%s:%d" % (name, port)
    return b"https://" + authority.lower() + target


def redirect_response(where: bytes) -> bytes:
    return (
        b"HTTP/1.1 308 Permanent Redirect\r\nLocation: %s\r\n"
        b"Content-Length: 0\r\nConnection: close\r\n\r\n" % where
    )


class RedirectConnection(asyncio.Protocol):
    def __init__(self, ctx: ProxyContext, port: int) -> None:
        self.ctx = ctx
        self.port = port
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpRequestParser(self)
        self.url = b""
        self.host: bytes | None = None
        self.hosts = 0
        self.received = 0
        self.answered = False
        self.timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.timer = asyncio.get_running_loop().call_later(self.ctx.t_header, self._time_up)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.timer is not None:
            self.timer.cancel()

    def _time_up(self) -> None:
        if self.transport is None:
            return
        if self.answered:
            self.transport.close()
        else:
            self._answer(error_response(408, "header-timeout", "request header timeout"))

    def data_received(self, data: bytes) -> None:
        answered = self.answered  # a local: self.answered may change in feed_data()
        if answered:
            return  # read and dropped until the client closes: no reset over the answer
        self.received += len(data)
        if self.received > self.ctx.max_header_bytes:
            self._answer(error_response(431, "headers-too-large", "request header too large"))
            return
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            pass  # the head is complete: on_headers_complete answered
        except httptools.HttpParserError:
            if not self.answered:
                self._answer(error_response(400, "bad-request", "malformed request"))

    def eof_received(self) -> bool | None:
        return None  # close

    # httptools callbacks

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        if name.lower() == b"host":
            self.host = value
            self.hosts += 1

    def on_headers_complete(self) -> None:
        where = None
        if self.hosts <= 1:
            where = location(self.host or b"", self.url, self.port)
        if where is None:
            self._answer(error_response(400, "bad-host", "no valid host to redirect to"))
        else:
            self._answer(redirect_response(where))

    def _answer(self, response: bytes) -> None:
        """Write the one response and shut our side; what the client still sends is
        read and dropped until it closes (or the header timeout ends it)."""
        transport = self.transport
        if self.answered or transport is None:
            return
        self.answered = True
        transport.write(response)
        if transport.can_write_eof():
            transport.write_eof()
        else:
            transport.close()
