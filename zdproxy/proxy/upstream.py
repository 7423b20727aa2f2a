"""Upstream side: one protocol per backend connection, and the idle pools.

An ``UpstreamConnection`` belongs to at most one ``Exchange`` at a time and
forwards parser events to it. When a response ends cleanly on a keep-alive
connection it goes back to its backend's idle stack (LIFO, so the warmest
connection is reused and cold ones expire), like aiohttp's connector.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Callable
from typing import TYPE_CHECKING, Final, Protocol, cast

import httptools

from zdproxy.balancing.failures import Failure
from zdproxy.balancing.model import Backend
from zdproxy.errors import BadUpstreamResponse
from zdproxy.http.chunks import ChunkSizeGuard

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


class _StrayBytes(Exception):
    """Raised from a parser callback: bytes followed a complete response."""


#: Linux only (0 elsewhere): ask the kernel to acknowledge received data now
_TCP_QUICKACK: int = getattr(socket, "TCP_QUICKACK", 0)


class _SocketOptions(Protocol):
    """What ``get_extra_info("socket")`` gives (uvloop: a pseudo-socket, not a
    ``socket.socket``; a protocol, so compiled code does not check its class)."""

    def setsockopt(self, level: int, option: int, value: int, /) -> None: ...


#: "H", the first byte of a status line
_H: Final = 72


def not_connected_send(data: bytes) -> None:
    """A protocol's ``send`` until ``connection_made`` binds its transport's write."""
    raise RuntimeError("write before connection_made")


def not_connected_closing() -> bool:
    """A protocol's ``transport_closing`` until ``connection_made``: not usable."""
    return True


#: not known yet (``UpstreamConnection.last_keep_alive``)
_UNKNOWN: Final = -1
#: longer heads are not kept (``UpstreamConnection.last_head``; as ``http.head``'s
#: cache of rewritten heads)
_LAST_HEAD_MAX: Final = 2048


def _status_start(buf: bytes | bytearray, pos: int) -> int:
    """Where the status line starts: llhttp skips blank lines (CR, LF) before it."""
    while buf[pos] == 13 or buf[pos] == 10:
        pos += 1
    return pos


