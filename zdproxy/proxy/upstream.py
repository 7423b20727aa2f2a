"""Upstream side: one protocol per backend connection, and the idle pools.

An ``UpstreamConnection`` belongs to at most one ``Exchange`` at a time and
forwards parser events to it. When a response ends cleanly on a keep-alive
connection it goes back to its backend's idle stack (LIFO, so the warmest
connection is reused and cold ones expire), like aiohttp's connector.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from typing import TYPE_CHECKING, cast

import httptools

from zdproxy.balancing.model import Backend

if TYPE_CHECKING:
    from zdproxy.proxy.exchange import Exchange
    from zdproxy.proxy.tunnel import Tunnel

log = logging.getLogger("zdproxy.error")


def _response_parser(protocol: UpstreamConnection) -> httptools.HttpResponseParser:
    parser = httptools.HttpResponseParser(protocol)
    # a response with both Content-Length and chunked is read as chunked (RFC 9112
    # 6.3) and forwarded without the Content-Length; the exchange then discards the
    # connection. llhttp refuses such a response unless told otherwise.
    parser.set_dangerous_leniencies(lenient_chunked_length=True)
    return parser


class _HeadResponseDone(Exception):
    """Raised from a parser callback to stop parsing after a HEAD response's head."""


class UpstreamConnection(asyncio.Protocol):
    __slots__ = (
        "backend",
        "closed",
        "exchange",
        "got_bytes",
        "head_raw",
        "idle_since",
        "in_head",
        "parser",
        "pools",
        "reused",
        "transport",
        "tunnel_peer",
        "tunnel_ref",
    )

    def __init__(self, pools: UpstreamPools, backend: Backend) -> None:
        self.pools = pools
        self.backend = backend
        self.transport: asyncio.Transport | None = None
        self.parser = _response_parser(self)
        self.exchange: Exchange | None = None
        #: raw bytes of the response head being received (status line to blank line)
        self.head_raw = b""
        #: a request was sent and its response head has not been parsed yet
        self.in_head = False
        self.got_bytes = False
        self.reused = False
        self.closed = False
        self.idle_since = 0.0
        #: set when the connection became a tunnel: raw bytes go to this transport
        self.tunnel_peer: asyncio.Transport | None = None
        self.tunnel_ref: Tunnel | None = None

    # asyncio callbacks

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it
        self.transport = cast(asyncio.Transport, transport)
        self.pools.open_count += 1

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.pools.open_count -= 1
        self.pools.forget(self)
        if self.tunnel_ref is not None:
            self.tunnel_ref.close()
            return
        exchange = self.exchange
        if exchange is not None:
            self.exchange = None
            exchange.on_upstream_lost(self, exc)

    def data_received(self, data: bytes) -> None:
        peer = self.tunnel_peer
        if peer is not None:
            peer.write(data)
            return
        if self.exchange is None:
            # bytes on an idle connection: the backend is confused; never reuse it
            self.close()
            return
        self.got_bytes = True
        if self.in_head:
            self.head_raw = self.head_raw + data if self.head_raw else data
        try:
            self.parser.feed_data(data)
            exchange = self.exchange
            if exchange is not None and exchange.out:
                exchange.flush_response()
        except httptools.HttpParserUpgrade as upgrade:
            exchange = self.exchange
            if exchange is not None:
                exchange.on_upstream_upgraded(self, data[upgrade.args[0] :])
        except httptools.HttpParserCallbackError as exc:
            if isinstance(exc.__context__, _HeadResponseDone):
                self.parser = _response_parser(self)
            else:
                self._bad_response(exc)
        except httptools.HttpParserError as exc:
            self._bad_response(exc)

    def eof_received(self) -> bool | None:
        peer = self.tunnel_peer
        if peer is not None:
            if peer.can_write_eof():
                peer.write_eof()
            if self.tunnel_ref is not None:
                self.tunnel_ref.on_eof()
            return True  # keep the other direction open (half-close)
        return None

    def pause_writing(self) -> None:
        exchange = self.exchange
        if exchange is not None:
            exchange.conn.pause_reading()

    def resume_writing(self) -> None:
        exchange = self.exchange
        if exchange is not None:
            exchange.conn.resume_reading()

    # httptools callbacks

    # No on_header callback: the exchange reads the raw head in one piece, which
    # costs a few C-level scans instead of a Python call per header line.

    def expect_response(self) -> None:
        """A request was written: collect the raw head of its response."""
        self.in_head = True
        self.head_raw = b""

    def take_head(self, interim: bool) -> bytes:
        """The raw head just parsed (through its blank line)."""
        raw = self.head_raw
        end = raw.find(b"\r\n\r\n") + 4
        if interim:
            self.head_raw = raw[end:]  # the final response head follows
        else:
            self.in_head = False
            self.head_raw = b""
        return raw[:end]

    def on_headers_complete(self) -> None:
        exchange = self.exchange
        if exchange is None:
            return
        status = self.parser.get_status_code()
        exchange.on_response_head(
            self, status, self.take_head(100 <= status < 200 and status != 101)
        )
        if exchange.response_has_no_body and exchange.method == b"HEAD" and status >= 200:
            # llhttp cannot be told a response answers HEAD: finish here and reset
            exchange.on_response_complete(self, self.parser.should_keep_alive())
            raise _HeadResponseDone

    def on_body(self, body: bytes) -> None:
        exchange = self.exchange
        if exchange is not None:
            exchange.on_response_body(body)

    def on_message_complete(self) -> None:
        exchange = self.exchange
        if exchange is not None:
            exchange.on_response_complete(self, self.parser.should_keep_alive())

    # helpers

    def _bad_response(self, exc: Exception) -> None:
        exchange = self.exchange
        self.exchange = None
        self.close()
        if exchange is not None:
            exchange.on_bad_response(self, exc)

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()

    def abort(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.abort()


class UpstreamPools:
    """Idle keep-alive connections, per backend."""

    __slots__ = ("_idle", "max_idle", "open_count")

    def __init__(self, max_idle_per_backend: int) -> None:
        self.max_idle = max_idle_per_backend
        self._idle: dict[str, deque[UpstreamConnection]] = {}
        self.open_count = 0

    def acquire(self, backend: Backend) -> UpstreamConnection | None:
        """A live idle connection to ``backend``, or None: the caller connects."""
        stack = self._idle.get(backend.id)
        while stack:
            conn = stack.pop()
            transport = conn.transport
            if not conn.closed and transport is not None and not transport.is_closing():
                conn.reused = True
                conn.got_bytes = False
                return conn
        return None

    def release(self, conn: UpstreamConnection, now: float) -> None:
        """Keep ``conn`` for reuse, or close it when the stack is full."""
        conn.exchange = None
        if conn.closed or conn.backend.pool == "":
            conn.close()
            return
        stack = self._idle.get(conn.backend.id)
        if stack is None:
            stack = self._idle[conn.backend.id] = deque()
        if len(stack) >= self.max_idle:
            conn.close()
            return
        conn.idle_since = now
        stack.append(conn)

    def forget(self, conn: UpstreamConnection) -> None:
        stack = self._idle.get(conn.backend.id)
        if stack:
            try:
                stack.remove(conn)
            except ValueError:
                pass

    def backend_ids(self) -> list[str]:
        return [backend_id for backend_id, stack in self._idle.items() if stack]

    def idle_count(self, backend_id: str) -> int:
        stack = self._idle.get(backend_id)
        return len(stack) if stack else 0

    def close_backend(self, backend_id: str) -> None:
        """Close every idle connection to a backend (drained, removed)."""
        stack = self._idle.pop(backend_id, None)
        while stack:
            stack.pop().close()

    def sweep(self, now: float, max_idle_seconds: float) -> None:
        """Close connections idle longer than ``max_idle_seconds`` (oldest at the left)."""
        cutoff = now - max_idle_seconds
        for stack in self._idle.values():
            while stack and stack[0].idle_since < cutoff:
                stack.popleft().close()

    def close_all(self) -> None:
        for backend_id in list(self._idle):
            self.close_backend(backend_id)
