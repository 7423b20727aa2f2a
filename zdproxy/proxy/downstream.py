"""Client side: one protocol per client connection.

Callbacks stay thin: parser events go to the ``Exchange`` (one request) being
parsed; the connection keeps the queue of exchanges so pipelined requests are
answered in order, and the deadline the sweeper checks.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Final, cast

import httptools

from zdproxy.errors import ProxyError
from zdproxy.http.head import error_response
from zdproxy.http.rules import HeadChecker
from zdproxy.proxy.context import ProxyContext
from zdproxy.proxy.deadlines import (
    BODY,
    HEADER,
    IDLE,
    LINGER,
    NO_DEADLINE,
    RECLAIMED,
    TUNNEL,
    UPSTREAM,
)
from zdproxy.proxy.exchange import Exchange
from zdproxy.proxy.phases import PARSING
from zdproxy.proxy.tunnel import Tunnel
from zdproxy.proxy.upstream import not_connected_closing, not_connected_send

log = logging.getLogger("zdproxy.error")

#: pipelined requests parsed ahead of the one being answered before reading pauses
MAX_PIPELINE: Final = 8

#: how long a closing connection reads and drops what the client still sends, so
#: that a close with unread input (a TCP reset on Linux) does not destroy
#: responses already written (nginx's lingering_timeout is 5 s too)
LINGER_SECONDS: Final = 5.0


class ClientConnection(asyncio.Protocol):
    __slots__ = (
        "checker",
        "client_eof",
        "client_ip",
        "closing",
        "ctx",
        "deadline",
        "deadline_kind",
        "fed",
        "fwd_host",
        "fwd_lines",
        "head_bytes",
        "header_count",
        "host_line",
        "host_name",
        "host_value",
        "idle",
        "input_done",
        "line_bytes",
        "lingering",
        "parser",
        "parsing",
        "proto",
        "queue",
        "reading_paused",
        "reclaimed",
        "send",
        "trailer",
        "transport",
        "transport_closing",
        "trusted",
        "tunnel",
        "tunnel_ref",
        "valid_host",
        "xff_ip",
    )

    def __init__(self, ctx: ProxyContext, proto: bytes = b"http") -> None:
        self.ctx = ctx
        #: X-Forwarded-Proto for the requests of this connection: b"https" on a TLS
        #: listener (a value sent by a client is kept only from a trusted proxy)
        self.proto = proto
        self.transport: asyncio.Transport | None = None
        #: the transport's write and is_closing, bound once (connection_made): a
        #: call through a bound method skips the lookup that compiled code pays
        #: for ``transport.write(...)`` on every response
        self.send: Callable[[bytes], object] = not_connected_send
        self.transport_closing: Callable[[], bool] = not_connected_closing
        self.parser = httptools.HttpRequestParser(self)
        #: the request-head classifier, shared by this connection's requests in turn
        self.checker = HeadChecker()
        self.parsing: Exchange | None = None
        #: pipelined requests in order, the one being answered first (a list: its
        #: operations are native when compiled; it holds MAX_PIPELINE at most)
        self.queue: list[Exchange] = []
        self.closing = False
        #: the client half-closed after complete requests: close once they are answered
        self.client_eof = False
        self.reading_paused = False
        self.deadline = 0.0
        #: a ``proxy.deadlines.Deadline`` value, kept as a plain int
        self.deadline_kind = NO_DEADLINE
        self.head_bytes = 0
        self.header_count = 0
        #: bytes of the unfinished header line the parser holds (across reads)
        self.line_bytes = 0
        #: between requests of a keep-alive connection (in ctx.idle)
        self.idle = False
        #: a request was refused: nothing more is parsed, queued ones are answered
        self.input_done = False
        self.lingering = False
        #: a chunk header was parsed and no chunk data followed yet: maybe the last
        #: chunk, whose trailer lines the parser holds like header lines
        self.trailer = False
        #: closed to make room at limits.max_connections (counted in ctx.reclaiming)
        self.reclaimed = False
        self.client_ip = ""
        self.xff_ip = b""
        self.trusted = False
        #: the upstream transport once this connection became a tunnel
        self.tunnel: asyncio.Transport | None = None
        self.tunnel_ref: Tunnel | None = None
        #: the last Host value a request of this connection passed the Host check with
        self.valid_host: bytes | None = None
        #: the X-Forwarded-* lines last written for this connection, and their Host
        self.fwd_host: bytes | None = None
        self.fwd_lines = b""
        #: the end of the request line and the Host line last sent upstream for
        #: this connection, with the Host header's name and value it was built from
        self.host_line = b""
        self.host_name = b""
        self.host_value = b""
        #: the read being parsed when it began between requests (its first request
        #: line starts it), until that request's head is complete or the read is
        #: parsed (never held longer: an unfinished head must not keep its read
        #: alive): ``Exchange.headers_complete``
        self.fed: bytes | None = None

    # asyncio callbacks

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it
        self.transport = cast(asyncio.Transport, transport)
        self.send = self.transport.write
        self.transport_closing = self.transport.is_closing
        ctx = self.ctx
        ctx.connections.add(self)
        ctx.counters.connections_accepted += 1
        if len(ctx.connections) - ctx.reclaiming >= ctx.max_connections:
            ctx.at_connection_limit()
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
        if self.idle:
            self.idle = False
            del ctx.idle[self]
        elif self.reclaimed:
            ctx.reclaiming -= 1
        if ctx.accept_paused and len(ctx.connections) - ctx.reclaiming < ctx.max_connections:
            ctx.accept_paused = False
            ctx.accept_control(True)
        self.deadline_kind = NO_DEADLINE
        if self.tunnel_ref is not None:
            self.tunnel_ref.close()
        while self.queue:
            self.queue.pop(0).on_client_lost()
        if self.parsing is not None:
            self.parsing.on_client_lost()
            self.parsing = None

    def data_received(self, data: bytes) -> None:
        tunnel = self.tunnel
        if tunnel is not None:
            tunnel.write(data)
            if self.tunnel_ref is not None:
                self.tunnel_ref.touch()
            return
        if self.input_done:
            # a request was refused (reading is paused), or closing: input is read
            # only so that the close sends no reset, and never parsed again
            return
        parsing = self.parsing
        if (
            (parsing is None or parsing.phase == PARSING)
            and len(data) + self.line_bytes > self.ctx.max_header_bytes
            and self._line_over_limit(data)
        ):
            return
        if parsing is None:
            self.fed = data
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
            return
        finally:
            self.fed = None
        parsing = self.parsing
        if parsing is not None and (parsing.phase == PARSING or self.trailer):
            self._hold_partial_line(data)
        elif self.line_bytes:
            self.line_bytes = 0

    def _line_over_limit(self, data: bytes) -> bool:
        """Before parsing a large read in a head: a header line (or request line)
        that cannot end within limits.max_header_bytes is refused now, without
        handing it to the parser, which would keep it whole until its end."""
        room = self.ctx.max_header_bytes - self.line_bytes
        if data.find(b"\n", 0, max(room, 0)) >= 0:
            return False  # the line ends in time: the head's total is checked per header
        self.reject(431, "headers-too-large", "request header too large")
        return True

    def _hold_partial_line(self, data: bytes) -> None:
        """After a read that ended inside a head: the parser keeps the unfinished
        line (httptools reports a header only once it is complete), so the bytes
        held are bounded here, read by read. (The tail after the last LF may also
        count body bytes of an earlier pipelined request: an overestimate.)"""
        last = data.rfind(b"\n")
        if last < 0:
            self.line_bytes += len(data)
        else:
            self.line_bytes = len(data) - last - 1
        if self.line_bytes > self.ctx.max_header_bytes:
            self.reject(431, "headers-too-large", "request header too large")

    def eof_received(self) -> bool | None:
        if self.lingering:
            return False  # the client read everything and closed: close now
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
        if self.idle:
            self.idle = False
            del ctx.idle[self]
            if len(ctx.connections) - ctx.reclaiming >= ctx.max_connections:
                ctx.at_connection_limit()  # the last idle one to make room for is gone
        if not self.queue:
            self.set_deadline(HEADER, ctx.t_header)

    def on_url(self, url: bytes) -> None:
        exchange = self.parsing
        assert exchange is not None
        # llhttp hands the target over in one piece unless it spans reads; a
        # generic += on bytes costs a dispatch even when the left side is empty
        if exchange.url:
            exchange.url += url
        else:
            exchange.url = url
        self.head_bytes += len(url)
        if self.head_bytes > self.ctx.max_header_bytes:
            raise ProxyError("request target too large", status=431, cause="headers-too-large")

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
        fed = self.fed
        self.fed = None
        exchange.headers_complete(self.parser, fed)
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
        self.trailer = False
        exchange.on_request_body(body)

    def on_chunk_header(self) -> None:
        # httptools calls the chunk callbacks only for chunked bodies
        self.trailer = True

    def on_chunk_complete(self) -> None:
        self.trailer = False

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
            if len(queue) == 1:
                # emptied with clear(), not pop(): a list popped empty keeps a
                # 1-byte libc block, which the next request's append reallocs
                # (two libc calls a request; clear() frees to pymalloc instead)
                queue.clear()
            else:
                del queue[0]
        if self.transport is None or self.transport_closing():
            return
        if not keep_alive or self.closing:
            # input may be left unread (pipelined requests, a body cut short)
            self._close_after_flush(
                linger=self.input_done
                or self.reading_paused
                or self.parsing is not None
                or not exchange.request_done
            )
            return
        if queue:
            queue[0].start()
        elif self.client_eof:
            self._close_after_flush()
        elif self.input_done:
            self._close_after_flush(linger=True)
        elif self.parsing is None:
            self.set_deadline(IDLE, self.ctx.t_idle)
            self._enter_idle()
        if self.reading_paused and len(queue) < MAX_PIPELINE:
            self.resume_reading()

    def _enter_idle(self) -> None:
        ctx = self.ctx
        self.idle = True
        ctx.idle[self] = None
        if ctx.accept_paused:
            # at the limit: accept again, the next client takes this one's place
            ctx.resume_accepting()

    def _leave_idle(self) -> None:
        self.idle = False
        del self.ctx.idle[self]

    def reclaim(self) -> None:
        """Closed to make room at limits.max_connections: idle, between requests,
        so the close is clean (after anything still buffered, then FIN)."""
        self._leave_idle()
        self.reclaimed = True
        self.ctx.reclaiming += 1
        transport = self.transport
        # a client that does not read its last response holds the close: abort then
        self.set_deadline(RECLAIMED, LINGER_SECONDS)
        if transport is not None:
            transport.close()

    def pause_reading(self) -> None:
        if not self.reading_paused and self.transport is not None:
            self.reading_paused = True
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        # after a refused request nothing more is read (until the lingering close)
        if self.reading_paused and not self.input_done and self.transport is not None:
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
        self.input_done = True
        if broken is not None and not broken.method:
            # refused before its head was complete: the method may be known already
            # (for the access log); ask before the parser is replaced below
            try:
                broken.method = self.parser.get_method()
            except httptools.HttpParserError:
                pass
        # nothing more is parsed: let go of what the parser holds (up to a
        # head's worth of an unfinished line) now, not when the close completes
        self.parser = httptools.HttpRequestParser(self)
        if broken is not None and self.queue and self.queue[-1] is broken:
            # its head was accepted but its body is malformed: it never completes
            if len(self.queue) == 1:
                broken.on_request_error(ProxyError(message, status=status, cause=cause))
                return
            self.queue.pop()
        response = self._refusal(broken, status, cause, message)
        if self.queue:
            # earlier pipelined requests are still due: every one is answered in
            # order, then this error, then the connection closes
            last = self.queue[-1]
            if last.client_keep_alive:
                last.after_reject = response
            # else that request closes the connection: bytes after it get no answer
            return
        transport.write(response)
        self._close_after_flush(linger=True)

    def _refusal(self, broken: Exchange | None, status: int, cause: str, message: str) -> bytes:
        """The error response for a request refused by the connection, logged."""
        ctx = self.ctx
        extra = b""
        request_id = None
        ids = ctx.request_ids
        if ids is not None:
            if broken is None:
                request_id = ids.new()
                extra = ids.line(request_id)
            else:
                extra = broken.id_line()
                request_id = broken.request_id
        response = error_response(status, cause, message, extra=extra)
        head_end = response.index(b"\r\n\r\n") + 4
        if broken is not None and broken.method == b"HEAD":
            response = response[:head_end]
        access = ctx.access_log
        if access is not None:
            access.add_rejected(self, broken, status, cause, len(response) - head_end, request_id)
        return response

    def _close_after_flush(self, linger: bool = False) -> None:
        """Close once written. ``linger``: the client may still be sending (we
        stopped reading mid-stream): closing a socket with unread input makes
        Linux send a reset, and the client's TCP then drops responses it had not
        read yet. So shut down our side (FIN after the last byte), read and
        drop the client's input until it closes, for LINGER_SECONDS at most."""
        transport = self.transport
        self.deadline_kind = NO_DEADLINE
        if self.idle:
            self._leave_idle()
        if transport is None:
            return
        if linger and not self.client_eof and transport.can_write_eof():
            self.lingering = True
            self.input_done = True
            transport.write_eof()
            self.set_deadline(LINGER, LINGER_SECONDS)
            self.reading_paused = False
            transport.resume_reading()
        else:
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
        elif kind in (LINGER, RECLAIMED) and self.transport is not None:
            self.transport.abort()

    def shutdown(self, grace: float = 0.0) -> None:
        """Graceful stop: idle connections close now, busy ones after their response.

        With ``grace`` (a hot upgrade), a connection waiting for a request stays
        open that much longer: a busy keep-alive client sends its next request
        within it and gets ``Connection: close`` on the answer, instead of
        racing its request against our close (which it would see as a reset).
        """
        self.closing = True
        if not self.queue and self.parsing is None and self.tunnel is None:
            waiting = self.idle or (self.deadline_kind == HEADER and self.head_bytes == 0)
            if grace > 0 and waiting:
                self.deadline = min(self.deadline, self.ctx.now + grace)
                return
            self._close_after_flush()