class UpstreamConnection(asyncio.Protocol):
    __slots__ = (
        "backend",
        "chunks",
        "closed",
        "exchange",
        "got_bytes",
        "head_buf",
        "head_held",
        "head_pos",
        "head_used",
        "idle_since",
        "in_head",
        "last_head",
        "last_is_current",
        "last_keep_alive",
        "last_status",
        "parser",
        "pools",
        "prefix",
        "prefix_cookie",
        "prefix_head",
        "prefix_pool",
        "reads",
        "repeat_size",
        "reusable",
        "reused",
        "send",
        "sock",
        "transport",
        "transport_closing",
        "tunnel_peer",
        "tunnel_ref",
    )

    def __init__(self, pools: UpstreamPools, backend: Backend) -> None:
        self.pools = pools
        self.backend = backend
        self.transport: asyncio.Transport | None = None
        #: the transport's write, bound once (connection_made): see ClientConnection.send
        self.send: Callable[[bytes], object] = not_connected_send
        self.transport_closing: Callable[[], bool] = not_connected_closing
        #: the TCP socket, to acknowledge a partial response at once (``_ack_now``);
        #: None where TCP_QUICKACK does not exist
        self.sock: _SocketOptions | None = None
        self.parser = _response_parser(self)
        self.exchange: Exchange | None = None
        # The response head is read raw. Usually it arrives whole in one read and
        # is sliced out of that read (``head_buf`` is the read itself, no copy); a
        # head split across reads is kept in ``head_held``, a bytearray extended in
        # place, so the work per read stays linear in the bytes read.
        #: a request was sent and its final response head has not been parsed yet
        self.in_head = False
        #: the last final head that began a read on this connection, kept whole
        #: (its end is its first blank line), its status, and llhttp's keep-alive
        #: answer at the end of a response with it (1, 0, or _UNKNOWN): a backend
        #: repeats its head for a second at a time (``on_headers_complete``)
        self.last_head = b""
        self.last_status = 0
        self.last_keep_alive = _UNKNOWN
        #: the size of a whole response with ``last_head``, once one ended cleanly
        #: on a kept-alive connection with a Content-Length body (-1: not known):
        #: a read of that size that starts with that head is that response again
        #: (``_relay_repeat``). Known only with ``last_keep_alive`` 1.
        self.repeat_size = -1
        #: the response being relayed has ``last_head`` (``_keep_alive``)
        self.last_is_current = False
        #: the last ``head_prefix`` made, and the three pieces it was made of
        self.prefix = b""
        self.prefix_head = b""
        self.prefix_pool = b""
        self.prefix_cookie = b""
        #: the bytes the parser is reading: this read, or ``head_held`` with it
        self.head_buf: bytes | bytearray | None = None
        #: the unfinished head from earlier reads (None: nothing held)
        self.head_held: bytearray | None = None
        #: where the current head starts in ``head_buf`` (after 1xx heads)
        self.head_pos = 0
        #: bytes of this response's heads before ``head_pos`` (1xx heads count too)
        self.head_used = 0
        #: follows the sizes of a chunked response body (None: not chunked)
        self.chunks: ChunkSizeGuard | None = None
        self.got_bytes = False
        self.reused = False
        #: reads taken from the backend: a response whose head and end come in the
        #: same read ends at the time its head came (``Exchange._record``)
        self.reads = 0
        self.closed = False
        #: the response ended cleanly: back to the pool once the read is parsed
        self.reusable = False
        self.idle_since = 0.0
        #: set when the connection became a tunnel: raw bytes go to this transport
        self.tunnel_peer: asyncio.Transport | None = None
        self.tunnel_ref: Tunnel | None = None

    # asyncio callbacks

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it
        self.transport = cast(asyncio.Transport, transport)
        self.send = self.transport.write
        self.transport_closing = self.transport.is_closing
        if _TCP_QUICKACK:
            self.sock = transport.get_extra_info("socket")
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
            # a backend that only pushes (a live feed) keeps its tunnel open too
            if self.tunnel_ref is not None:
                self.tunnel_ref.touch()
            return
        # a local, never `self.exchange is None`: mypy would keep self.exchange
        # narrowed across feed_data(), whose callbacks clear it, and compiled code
        # trusts the narrowing (docs/internals.md, "Build")
        exchange = self.exchange
        if exchange is None:
            # bytes on an idle connection: the backend is confused; never reuse it
            self._stray("bytes on an idle connection")
            return
        self.got_bytes = True
        self.reads += 1
        chunks = self.chunks
        if chunks is not None and not chunks.feed(data):
            self._bad_response(BadUpstreamResponse("chunk size too large"))
            return
        if self.in_head:
            held = self.head_held
            if held is None:
                if (
                    len(data) == self.repeat_size
                    and data.startswith(self.last_head)
                    and exchange.method != b"HEAD"
                ):
                    self._relay_repeat(exchange, data)
                    self._pool_if_done()
                    return
                self.head_buf = data
            else:
                held += data
                self.head_buf = held
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade as upgrade:
            exchange = self.exchange
            if exchange is not None:
                exchange.on_upstream_upgraded(self, data[upgrade.args[0] :])
            return
        except httptools.HttpParserCallbackError as exc:
            self._callback_error(exc)
        except httptools.HttpParserError as exc:
            self._bad_response(exc)
        else:
            if self.in_head and not self._hold_head():
                return
            exchange = self.exchange
            if exchange is not None:
                if not self.reusable:
                    self._ack_now()  # before relaying: the backend's rest comes sooner
                if exchange.out:
                    exchange.flush_response()
        # released only now: had bytes followed the response in this read, the
        # parser would have reported them (on_message_begin) first
        self._pool_if_done()

    def _pool_if_done(self) -> None:
        if self.reusable:
            self.reusable = False
            if not self.closed:
                self.pools.release(self, self.idle_since)

    def _relay_repeat(self, exchange: Exchange, data: bytes) -> None:
        """Relay ``data``, a whole response the same as the last one with
        ``last_head`` (its head the same bytes, so its Content-Length too), without
        the parser: the head and its answers (status, keep-alive, framing) are
        known, and what llhttp would do with these bytes is what it did with the
        last ones. The parser stays where that response left it, between
        messages. Saves llhttp's scan of the head and four callbacks (a 1 KiB
        response: about a fifth of the instructions of a request).

        The exchange hears what the parser's callbacks would have told it, in
        their order; an exception from it is a bad response, as from a callback.
        A HEAD is never answered here: a body after its head is a fault."""
        raw = self.last_head
        end = len(raw)
        if end > self.pools.max_head_bytes:
            # a reload lowered the limit under the head: refused as the parser's path does
            self._bad_response(BadUpstreamResponse("response head too large"))
            return
        self.in_head = False
        try:
            exchange.on_response_head(self, self.last_status, raw)
            if end < len(data) and self.exchange is exchange:
                exchange.on_response_body(data[end:])
            if self.exchange is exchange:
                exchange.on_response_complete(self, True)
        except Exception as exc:  # as llhttp turns an error in a callback into one
            self._bad_response(exc)

    def _ack_now(self) -> None:
        """After a read that left the response unfinished: acknowledge it now.

        A backend whose last segment waits for our ACK (Nagle, or nginx's
        sendfile with tcp_nopush, whose 64 KiB response goes as ~60 KiB and 4 KiB
        on loopback) would otherwise wait for the kernel's delayed ACK: 40 ms,
        the 64 KiB tail (docs/benchmarks.md). One system call per such read; none
        for a response that arrives whole."""
        sock = self.sock
        if sock is not None:
            try:
                sock.setsockopt(socket.IPPROTO_TCP, _TCP_QUICKACK, 1)
            except OSError:
                self.sock = None  # closed under us, or not TCP: never again

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
        """A request was written: collect the raw head of its response. (The other
        head fields are back at their rest values once a final head is taken.)"""
        self.in_head = True
        self.chunks = None
        self.last_is_current = False

    def head_prefix(self, head: bytes, pool_line: bytes, cookie_line: bytes) -> bytes:
        """The rewritten head, the pool line and the Set-Cookie line as one piece,
        kept while the three are the same objects (the head cache, the pool line
        and the pin of the second hand out the same objects while they repeat):
        two pieces fewer to join per response."""
        if (
            head is self.prefix_head
            and pool_line is self.prefix_pool
            and cookie_line is self.prefix_cookie
        ):
            return self.prefix
        prefix = self.prefix = head + pool_line + cookie_line
        self.prefix_head = head
        self.prefix_pool = pool_line
        self.prefix_cookie = cookie_line
        return prefix

    def _interim_head(self) -> bytes:
        """The raw 1xx head just parsed; the final head follows in the same bytes.

        The heads of one response, its 1xx heads included, share the budget
        ``limits.max_response_header_bytes``: an endless run of ``102
        Processing`` is refused like one endless header.
        """
        buf = self.head_buf
        assert buf is not None
        pos = self.head_pos
        start = _status_start(buf, pos)
        end = buf.find(b"\r\n\r\n", start) + 4
        used = self.head_used + end - pos
        if used > self.pools.max_head_bytes:
            raise BadUpstreamResponse("response head too large")
        self.head_used = used
        self.head_pos = end
        return bytes(buf[start:end])

    def _hold_head(self) -> bool:
        """Keep an unfinished head for the next read; False when it broke the limit."""
        buf = self.head_buf
        assert buf is not None
        pos = self.head_pos
        if self.head_used + len(buf) - pos > self.pools.max_head_bytes:
            self._bad_response(BadUpstreamResponse("response head too large"))
            return False
        if self.head_held is None:
            self.head_held = bytearray(memoryview(buf)[pos:])
            self.head_pos = 0
        self.head_buf = None
        return True

    def on_message_begin(self) -> None:
        if self.exchange is None:
            # the response ended and more bytes follow in the same read
            raise _StrayBytes

    def on_headers_complete(self) -> None:
        exchange = self.exchange
        if exchange is None:
            return
        buf = self.head_buf
        assert buf is not None
        pos = self.head_pos
        used = self.head_used
        if not pos and not used and isinstance(buf, bytes):
            # the usual case: a head alone at the start of one read; a backend
            # repeats its head (for a second at a time, until Date moves), and a
            # prefix compare (a memcmp) is cheaper than searching for its end
            # (and than asking llhttp for the status, a Python-level call)
            raw = self.last_head
            if raw and buf.startswith(raw) and len(raw) <= self.pools.max_head_bytes:
                self.in_head = False
                self.head_buf = None
                self.last_is_current = True
                self._final_head(exchange, self.last_status, buf, raw, len(raw))
                return
        status = self.parser.get_status_code()
        if 100 <= status < 200 and status != 101:
            exchange.on_response_head(self, status, self._interim_head())
            return
        # the final head, inline: this runs once per response
        start = pos if buf[pos] == _H else _status_start(buf, pos)
        # llhttp just found the end of this head: the first blank line after its
        # start is that end (searched once per head, never per read)
        end = buf.find(b"\r\n\r\n", start) + 4
        if used + end - pos > self.pools.max_head_bytes:
            raise BadUpstreamResponse("response head too large")
        self.in_head = False
        self.head_buf = None
        if used or not isinstance(buf, bytes):
            # after 1xx heads or a head split across reads: back to rest values
            head = bytes(buf[start:end])
            self.head_used = self.head_pos = 0
            self.head_held = None
        else:
            head = buf[start:end]
            if end - start <= _LAST_HEAD_MAX:
                # its first blank line is its end: a read that starts with it
                # has its head end there too (the prefix compare above)
                self.last_head = head
                self.last_status = status
                self.last_keep_alive = _UNKNOWN
                self.repeat_size = -1
                self.last_is_current = True
        self._final_head(exchange, status, buf, head, end)

    def _final_head(
        self, exchange: Exchange, status: int, buf: bytes | bytearray, head: bytes, end: int
    ) -> None:
        """Relay the final response ``head``, which ends at ``end`` in ``buf``."""
        if exchange.on_response_head(self, status, head):
            guard = ChunkSizeGuard()
            if not guard.feed(buf, end):
                raise BadUpstreamResponse("chunk size too large")
            self.chunks = guard
        if exchange.response_has_no_body and exchange.method == b"HEAD" and status >= 200:
            # llhttp cannot be told a response answers HEAD: finish here and reset
            exchange.on_response_complete(self, self.parser.should_keep_alive())
            if len(buf) > end:
                self._stray("a body after the head of a response to HEAD")
            raise _HeadResponseDone

    def on_body(self, body: bytes) -> None:
        exchange = self.exchange
        if exchange is not None:
            exchange.on_response_body(body)

    def on_message_complete(self) -> None:
        exchange = self.exchange
        if exchange is not None:
            repeatable = self.last_is_current and self.repeat_size < 0
            keep_alive = self._keep_alive()
            if repeatable and keep_alive:
                self._learn_size(exchange)
            exchange.on_response_complete(self, keep_alive)

    def _learn_size(self, exchange: Exchange) -> None:
        """Remember the size of a response with ``last_head`` (``repeat_size``)
        where its head alone sets it: a Content-Length body. (The caller checked
        keep-alive, which a body delimited by the close never has; a response
        whose framing is in doubt has both framings, so it is chunked, or no
        body, or its connection is not reused; a 1xx head is never ``last_head``.)"""
        if self.chunks is None and not exchange.response_has_no_body:
            self.repeat_size = len(self.last_head) + exchange.body_bytes

    def _keep_alive(self) -> bool:
        """llhttp's keep-alive answer for the response just ended. For a response
        with ``last_head`` it is a function of that head (version, Connection,
        framing; a HEAD's answer never gets here), so it is asked once per head (a
        Python-level call) and remembered with it."""
        # typed locals: where httptools has no type information (pip's isolated
        # build environment) its answers are Any, which mypyc refuses to return
        keep_alive: bool
        if not self.last_is_current:
            keep_alive = self.parser.should_keep_alive()
            return keep_alive
        self.last_is_current = False
        known = self.last_keep_alive
        if known != _UNKNOWN:
            return known == 1
        keep_alive = self.parser.should_keep_alive()
        self.last_keep_alive = 1 if keep_alive else 0
        return keep_alive

    # helpers

    def _callback_error(self, exc: httptools.HttpParserCallbackError) -> None:
        cause = exc.__context__
        if isinstance(cause, _HeadResponseDone):
            self.parser = _response_parser(self)
        elif isinstance(cause, _StrayBytes):
            self._stray("bytes after a complete response")
        else:
            self._bad_response(cause if isinstance(cause, Exception) else exc)

    def _stray(self, why: str) -> None:
        """The backend sent bytes no request asked for: the connection is out of
        step with it, so it is closed and never handed out again."""
        self.reusable = False
        if self.closed:
            return
        backend = self.backend
        errors = backend.upstream_errors
        errors[Failure.STRAY_BYTES.value] = errors.get(Failure.STRAY_BYTES.value, 0) + 1
        log.info("backend %s sent %s: connection closed", backend.id, why)
        self.pools.forget(self)
        self.close()

    def _bad_response(self, exc: Exception) -> None:
        self.reusable = False
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


