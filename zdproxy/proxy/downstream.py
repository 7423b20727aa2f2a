"""Client side: one protocol per client connection.

Callbacks stay thin: parser events go to the ``Exchange`` (one request) being
parsed; the connection keeps the queue of exchanges so pipelined requests are
answered in order, and the deadline the sweeper checks.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from typing import cast

import httptools

from zdproxy.errors import ProxyError
from zdproxy.http.head import error_response
from zdproxy.proxy.context import ProxyContext
from zdproxy.proxy.exchange import Exchange
from zdproxy.proxy.tunnel import Tunnel

log = logging.getLogger("zdproxy.error")

# deadline kinds, checked by the sweeper
NO_DEADLINE = 0
HEADER = 1
IDLE = 2
BODY = 3
UPSTREAM = 4
TUNNEL = 5

#: pipelined requests parsed ahead of the one being answered before reading pauses
MAX_PIPELINE = 8


class ClientConnection(asyncio.Protocol):
    __slots__ = (
        "client_eof",
        "client_ip",
        "closing",
        "ctx",
        "deadline",
        "deadline_kind",
        "head_bytes",
        "header_count",
        "parser",
        "parsing",
        "queue",
        "reading_paused",
        "transport",
        "trusted",
        "tunnel",
        "tunnel_ref",
        "xff_ip",
    )

    def __init__(self, ctx: ProxyContext) -> None:
        self.ctx = ctx
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpRequestParser(self)
        self.parsing: Exchange | None = None
        self.queue: deque[Exchange] = deque()
        self.closing = False
        #: the client half-closed after complete requests: close once they are answered
        self.client_eof = False
        self.reading_paused = False
        self.deadline = 0.0
        self.deadline_kind = NO_DEADLINE
        self.head_bytes = 0
        self.header_count = 0
        self.client_ip = ""
        self.xff_ip = b""
        self.trusted = False
        #: the upstream transport once this connection became a tunnel
        self.tunnel: asyncio.Transport | None = None
        self.tunnel_ref: Tunnel | None = None

    # asyncio callbacks

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it
        self.transport = cast(asyncio.Transport, transport)
        ctx = self.ctx
        ctx.connections.add(self)
        ctx.counters.connections_accepted += 1
        if len(ctx.connections) >= ctx.max_connections and not ctx.accept_paused:
            ctx.accept_paused = True
            ctx.accept_control(False)
        peer = transport.get_extra_info("peername")
        self.client_ip = peer[0] if peer else ""
        self.xff_ip = self.client_ip.encode("ascii")
        self.trusted = ctx.is_trusted(self.client_ip)
        self.set_deadline(HEADER, ctx.t_header)
        if ctx.closing:
            self.closing = True

    def connection_lost(self, exc: Exception | None) -> None:
        ctx = self.ctx
        ctx.connections.discard(self)
        if ctx.accept_paused and len(ctx.connections) < ctx.max_connections:
            ctx.accept_paused = False
            ctx.accept_control(True)
        self.deadline_kind = NO_DEADLINE
        if self.tunnel_ref is not None:
            self.tunnel_ref.close()
        while self.queue:
            self.queue.popleft().on_client_lost()
        if self.parsing is not None:
            self.parsing.on_client_lost()
            self.parsing = None

    def data_received(self, data: bytes) -> None:
        tunnel = self.tunnel
        if tunnel is not None:
            self.deadline = self.ctx.now + self.ctx.t_tunnel
            tunnel.write(data)
            return
        if self.parsing is not None and self.parsing.in_head:
            # bounds a head that never completes (one endless header line)
            self.head_bytes += len(data)
            if self.head_bytes > 2 * self.ctx.max_header_bytes:
                self.reject(431, "headers-too-large", "request header too large")
                return
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade as upgrade:
            self._on_upgrade(data[upgrade.args[0] :])
        except httptools.HttpParserCallbackError as exc:
            cause = exc.__context__
            if isinstance(cause, ProxyError):
                self.reject(cause.status, cause.cause, str(cause))
            else:
                log.exception("internal error while parsing a request", exc_info=cause)
                self.reject(500, "internal", "internal error")
        except httptools.HttpParserError as exc:
            self._parse_error(exc)

    def eof_received(self) -> bool | None:
        tunnel = self.tunnel
        if tunnel is not None:
            if tunnel.can_write_eof():
                tunnel.write_eof()
            if self.tunnel_ref is not None:
                self.tunnel_ref.on_eof()
            return True
        # a client half-close after a full request still gets its answer; in the
        # middle of one, that request can never complete: the client is gone
        if self.queue and self.parsing is None:
            self.client_eof = True
            return True
        return False

    def pause_writing(self) -> None:
        if self.queue:
            self.queue[0].pause_upstream_reading()
        elif self.tunnel is not None:
            self.tunnel.pause_reading()

    def resume_writing(self) -> None:
        if self.queue:
            self.queue[0].resume_upstream_reading()
        elif self.tunnel is not None:
            self.tunnel.resume_reading()

    # httptools callbacks

    def on_message_begin(self) -> None:
        ctx = self.ctx
        self.parsing = Exchange(self)
        self.head_bytes = 0
        self.header_count = 0
        if not self.queue:
            self.set_deadline(HEADER, ctx.t_header)

    def on_url(self, url: bytes) -> None:
        exchange = self.parsing
        assert exchange is not None
        exchange.url += url
        self.head_bytes += len(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        exchange = self.parsing
        assert exchange is not None
        self.header_count += 1
        self.head_bytes += len(name) + len(value) + 4
        ctx = self.ctx
        if self.head_bytes > ctx.max_header_bytes:
            raise ProxyError("request header too large", status=431, cause="headers-too-large")
        if self.header_count > ctx.max_headers:
            raise ProxyError("too many request headers", status=431, cause="too-many-headers")
        exchange.add_header(name, value)

    def on_headers_complete(self) -> None:
        exchange = self.parsing
        assert exchange is not None
        exchange.headers_complete(self.parser)
        self.queue.append(exchange)
        if exchange.expects_body:
            self.set_deadline(BODY, self.ctx.t_body)
        elif len(self.queue) == 1:
            self.deadline_kind = NO_DEADLINE
        if len(self.queue) == 1:
            exchange.start()
        elif len(self.queue) >= MAX_PIPELINE:
            self.pause_reading()

    def on_body(self, body: bytes) -> None:
        exchange = self.parsing
        assert exchange is not None
        exchange.on_request_body(body)

    def on_message_complete(self) -> None:
        exchange = self.parsing
        assert exchange is not None
        self.parsing = None
        if self.deadline_kind == BODY:
            self.deadline_kind = NO_DEADLINE
        exchange.on_request_complete()

    # called by exchanges

    def set_deadline(self, kind: int, seconds: float) -> None:
        self.deadline_kind = kind
        self.deadline = self.ctx.now + seconds

    def response_finished(self, exchange: Exchange, keep_alive: bool) -> None:
        """The response of the head exchange is fully written."""
        queue = self.queue
        if queue and queue[0] is exchange:
            queue.popleft()
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        if not keep_alive or self.closing:
            self._close_after_flush()
            return
        if queue:
            queue[0].start()
        elif self.client_eof:
            self._close_after_flush()
        elif self.parsing is None:
            self.set_deadline(IDLE, self.ctx.t_idle)
        if self.reading_paused and len(queue) < MAX_PIPELINE:
            self.resume_reading()

    def pause_reading(self) -> None:
        if not self.reading_paused and self.transport is not None:
            self.reading_paused = True
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if self.reading_paused and self.transport is not None:
            self.reading_paused = False
            self.transport.resume_reading()

    def reject(self, status: int, cause: str, message: str) -> None:
        """Answer an error the proxy generated for a request and close: framing is
        in doubt or the request broke a limit, so nothing more is read."""
        broken = self.parsing
        self.parsing = None
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        transport.pause_reading()
        self.reading_paused = True
        if broken is not None and self.queue and self.queue[-1] is broken:
            # its head was accepted but its body is malformed: it never completes
            if len(self.queue) == 1:
                broken.on_request_error(ProxyError(message, status=status, cause=cause))
                return
            self.queue.pop()
        response = self._refusal(broken, status, cause, message)
        if self.queue:
            # an earlier pipelined response is still due: answer it, then close
            self.closing = True
            last = self.queue[-1]
            if last.client_keep_alive:
                last.after_reject = response
            # else that request closes the connection: bytes after it get no answer
            return
        transport.write(response)
        self._close_after_flush()

    def _refusal(self, broken: Exchange | None, status: int, cause: str, message: str) -> bytes:
        """The error response for a request refused by the connection, logged."""
        ctx = self.ctx
        extra = b""
        request_id = None
        ids = ctx.request_ids
        if ids is not None:
            if broken is None:
                request_id = ids.new()
            else:
                request_id = broken.request_id
                if request_id is None:
                    request_id = ids.resolve(broken.request_id_in)
            extra = ids.line(request_id)
        if broken is not None and not broken.method:
            # refused before its head was complete: the method may be known already
            try:
                broken.method = self.parser.get_method()
            except httptools.HttpParserError:
                pass
        response = error_response(status, cause, message, extra=extra)
        head_end = response.index(b"\r\n\r\n") + 4
        if broken is not None and broken.method == b"HEAD":
            response = response[:head_end]
        access = ctx.access_log
        if access is not None:
            access.add_rejected(self, broken, status, cause, len(response) - head_end, request_id)
        return response

    def _close_after_flush(self) -> None:
        transport = self.transport
        self.deadline_kind = NO_DEADLINE
        if transport is not None:
            transport.close()

    def _parse_error(self, exc: Exception) -> None:
        message = str(exc)
        if message.startswith("Invalid HTTP version"):
            # llhttp parsed a version it does not speak (HTTP/1.2, HTTP/3.0); malformed
            # versions ("HTTP/1.1.1", bare LF after it) are plain 400s
            self.reject(505, "bad-version", "HTTP version not supported")
        elif isinstance(exc, httptools.HttpParserInvalidMethodError):
            self.reject(400, "bad-method", "invalid request method")
        elif isinstance(exc, httptools.HttpParserInvalidURLError):
            self.reject(400, "bad-target", "invalid request target")
        else:
            self.reject(400, "bad-request", "malformed request")

    def _on_upgrade(self, rest: bytes) -> None:
        queue = self.queue
        if not queue or not queue[-1].upgrade:
            self.reject(400, "bad-request", "unexpected upgrade")
            return
        # nothing more is parsed as HTTP on this connection: it becomes a tunnel
        self.pause_reading()
        queue[-1].on_client_upgrade_data(rest)

    # the sweeper

    def check_deadline(self, now: float) -> None:
        kind = self.deadline_kind
        if kind == NO_DEADLINE or now < self.deadline:
            return
        self.deadline_kind = NO_DEADLINE
        if kind == IDLE:
            self._close_after_flush()
        elif kind == HEADER:
            if self.parsing is None and self.head_bytes == 0 and not self.queue:
                self._close_after_flush()
            else:
                self.reject(408, "request-header-timeout", "request header timeout")
        elif kind == BODY:
            self.closing = True
            if self.queue:
                self.queue[0].on_body_timeout()
            else:
                self.reject(408, "request-body-timeout", "request body timeout")
        elif kind == UPSTREAM:
            if self.queue:
                self.queue[0].on_upstream_timeout()
        elif kind == TUNNEL:
            self._close_after_flush()

    def shutdown(self) -> None:
        """Graceful stop: idle connections close now, busy ones after their response."""
        self.closing = True
        if not self.queue and self.parsing is None and self.tunnel is None:
            self._close_after_flush()