#: how long a burst's peak of requests in flight keeps idle connections above the cap
PEAK_SECONDS = 10.0


class UpstreamPools:
    """Idle keep-alive connections, per backend."""

    __slots__ = ("_idle", "_peak", "_peak_until", "max_head_bytes", "max_idle", "open_count")

    def __init__(self, max_idle_per_backend: int, max_head_bytes: int = 65536) -> None:
        self.max_idle = max_idle_per_backend
        #: limits.max_response_header_bytes: every head of one response, 1xx included
        self.max_head_bytes = max_head_bytes
        #: per backend, oldest first (lists: pop and append are native calls when
        #: compiled, a deque's are Python-level method calls)
        self._idle: dict[str, list[UpstreamConnection]] = {}
        self.open_count = 0
        #: the most requests in flight to a backend lately, where above ``max_idle``:
        #: that many idle connections are kept (``release``); forgotten every
        #: PEAK_SECONDS by the sweep
        self._peak: dict[str, int] = {}
        self._peak_until = 0.0

    def acquire(self, backend: Backend) -> UpstreamConnection | None:
        """A live idle connection to ``backend``, or None: the caller connects."""
        in_flight = backend.in_flight
        if in_flight > self.max_idle:  # a burst above the cap (one compare otherwise)
            peak = self._peak
            if in_flight > peak.get(backend.id, 0):
                peak[backend.id] = in_flight
        stack = self._idle.get(backend.id)
        while stack:
            if len(stack) == 1:
                # clear(), not pop(), to empty it: see ClientConnection.response_finished
                conn = stack[0]
                stack.clear()
            else:
                conn = stack.pop()
            transport = conn.transport
            if not conn.closed and transport is not None and not conn.transport_closing():
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
            stack = self._idle[conn.backend.id] = []
        idle = len(stack)
        # above the cap, kept up to the recent peak of requests in flight: the next
        # burst finds its connections here, where closing them made every burst
        # connect anew (the c=200 tail, docs/benchmarks.md); 0: no pooling
        if idle >= self.max_idle and (
            not self.max_idle or idle >= self._peak.get(conn.backend.id, 0)
        ):
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
        """Idle pooled connections to a backend (the unit tests of pooling read it)."""
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
        if now >= self._peak_until:
            self._peak.clear()
            self._peak_until = now + PEAK_SECONDS
        for stack in self._idle.values():
            old = 0
            while old < len(stack) and stack[old].idle_since < cutoff:
                old += 1
            if old:
                expired = stack[:old]
                del stack[:old]
                for conn in expired:
                    conn.close()

    def close_all(self) -> None:
        for backend_id in list(self._idle):
            self.close_backend(backend_id)
