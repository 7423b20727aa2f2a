"""One request and its response: the per-request state object.

Stages, each a short method: parse (``add_header``, ``headers_complete``),
select (``start``), connect (``_connect``), send (``_attach``, body
streaming), relay (``on_response_*``), finish (``_finish``). Failures before
the first response byte may be retried on another backend; after it, the
client connection is closed so a truncated answer is never passed off as whole.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Final

import httptools

from zdproxy.balancing.failures import LOCAL, Failure
from zdproxy.balancing.model import Backend, BackendState
from zdproxy.balancing.retry import may_retry
from zdproxy.balancing.selector import RouteHints, WeightedSelector
from zdproxy.errors import (
    BadRequest,
    BadUpstreamResponse,
    NoBackend,
    ProxyError,
    UpstreamConnectError,
    UpstreamTimeout,
)
from zdproxy.http.head import (
    CONTINUE_100,
    LAST_CHUNK,
    RESPONSE_BAD_CODING,
    RESPONSE_BOTH_FRAMINGS,
    RESPONSE_CHUNKED,
    RESPONSE_HAS_LENGTH,
    announces_body,
    connection_tokens,
    error_response,
    rewrite_response_head,
)
from zdproxy.http.requestid import id_in_end
from zdproxy.http.routes import RouteTable, strip
from zdproxy.http.rules import HTTP_VERSIONS, NAME_CODE_BITS, ODD_NAME, Tier, name_code
from zdproxy.http.target import TargetError, split_absolute, valid_host
from zdproxy.proxy.deadlines import UPSTREAM
from zdproxy.proxy.fdlimit import OUT_OF_FDS
from zdproxy.proxy.phases import (
    AWAITING,
    CONNECTING,
    DISPATCHING,
    DONE,
    ILLEGAL,
    MOVES,
    PARSING,
    QUEUED,
    RELAYING,
    TUNNEL,
    illegal_move,
)
from zdproxy.proxy.upstream import UpstreamConnection

if TYPE_CHECKING:
    from zdproxy.balancing.selector import Selector
    from zdproxy.proxy.downstream import ClientConnection
    from zdproxy.proxy.shadow import ShadowCopy

log = logging.getLogger("zdproxy.error")

IDEMPOTENT: Final = frozenset({b"GET", b"HEAD", b"OPTIONS", b"PUT", b"DELETE", b"TRACE"})

# what on_header does with a request header, by lower-case name
_FORWARD: Final = 0
_HOST: Final = 1
_CONNECTION: Final = 2
_DROP: Final = 3
_XFF: Final = 4
_XFWD: Final = 5
_COOKIE: Final = 6
_EXPECT: Final = 7
_UPGRADE: Final = 8
_IDEM_KEY: Final = 9
_WS_KEY: Final = 10
_TE: Final = 11
_REQUEST_ID: Final = 12
_OVERRIDE: Final = 13  # forwarded, and it names the pool (routing.header)

#: entries the header table may grow to with names remembered as sent (``add_header``)
_KINDS_REMEMBERED: Final = 512
_CODE_MASK: Final = (1 << NAME_CODE_BITS) - 1

_REQUEST_HEADER_KIND: dict[bytes, int] = {
    b"host": _HOST,
    b"connection": _CONNECTION,
    b"keep-alive": _DROP,
    b"proxy-connection": _DROP,
    b"te": _DROP,
    b"trailer": _DROP,
    b"transfer-encoding": _TE,  # chunked is re-done by the proxy, other codings kept
    b"content-length": _DROP,
    b"proxy-authorization": _DROP,
    b"upgrade": _UPGRADE,
    b"x-forwarded-for": _XFF,
    b"x-forwarded-proto": _XFWD,
    b"x-forwarded-host": _XFWD,
    b"cookie": _COOKIE,
    b"expect": _EXPECT,
    b"idempotency-key": _IDEM_KEY,
    b"sec-websocket-key": _WS_KEY,
    # the default shadow marker reaches backends only on the proxy's own copies: a
    # client cannot pass a live request off as a shadow one (see proxy.shadow)
    b"x-zdproxy-shadow": _DROP,
}

#: request headers a client's Connection header may not make hop-by-hop
_NEVER_HOP_BY_HOP: Final = frozenset({b"host"})


def header_kinds(request_id_header: bytes | None) -> dict[bytes, int]:
    """The table ``add_header`` uses, with the request-ID header (lower case) when
    request IDs are on: the proxy then writes that header itself. An entry is the
    header's kind shifted left by ``NAME_CODE_BITS``, with the request checker's
    code of its name (``rules.name_code``) in the low bits: one lookup per header
    serves both."""
    kinds = dict(_REQUEST_HEADER_KIND)
    if request_id_header is not None:
        kinds[request_id_header] = _REQUEST_ID
    return {name: _entry(kind, name) for name, kind in kinds.items()}


def _entry(kind: int, name: bytes) -> int:
    return kind << NAME_CODE_BITS | name_code(name)


#: request body chunks held before the upstream is connected, before reading pauses
_PENDING_LIMIT: Final = 256 * 1024

#: what ``_let_go`` does with the upstream connection
_POOL: Final = 0  # back to its backend's idle pool (a clean end on a keep-alive connection)
_CLOSE: Final = 1  # closed after what was written to it
_ABORT: Final = 2  # reset now (a cut response, a hung backend, the client gone)


class Exchange(RouteHints):
    __slots__ = (
        "after_reject",
        "attempts",
        "backend",
        "body_bytes",
        "checker",
        "chunk_out",
        "client_keep_alive",
        "conn",
        "connection_tokens",
        "content_length",
        "expect_continue",
        "expects_body",
        "extra_headers",
        "forwarded",
        "framing_doubtful",
        "head_at",
        "head_read",
        "host",
        "host_name",
        "id_end",
        "idempotent",
        "method",
        "out",
        "out_head",
        "pending",
        "pending_bytes",
        "phase",
        "received_body",
        "replay",
        "replay_lost",
        "request_chunked",
        "request_done",
        "request_head",
        "request_id_in",
        "response_close_delimited",
        "response_has_no_body",
        "response_sent",
        "selector",
        "shadow",
        "started_at",
        "status",
        "te_codings",
        "upgrade",
        "upgrade_data",
        "upstream",
        "upstream_keep_alive",
        "upstream_url",
        "url",
        "version",
        "ws_key",
        "xff",
        "xfwd",
    )

    def __init__(self, conn: ClientConnection) -> None:
        self.conn = conn
        self.url = b""
        self.method = b""
        self.version = "1.1"
        #: where the exchange is in its life (``proxy.phases``); moved by ``_to`` only
        #: (a ``proxy.phases.Phase`` value, kept as a plain int)
        self.phase: int = PARSING
        self.forwarded: list[bytes] = []
        # the connection's checker, reset: one head is checked at a time (no allocation)
        checker = self.checker = conn.checker
        checker.reset()
        self.host: bytes | None = None
        #: the Host header's name as sent, when it is the first header forwarded:
        #: its line then goes with the request line, built once per connection
        #: (``_build_request_head``); else None and it is in ``forwarded``
        self.host_name: bytes | None = None
        self.connection_tokens: list[bytes] | None = None
        self.xff: bytes | None = None
        self.xfwd: list[tuple[bytes, bytes]] | None = None
        self.extra_headers: list[tuple[bytes, bytes]] | None = None
        self.pool_override: str | None = None
        self.affinity: str | None = None
        self.hash_key: str | None = None
        self.set_cookie: bytes | None = None
        self.expect_continue = False
        self.upgrade: bytes | None = None
        #: bytes the client sent behind its upgrade request: only a 101 lets them on
        self.upgrade_data = b""
        #: transfer codings applied before chunked (gzip, ...): they travel on
        self.te_codings: bytes | None = None
        self.ws_key = False
        self.idempotent = False
        self.client_keep_alive = True
        self.request_chunked = False
        self.content_length: int | None = None
        self.expects_body = False
        self.request_head = b""
        self.request_done = False
        self.received_body = 0
        #: request body read before an upstream connection was attached (None: none;
        #: both lists are made on first use: most requests have no body)
        self.pending: list[bytes] | None = None
        self.pending_bytes = 0
        #: request body sent upstream and kept for a retry, up to retry_buffer
        self.replay: list[bytes] | None = None
        #: part of the body went upstream and was not kept: no retry can resend it
        self.replay_lost = False
        self.backend: Backend | None = None
        #: the service's selector (a route chose it; None: no route matched, 404)
        self.selector: Selector | None = conn.ctx.selector
        #: the target sent upstream when a route's strip_prefix changed it
        self.upstream_url: bytes | None = None
        self.upstream: UpstreamConnection | None = None
        self.attempts = 0
        self.started_at = 0.0
        #: loop time of the response head, and response body bytes: for the access log
        self.head_at = 0.0
        #: the upstream connection's read the head came in (``UpstreamConnection.reads``)
        self.head_read = -1
        self.body_bytes = 0
        #: the request-ID header as the client sent it, and the header line of the
        #: ID the request goes by (``request_id``) with the blank line that ends a
        #: head: the last piece of both heads, as is (``RequestIds.resolve_end``)
        self.request_id_in: bytes | None = None
        self.id_end: bytes | None = None
        self.status = 0
        #: response bytes were written to the client (before that, an error can
        #: still be answered in their place)
        self.response_sent = False
        self.response_has_no_body = False
        self.response_close_delimited = False
        #: a response with CL and chunked, or an Ambiguous request let through (lenient):
        #: the upstream connection is never reused
        self.framing_doubtful = False
        self.chunk_out = False
        self.upstream_keep_alive = False
        self.after_reject: bytes | None = None
        #: response bytes produced during the current upstream read, not yet written
        self.out: list[bytes] | None = None
        #: pieces of ``out`` beyond the first that are the response head's lines
        self.out_head = 0
        #: the copy of this request sent to the shadow pool (``proxy.shadow``), set
        #: when the request is picked; the exchange tells it what the live request
        #: does at the few points it cares about (start, body, complete, record)
        self.shadow: ShadowCopy | None = None

    # ---- parse -------------------------------------------------------------

    def add_header(self, name: bytes, value: bytes) -> None:
        kinds = self.conn.ctx.header_kinds
        # by the name as sent: a name seen before is in the table (``_kind_of``)
        entry = kinds.get(name)
        if entry is None:
            entry = self._kind_of(name, kinds)
        self.checker.coded_header(name, value, entry & _CODE_MASK)
        kind = entry >> NAME_CODE_BITS
        if kind == _FORWARD:
            self.forwarded += (name, b": ", value, b"\r\n")
        elif kind == _OVERRIDE:
            self.pool_override = value.decode("latin-1").strip()
            self.forwarded += (name, b": ", value, b"\r\n")
        elif kind == _HOST:
            forwarded = self.forwarded
            if not forwarded and self.host is None:
                self.host_name = name  # the first line: see _build_request_head
            else:
                first = self.host_name
                if first is not None and self.host is not None:
                    # a second Host (lenient mode forwards it): both go as sent
                    forwarded[0:0] = (first, b": ", self.host, b"\r\n")
                    self.host_name = None
                forwarded += (name, b": ", value, b"\r\n")
            self.host = value
        elif kind == _COOKIE:
            self._parse_cookie(value)
            self.forwarded += (name, b": ", value, b"\r\n")
        elif kind == _CONNECTION:
            if self.connection_tokens is None:
                self.connection_tokens = []
            self.connection_tokens.append(value)
        elif kind == _XFF:
            self.xff = value if self.xff is None else self.xff + b", " + value
        elif kind == _XFWD:
            if self.xfwd is None:
                self.xfwd = []
            self.xfwd.append((name.lower(), value))
        elif kind == _EXPECT:
            if value.strip().lower() == b"100-continue":
                self.expect_continue = True
            else:
                raise _reject(417, "expectation-failed", "unsupported expectation")
        elif kind == _UPGRADE:
            self.upgrade = value
        elif kind == _IDEM_KEY:
            self.idempotent = True
            self.forwarded += (name, b": ", value, b"\r\n")
        elif kind == _WS_KEY:
            self.ws_key = True
            self.forwarded += (name, b": ", value, b"\r\n")
        elif kind == _TE:
            for item in value.split(b","):
                coding = item.split(b";", 1)[0].strip(b" \t").lower()
                if coding and coding != b"chunked" and coding != b"identity":
                    codings = self.te_codings
                    self.te_codings = coding if codings is None else codings + b", " + coding
        elif kind == _REQUEST_ID:
            # the proxy writes this header itself; sent twice, it is not one valid ID
            self.request_id_in = value if self.request_id_in is None else b""
        # _DROP: hop-by-hop, or framing the proxy redoes itself

    def _kind_of(self, name: bytes, kinds: dict[bytes, int]) -> int:
        """The table entry (``header_kinds``) for a header ``name`` (any case) the
        table does not hold as sent: its kind looked up in lower case (the routing
        override header is one to forward too, ``_OVERRIDE``), its checker code
        from the name as sent, then remembered under that name. The table is the
        context's, rebuilt with the override header on every reload; the names
        remembered are bounded."""
        lname = name.lower()
        known = kinds.get(lname)
        if known is not None:
            kind = known >> NAME_CODE_BITS
        else:
            kind = _OVERRIDE if lname == self.conn.ctx.override_header else _FORWARD
        entry = _entry(kind, name)
        # a name the checker finds odd is analysed whole every time, never remembered
        if entry & _CODE_MASK != ODD_NAME and len(kinds) < _KINDS_REMEMBERED:
            kinds[name] = entry
        return entry

    def _parse_cookie(self, value: bytes) -> None:
        ctx = self.conn.ctx
        if ctx.override_cookie is None and not ctx.selector_wants_affinity:
            return
        for part in value.decode("latin-1").split(";"):
            key, _, val = part.strip().partition("=")
            if key == ctx.override_cookie and val:
                self.pool_override = val
            elif key == ctx.affinity_cookie and val:
                self.affinity = val

    def headers_complete(self, parser: httptools.HttpRequestParser, read: bytes | None) -> None:
        """The head is parsed: check it, route it and build the head sent upstream.
        ``read`` is the read the request began at the first byte of, when the
        whole head came in that read (``ClientConnection.fed``): its request line
        gives the version without ``parser.get_http_version()``, which formats a
        ``str`` each call, and a GET's method without ``parser.get_method()``."""
        # a read that starts with "GET ": the request line llhttp parsed starts it
        method = _GET if read is not None and read.startswith(b"GET ") else parser.get_method()
        self.method = method
        line = _line_version(read, method, self.url) if read is not None else 0
        if line == 11:
            version = "1.1"
            token = b"HTTP/1.1"
        elif line == 10:
            version = "1.0"
            token = b"HTTP/1.0"
        else:
            version = parser.get_http_version()
            token = HTTP_VERSIONS.get(version) or b"HTTP/" + version.encode("ascii")
        self.version = version
        checker = self.checker
        verdict = checker.verdict(method, self.url, token)
        ctx = self.conn.ctx
        if verdict.tier >= Tier.AMBIGUOUS and (ctx.strict or verdict.tier == Tier.SEVERE):
            if verdict.kind == "UnsupportedVersion":  # HTTP/2.0 and later on an HTTP/1 port
                raise _reject(505, "bad-version", verdict.reason)
            raise _reject(400, "bad-request", verdict.reason)
        if verdict.tier == Tier.AMBIGUOUS:
            # lenient mode: forward, then close both connections after the response
            self.conn.closing = True
            self.framing_doubtful = True
        self.request_chunked = checker.chunked
        self.content_length = checker.content_length
        self.expects_body = self.request_chunked or bool(self.content_length)
        max_body = ctx.max_body
        if max_body and self.content_length is not None and self.content_length > max_body:
            raise _reject(413, "body-too-large", "request body too large")
        host = self.host
        if host is None:
            if version == "1.1":
                raise _reject(400, "bad-request", "HTTP/1.1 request without Host")
        elif host != self.conn.valid_host:
            if not valid_host(host.rstrip(b" \t")):
                # "a b", empty, control bytes, userinfo: a backend or a log would
                # read another host than the one the proxy routed and checked
                raise _reject(400, "bad-host", "invalid Host header")
            # a connection's requests name the same host: checked once
            self.conn.valid_host = host
        if version == "1.1" and self.connection_tokens is None:
            # no Connection header: HTTP/1.1 keeps the connection (llhttp's answer,
            # without a Python-level call)
            self.client_keep_alive = True
        else:
            self.client_keep_alive = parser.should_keep_alive()
        if method == b"GET" or method in IDEMPOTENT:  # a compare before the set lookup
            self.idempotent = True
        if self.upgrade is not None and not parser.should_upgrade():
            self.upgrade = None
        if method == b"CONNECT":
            # a reverse proxy opens no tunnels to where the client says
            raise _reject(400, "bad-request", "CONNECT is not supported")
        if self.upgrade is not None and self.expects_body:
            # llhttp switches the stream right after the head: the body's bytes
            # would be taken for tunnel data and the request never complete
            raise _reject(400, "bad-request", "upgrade request with a body")
        url = self.url
        if url[:1] != b"/" and url != b"*":
            self._to_origin_form()
        routes = ctx.routes
        if routes is not None:
            self._route(routes)
        self.request_head = self._build_request_head()
        # shadow traffic: one subtraction and one comparison for a request not copied
        # (copies go to a pool of the default service: only its requests are copied)
        if self.selector is ctx.selector:
            ctx.shadow_acc -= ctx.shadow_step
            if ctx.shadow_acc < 0:
                ctx.shadow.sample(self)
        self._to(QUEUED)

    def _route(self, routes: RouteTable[Selector]) -> None:
        """Pick the service by host and path (``zdproxy.http.routes``)."""
        found = routes.match(self.host, self.url, self.method, self._header)
        if found is None:
            self.selector = routes.default
            return
        self.selector = found.target
        if found.strip:
            self.upstream_url = strip(self.url, found.strip)

    def _header(self, name: bytes) -> bytes | None:
        """A request header's value by lower-case name (routes match on them)."""
        if name == b"host" and self.host_name is not None:
            return self.host
        forwarded = self.forwarded
        for i in range(0, len(forwarded), 4):
            if forwarded[i].lower() == name:
                return forwarded[i + 2]
        return None

    def _to_origin_form(self) -> None:
        """An absolute-form target (``GET http://host/p``) goes on as ``/p`` with
        ``Host: host``: the target's authority replaces the Host header (RFC 9112
        3.2.2), so the backend never sees a host other than the one checked here."""
        try:
            target = split_absolute(self.url)
        except TargetError as exc:
            raise _reject(400, "bad-target", str(exc)) from None
        self.url = target.origin_form
        authority = target.authority
        self.host = authority
        forwarded = self.forwarded
        replaced = False
        for i in range(0, len(forwarded), 4):
            if forwarded[i].lower() == b"host":
                forwarded[i + 2] = authority
                replaced = True
        if not replaced and self.host_name is None:
            forwarded += (b"Host", b": ", authority, b"\r\n")

    def _build_request_head(self) -> bytes:
        conn = self.conn
        tokens = self.connection_tokens
        forwarded = self.forwarded
        if tokens is not None:
            # Host is never hop-by-hop, whatever Connection names (the
            # X-Forwarded-* the proxy writes are added below, after this)
            names = connection_tokens(tokens) - _NEVER_HOP_BY_HOP
            forwarded = self._drop_connection_named(forwarded, names)
        url = self.url if self.upstream_url is None else self.upstream_url
        host_name = self.host_name
        if host_name is None:
            line_end = b" HTTP/1.1\r\n"
        else:
            # the request line's end and the Host line: a connection's requests
            # repeat them, so they are one piece, built once (fewer to join)
            host = self.host
            if host != conn.host_value or host_name != conn.host_name:
                assert host is not None
                conn.host_line = b" HTTP/1.1\r\n%s: %s\r\n" % (host_name, host)
                conn.host_value = host
                conn.host_name = host_name
            line_end = conn.host_line
        method = self.method
        parts = [_GET_SP, url, line_end] if method is _GET else [method, b" ", url, line_end]
        parts += forwarded
        if conn.trusted and (self.xff is not None or self.xfwd):
            parts.append(self._forwarding_kept())
        else:
            # the usual case: the lines depend on the connection and the Host only,
            # and a connection's requests name one host: built once, then reused
            host = self.host
            if host is None or host != conn.fwd_host:
                conn.fwd_lines = _forwarding(conn.xff_ip, conn.proto, host)
                conn.fwd_host = host
            parts.append(conn.fwd_lines)
        if self.request_chunked:
            if self.te_codings is None:
                parts.append(b"Transfer-Encoding: chunked\r\n")
            else:
                parts += (b"Transfer-Encoding: ", self.te_codings, b", chunked\r\n")
        elif self.content_length is not None:
            parts.append(b"Content-Length: %d\r\n" % self.content_length)
        if self.upgrade is not None:
            parts += (b"Connection: upgrade\r\nUpgrade: ", self.upgrade, b"\r\n")
        # without a Host (HTTP/1.0), the head stays open: _attach adds the backend's
        ids = conn.ctx.request_ids
        if ids is not None:
            end = self.id_end = ids.resolve_end(self.request_id_in)
            parts.append(end if self.host is not None else end[:-2])
        elif self.host is not None:
            parts.append(b"\r\n")
        return b"".join(parts)

    def _forwarding_kept(self) -> bytes:
        """The X-Forwarded-* lines for a trusted client that sent its own: its
        X-Forwarded-For extended, its X-Forwarded-Proto and -Host kept."""
        conn = self.conn
        xff = self.xff
        kept = dict(self.xfwd) if self.xfwd else {}
        return _forwarding(
            conn.xff_ip if xff is None else xff + b", " + conn.xff_ip,
            kept.get(b"x-forwarded-proto", conn.proto),
            kept.get(b"x-forwarded-host", self.host),
        )

    @staticmethod
    def _drop_connection_named(forwarded: list[bytes], names: frozenset[bytes]) -> list[bytes]:
        """Remove headers that ``Connection`` names (they are hop-by-hop)."""
        out: list[bytes] = []
        for i in range(0, len(forwarded), 4):
            if forwarded[i].lower() not in names:
                out += forwarded[i : i + 4]
        return out

    # ---- select and connect -------------------------------------------------

    def start(self) -> None:
        """Called when this exchange reaches the head of its connection's queue."""
        conn = self.conn
        ctx = conn.ctx
        self.started_at = ctx.clock()
        ctx.requests += 1
        if ctx.hash_on is not None:
            self.hash_key = self._hash_key(ctx.hash_on)
        if self.upgrade is not None and self.upgrade.lower() == b"websocket" and not self.ws_key:
            self.fail(BadRequest("WebSocket upgrade without Sec-WebSocket-Key"))
        else:
            self._to(DISPATCHING)
            self._dispatch(None)
        shadow = self.shadow
        if shadow is not None:
            shadow.on_start(self)

    def _hash_key(self, header: bytes) -> str | None:
        """What ``sticky.mode: hash`` hashes: the client address, or a header's value."""
        if not header:
            return self.conn.client_ip
        value = self._header(header)
        return None if value is None else value.decode("latin-1")

    def _dispatch(self, exclude: Backend | None) -> None:
        """Choose a backend (the first attempt, or a retry: ``exclude`` failed) and
        send the request on a pooled connection to it, or open one (in DISPATCHING)."""
        ctx = self.conn.ctx
        selector = self.selector
        if selector is None:
            self.fail(_reject(404, "no-route", "no route for this request"))
            return
        if isinstance(selector, WeightedSelector):
            backend = selector.select(self, exclude)  # a direct call when compiled
        else:
            backend = selector.select(self, exclude)
        if backend is None:
            self.fail(NoBackend("no healthy backend"))
            return
        self.backend = backend
        self.attempts += 1
        upstream = ctx.upstreams.acquire(backend)
        if upstream is not None:
            self._to(AWAITING)
            self._attach(upstream)
        else:
            self._to(CONNECTING)
            ctx.loop.create_task(self._connect(backend))

    async def _connect(self, backend: Backend) -> None:
        ctx = self.conn.ctx
        try:
            async with asyncio.timeout(ctx.t_connect):
                # a pool (or backend) with tls: the handshake is part of the connect
                tls = ctx.upstream_tls.lookup(backend.id, backend.pool, backend.service)
                _, upstream = await ctx.loop.create_connection(
                    lambda: UpstreamConnection(ctx.upstreams, backend),
                    backend.host,
                    backend.port,
                    ssl=None if tls is None else tls.context,
                    server_hostname=None if tls is None else tls.server_name or backend.host,
                )
        except (OSError, TimeoutError) as exc:
            self._on_connect_failed(backend, exc)
            return
        if self.phase != CONNECTING or self.backend is not backend:
            upstream.close()  # the exchange ended, or moved on, while this connected
            return
        self._to(AWAITING)
        self._attach(upstream)

    def _on_connect_failed(self, backend: Backend, exc: BaseException) -> None:
        if isinstance(exc, OSError) and exc.errno in OUT_OF_FDS:
            self._out_of_fds(exc)
            return
        kind = Failure.CONNECT_TIMEOUT if isinstance(exc, TimeoutError) else Failure.CONNECT_REFUSED
        self._failed(backend, kind)
        if self.phase != CONNECTING or self.backend is not backend:
            return  # the exchange ended, or moved on, while this connected
        self._retry_or_fail(
            kind, None, UpstreamConnectError(f"cannot connect to backend {backend.id}: {exc}")
        )

    def _out_of_fds(self, exc: OSError) -> None:
        """No descriptor for an upstream connection: this process's limit, not the
        backend's fault (no ejection, no retry elsewhere: it would fail the same)."""
        ctx = self.conn.ctx
        ctx.out_of_fds("connecting to a backend", exc)
        ctx.upstreams.close_all()  # idle ones only: descriptors back for the next requests
        self.fail(
            ProxyError("proxy out of file descriptors", status=503, cause="local-resource-limit")
        )

    def _attach(self, upstream: UpstreamConnection) -> None:
        self.upstream = upstream
        upstream.exchange = self
        transport = upstream.transport
        assert transport is not None
        conn = self.conn
        if self.expect_continue and not self.request_done and self.attempts == 1:
            assert conn.transport is not None
            conn.transport.write(CONTINUE_100)
        upstream.expect_response()
        if self.request_done:
            conn.set_deadline(UPSTREAM, conn.ctx.t_upstream)
        chunked = self.request_chunked
        replay = self.replay
        pending = self.pending
        if self.host is not None and not chunked and not replay and not pending:
            upstream.send(self.request_head)  # the usual request: its head, one buffer
            return
        parts = [self.request_head]
        if self.host is None:
            parts += (b"Host: ", upstream.backend.address.encode("ascii"), b"\r\n\r\n")
        if replay:
            parts += (_frame(c) for c in replay) if chunked else replay
        if pending:
            parts += (_frame(c) for c in pending) if chunked else pending
            if not self.replay_lost:
                if replay is None:
                    self.replay = pending
                else:
                    replay += pending
            self.pending = None
            self.pending_bytes = 0
            conn.resume_reading()
        if self.request_done and chunked:
            parts.append(LAST_CHUNK)
        transport.writelines(parts)

    # ---- request body ------------------------------------------------------

    def on_request_body(self, data: bytes) -> None:
        self.received_body += len(data)
        conn = self.conn
        max_body = conn.ctx.max_body
        if max_body and self.received_body > max_body:
            self.client_keep_alive = False
            if conn.queue and conn.queue[0] is self:
                if self.phase == RELAYING:
                    self._truncated("request body too large")
                else:
                    self.fail(
                        ProxyError("request body too large", status=413, cause="body-too-large")
                    )
            raise _reject(413, "body-too-large", "request body too large")
        shadow = self.shadow
        if shadow is not None:
            shadow.on_request_body(data)
        upstream = self.upstream
        if upstream is not None and upstream.transport is not None:
            if self.request_chunked:
                upstream.transport.writelines((b"%x\r\n" % len(data), data, b"\r\n"))
            else:
                upstream.transport.write(data)
            if not self.replay_lost:
                if self.received_body <= conn.ctx.retry_buffer:
                    replay = self.replay
                    if replay is None:
                        self.replay = [data]
                    else:
                        replay.append(data)
                else:
                    self.replay = None
                    self.replay_lost = True
            return
        pending = self.pending
        if pending is None:
            self.pending = [data]
        else:
            pending.append(data)
        self.pending_bytes += len(data)
        if self.pending_bytes > _PENDING_LIMIT:
            conn.pause_reading()

    def on_request_complete(self) -> None:
        self.request_done = True
        upstream = self.upstream
        # an upstream connection is attached only while AWAITING or RELAYING
        if upstream is not None and upstream.transport is not None:
            if self.request_chunked:
                upstream.transport.write(LAST_CHUNK)
            if self.phase == AWAITING:
                self.conn.set_deadline(UPSTREAM, self.conn.ctx.t_upstream)
        shadow = self.shadow
        if shadow is not None:
            shadow.on_request_complete(self)

    # ---- response ----------------------------------------------------------

    def on_response_head(self, upstream: UpstreamConnection, status: int, raw: bytes) -> bool:
        """Build the head to relay; True when the body to read is chunked."""
        if 100 <= status < 200 and status != 101:
            return False  # interim responses are not relayed; 100 was answered by the proxy
        self.status = status
        conn = self.conn
        ctx = conn.ctx
        self.head_at = ctx.clock()
        self.head_read = upstream.reads
        method = self.method
        no_body = method == b"HEAD" or status in (204, 304) or status == 101
        self.response_has_no_body = no_body
        head, flags = rewrite_response_head(raw)
        if flags & RESPONSE_BAD_CODING:
            # the proxy re-frames bodies: anything but one final chunked is unreadable
            raise BadUpstreamResponse("response Transfer-Encoding other than chunked")
        if not head.startswith(b"HTTP/1.1 "):
            head = b"HTTP/1.1" + head[8:]  # the client is spoken to in HTTP/1.1 framing
        if status == 101:
            if self.upgrade is None:
                raise BadUpstreamResponse("101 to a request that did not ask to upgrade")
            accept = b"\r\nsec-websocket-accept:" in head.lower()
            if not accept and self.upgrade.lower() == b"websocket":
                raise BadUpstreamResponse("101 without Sec-WebSocket-Accept")
        chunked = bool(flags & RESPONSE_CHUNKED)
        has_length = bool(flags & RESPONSE_HAS_LENGTH)
        if flags & RESPONSE_BOTH_FRAMINGS:
            # both framings: the body is chunked; the Content-Length is a lie (RFC 9112
            # 6.3); forwarded without it, and the upstream connection is not reused
            self.framing_doubtful = True
        if no_body and (chunked or has_length) and status != 101 and announces_body(raw):
            # an answer without a body (HEAD, 204, 304) whose head announces one:
            # a broken backend may send that body late, where the next request's
            # answer is expected; the connection is not trusted with another one
            self.framing_doubtful = True
        backend = self.backend
        pool_line = b""
        if ctx.pool_header is not None and backend is not None:
            pool_line = _pool_line(ctx.pool_header, backend.pool)
        set_cookie = self.set_cookie
        cookie_line = b"" if set_cookie is None else _set_cookie_line(set_cookie)
        parts = [upstream.head_prefix(head, pool_line, cookie_line)]
        id_end = self.id_end
        # a backend that sets the header itself (often echoing it) is left alone
        ids = ctx.request_ids
        if id_end is not None and (ids is None or ids.has_header(head)):
            id_end = None
        if self.upgrade is not None and status != 101:
            # declined: the client's stream after its request is not HTTP we parsed
            self.client_keep_alive = False
        # an answer that comes before the request body ended: the rest of that body
        # will not be read, so the client connection closes after the answer
        keep_alive = self.client_keep_alive and not conn.closing and self.request_done
        lines = b""  # the head's lines after the request ID's, if any
        if status == 101:
            lines = b"Connection: upgrade\r\nUpgrade: " + (self.upgrade or b"websocket") + b"\r\n"
        elif not no_body and not has_length:
            if self.version == "1.1":
                lines = b"Transfer-Encoding: chunked\r\n"
                self.chunk_out = True
            else:
                keep_alive = False  # close-delimited for an HTTP/1.0 client
            self.response_close_delimited = not chunked
        if not keep_alive:
            self.client_keep_alive = False
            if status != 101:
                lines += b"Connection: close\r\n"
        elif self.version == "1.0":
            lines += b"Connection: keep-alive\r\n"
        if lines:
            if id_end is not None:
                parts.append(id_end[:-2])
            parts += (lines, b"\r\n")
        else:
            parts.append(b"\r\n" if id_end is None else id_end)
        self._to(RELAYING)
        # held until the end of this read, so head and body leave in one syscall
        # (joined there once, with the body: the head's pieces count as one)
        self.out = parts
        self.out_head = len(parts) - 1
        conn.deadline_kind = UPSTREAM  # conn.set_deadline, inline (once a response)
        conn.deadline = ctx.now + ctx.t_upstream
        return chunked and not no_body

    def on_response_body(self, data: bytes) -> None:
        out = self.out
        if out is None:
            out = self.out = []
        self.body_bytes += len(data)
        if self.chunk_out:
            out += (b"%x\r\n" % len(data), data, b"\r\n")
        else:
            out.append(data)
        conn = self.conn
        conn.deadline = conn.ctx.now + conn.ctx.t_upstream
        shadow = self.shadow
        if shadow is not None:
            shadow.on_response_body(data)

    def flush_response(self) -> None:
        """Write what this read of the upstream produced, in one call."""
        out = self.out
        if out:
            self.out = None
            self.response_sent = True
            transport = self.conn.transport
            extra = self.out_head
            self.out_head = 0
            if transport is not None:
                if len(out) - extra < 4 and len(out[-1]) <= 16384:
                    # one small buffer is cheaper to hand over than a writev of pieces;
                    # large bodies go as they are (no copy)
                    self.conn.send(b"".join(out))
                else:
                    transport.writelines(out)

    def on_response_complete(self, upstream: UpstreamConnection, keep_alive: bool) -> None:
        if self.phase != RELAYING or self.status == 101:
            return  # interim response, or a tunnel's handshake
        self.upstream_keep_alive = keep_alive and not self.framing_doubtful
        # a response that ended in the read its head came in (every small one) is
        # timed by the head's clock read: no second one
        self._finish(True, self.head_at if upstream.reads == self.head_read else 0.0)

    def on_upstream_upgraded(self, upstream: UpstreamConnection, rest: bytes) -> None:
        from zdproxy.proxy.tunnel import start_tunnel

        if self.status != 101:
            self.on_bad_response(upstream, BadUpstreamResponse("unexpected upgrade"))
            return
        self.flush_response()
        start_tunnel(self, upstream, rest)

    def on_client_upgrade_data(self, rest: bytes) -> None:
        """Bytes the client sent after its upgrade request: held until the 101, and
        dropped (the connection then closes) when the backend declines the upgrade.
        Sent earlier, a backend that declines would read them as a request the
        proxy never checked."""
        self.upgrade_data += rest

    # ---- failures ----------------------------------------------------------

    def on_upstream_lost(self, upstream: UpstreamConnection, exc: Exception | None) -> None:
        if self.phase >= DONE or upstream is not self.upstream:
            return
        self.upstream = None  # gone: nothing to close, pool or abort
        if self.phase == RELAYING:
            if self.response_close_delimited:
                # the body was delimited by the close: that is its normal end
                self.upstream_keep_alive = False
                self._finish(clean=True)
            else:
                self._truncated("upstream closed mid-response", backend_fault=True)
            return
        backend = self.backend
        if backend is not None:
            self._failed(backend, Failure.RESET)
        self._retry_or_fail(
            Failure.RESET,
            upstream,
            ProxyError("upstream closed the connection", cause="upstream-reset"),
        )

    def on_bad_response(self, upstream: UpstreamConnection, exc: Exception) -> None:
        """The backend's response broke the protocol or a limit. Never retried: the
        backend received the request (``balancing.retry.may_retry``). Counted
        against the backend: the 502 goes to passive health like any 5xx."""
        if self.phase >= DONE:
            return
        backend = self.backend
        if backend is not None:
            self._failed(backend, Failure.BAD_RESPONSE)
        if self.response_sent:
            self._truncated(f"invalid upstream response: {exc}", backend_fault=True)
            return
        # nothing reached the client yet (a head built in this read is dropped);
        # the upstream connection closed itself
        self.upstream = None
        self.out = None
        self.out_head = 0
        self.chunk_out = False
        log.info("invalid response from backend: %s", exc)
        self.fail(BadUpstreamResponse(f"invalid response from backend: {exc}"))

    def on_upstream_timeout(self) -> None:
        if self.phase >= DONE:
            return
        backend = self.backend
        if backend is not None:
            self._failed(backend, Failure.TIMEOUT)
        if self.phase == RELAYING:
            self._truncated("upstream timed out mid-response", backend_fault=True)
        else:
            # a hung backend: the request may go to another one (nginx's
            # proxy_next_upstream timeout), the silent connection is dropped
            self._retry_or_fail(
                Failure.TIMEOUT, self.upstream, UpstreamTimeout("backend did not answer in time")
            )

    def on_body_timeout(self) -> None:
        if self.phase >= DONE:
            return
        if self.phase == RELAYING:
            self._truncated("request body timeout")
        else:
            self.client_keep_alive = False
            self.fail(ProxyError("request body timeout", status=408, cause="request-body-timeout"))

    def on_request_error(self, error: ProxyError) -> None:
        """The request body turned out malformed: the request never completes, so the
        upstream connection (holding part of it) is closed and the client gets ``error``
        (or, when response bytes already went out, a closed connection)."""
        if self.phase >= DONE:
            return
        self.client_keep_alive = False
        if self.phase == RELAYING:
            self._truncated(str(error))
        else:
            self.fail(error)

    def on_client_lost(self) -> None:
        """The client went away: never reuse the upstream connection."""
        if self.phase >= DONE:
            return
        access = self.conn.ctx.access_log
        if access is not None and self.started_at:
            access.add(self, 499, "client-closed", self.conn.ctx.loop.time())  # nginx's code for it
        self._let_go(_ABORT, DONE)

    def _failed(self, backend: Backend, kind: Failure) -> None:
        """Count a failure against ``backend`` (``zdproxy_upstream_errors_total``)
        and tell passive health about a connection-level one (answers, a bad
        response's 502 included, reach it through ``_record``)."""
        errors = backend.upstream_errors
        label = kind.value
        errors[label] = errors.get(label, 0) + 1
        if kind in LOCAL:
            ctx = self.conn.ctx
            ctx.observer.failure(backend, kind, ctx.now)

    def _retry_or_fail(
        self, kind: Failure, upstream: UpstreamConnection | None, error: ProxyError
    ) -> None:
        """The one retry decision of the data path, for an attempt that failed
        before any response byte reached the client: the rule
        (``balancing.retry.may_retry``), then the retry budget; else ``error``."""
        ctx = self.conn.ctx
        if may_retry(
            kind,
            attempts=self.attempts,
            max_attempts=ctx.retry_attempts,
            idempotent=self.idempotent,
            request_done=self.request_done,
            expects_body=self.expects_body,
            body_kept=not self.request_body_lost(),
            reused=upstream is not None and upstream.reused,
            got_bytes=upstream is not None and upstream.got_bytes,
        ) and ctx.retry_policy.allow_retry(ctx.now):
            ctx.counters.retries += 1
            # a silent connection (a timeout) is dropped; the failed backend excluded
            self._let_go(_ABORT, DISPATCHING)
            self._dispatch(self.backend)
        else:
            self.fail(error)

    def request_body_lost(self) -> bool:
        """Part of the body went upstream and was not kept: it cannot be sent again."""
        return self.expects_body and self.replay_lost

    def _truncated(self, why: str, backend_fault: bool = False) -> None:
        """After response bytes went out: close the client so it sees the cut.
        ``backend_fault``: the backend broke off its own answer, which counts
        against it as a 502 (the client's status was a lie)."""
        log.info("closing client connection: %s", why)
        self._record(
            502 if self.status == 0 or backend_fault else self.status, "response-truncated"
        )
        self._let_go(_ABORT, DONE)
        transport = self.conn.transport
        if transport is not None:
            transport.abort()

    def fail(self, error: ProxyError) -> None:
        """Answer an error the proxy generated (nothing was sent to the client yet)."""
        if self.phase >= DONE:
            return
        self._let_go(_CLOSE, DONE)
        self.status = error.status
        conn = self.conn
        # a request whose body was not fully read leaves the framing in doubt
        keep_alive = self.client_keep_alive and self.request_done and not conn.closing
        if self.upgrade is not None:
            # the client's bytes after an upgrade request were not parsed as HTTP
            keep_alive = False
        response = error_response(
            error.status, error.cause, str(error), close=not keep_alive, extra=self.id_line()
        )
        head_end = response.index(b"\r\n\r\n") + 4
        if self.method == b"HEAD":
            response = response[:head_end]
        self.body_bytes = len(response) - head_end
        self._record(error.status, error.cause)
        transport = conn.transport
        if transport is not None and not transport.is_closing():
            transport.write(response)
        self._after_response(keep_alive)

    def id_line(self) -> bytes:
        """The request-ID header line of a response the proxy writes itself (b"":
        request IDs are off); a request refused before its head was complete gets
        its ID here."""
        end = self.id_end
        if end is None:  # refused before its head was complete
            ids = self.conn.ctx.request_ids
            if ids is None:
                return b""
            end = self.id_end = ids.resolve_end(self.request_id_in)
        return end[:-2]

    @property
    def request_id(self) -> bytes | None:
        """The ID the request goes by (None: request IDs are off, or the request
        was refused before it got one): for the access log."""
        end = self.id_end
        return None if end is None else id_in_end(end)

    # ---- finish ------------------------------------------------------------

    def _finish(self, clean: bool, ended_at: float = 0.0) -> None:
        """The response ended (``clean``: as its framing said); ``ended_at``: the
        loop time it ended at, when known without reading the clock (0.0: not)."""
        conn = self.conn
        if self.chunk_out:
            if self.out is None:
                self.out = [LAST_CHUNK]
            else:
                self.out.append(LAST_CHUNK)
        self.flush_response()
        self._record(self.status, None, ended_at)
        backend = self.backend
        if (
            clean
            and self.upstream_keep_alive
            and self.request_done
            and backend is not None
            and backend.state is BackendState.UP
        ):
            self._let_go(_POOL, DONE)
        else:
            self._let_go(_CLOSE, DONE)
        keep_alive = self.client_keep_alive and self.request_done
        if not self.request_done:
            # the answer came before the request body ended: close both sides
            conn.closing = True
        self._after_response(keep_alive)

    # ---- phases and the one way out ------------------------------------------

    def _to(self, phase: int) -> None:
        """Move to ``phase``, as ``proxy.phases.TRANSITIONS`` allows, and take or
        give back the backend's ``in_flight`` slot on the way into or out of the
        phases that hold it (``HOLDING``): the one place it is counted."""
        old = self.phase
        move = MOVES[old << 3 | phase]
        if move == ILLEGAL:
            raise illegal_move(old, phase)
        self.phase = phase
        if move:
            backend = self.backend
            if backend is not None:
                backend.in_flight += move

    def _let_go(self, fate: int, phase: int) -> None:
        """The one way out of an attempt: let go of the upstream connection (back to
        the pool, ``_POOL``, at the end of the read being parsed, once no byte
        followed the response; closed after what was written, ``_CLOSE``; or reset
        now, ``_ABORT``), then move to ``phase``: DONE, or DISPATCHING for a retry
        (either gives the backend's slot back)."""
        upstream = self.upstream
        if upstream is not None:
            self.upstream = None
            upstream.exchange = None
            if fate == _POOL:
                upstream.idle_since = self.conn.ctx.now
                upstream.reusable = True
            elif fate == _CLOSE:
                upstream.close()
            else:
                upstream.abort()
        self._to(phase)

    def become_tunnel(self) -> Backend | None:
        """The 101 was relayed: the tunnel takes over both connections and the
        backend's ``in_flight`` slot (given back when it closes); returns that backend."""
        self._to(TUNNEL)
        self._record(101)
        upstream = self.upstream
        self.upstream = None
        if upstream is not None:
            upstream.exchange = None
        return self.backend

    def _after_response(self, keep_alive: bool) -> None:
        conn = self.conn
        if self.after_reject is not None and conn.transport is not None:
            conn.transport.write(self.after_reject)
            keep_alive = False
        conn.response_finished(self, keep_alive)

    def _record(self, status: int, cause: str | None = None, now: float = 0.0) -> None:
        """The request is over (answered, refused or cut): statistics, access log.
        ``now``: the loop time it ended at, when the caller knows it (0.0: not)."""
        ctx = self.conn.ctx
        # one clock read for the access log, the shadow copy and the statistics
        if not now:
            now = ctx.clock()
        access = ctx.access_log
        if access is not None:
            access.add(self, status, cause, now)
        shadow = self.shadow
        if shadow is not None:
            shadow.on_live_answer(self, status, now)
        backend = self.backend
        if backend is None:
            return
        backend.count(status)
        if status >= 500:
            ctx.observer.failure(backend, Failure.STATUS_5XX, now)
        elif backend.failures:
            ctx.observer.success(backend, now)
        selector = self.selector
        if isinstance(selector, WeightedSelector):
            # the concrete class: a direct call in the compiled build (a Protocol's
            # method is looked up and called as a Python method)
            view = selector.pool_view(backend.pool)
        else:
            view = selector.pool_view(backend.pool) if selector is not None else None
        if view is not None:
            view.stats.record(status, now - self.started_at, now)

    def pause_upstream_reading(self) -> None:
        upstream = self.upstream
        if upstream is not None and upstream.transport is not None:
            upstream.transport.pause_reading()

    def resume_upstream_reading(self) -> None:
        upstream = self.upstream
        if upstream is not None and upstream.transport is not None:
            upstream.transport.resume_reading()


def _line_version(read: bytes, method: bytes, url: bytes) -> int:
    """11 or 10 when ``read``, a read the request began at the first byte of,
    starts with the request line ``method url HTTP/1.1`` (or ``HTTP/1.0``) and
    CRLF, single spaces; else 0 (the caller asks the parser).

    The method at offset 0 rules out leading empty lines, and a version token at
    ``len(method) + 1 + len(url)`` cannot come from another layout of the line:
    with more spaces before the target, that offset falls in the target (no
    spaces in it) or in the spaces before it, and the CRLF cannot follow where
    the token says (the target has no CR). One slice (``startswith`` with an
    offset is a Python-level method call when compiled, about 1,000 instructions).
    """
    m = len(method)
    end = m + 1 + len(url)
    tail = read[end : end + 11]
    if tail == _LINE_11:
        version = 11
    elif tail == _LINE_10:
        version = 10
    else:
        return 0
    if read[m] == 0x20 and read.startswith(method):
        return version
    return 0


_GET: Final = b"GET"
_GET_SP: Final = b"GET "
_LINE_11: Final = b" HTTP/1.1\r\n"
_LINE_10: Final = b" HTTP/1.0\r\n"


def without_body(response: bytes) -> bytes:
    """An error response as the answer to HEAD: the head alone (RFC 9110 9.3.2)."""
    return response[: response.index(b"\r\n\r\n") + 4]


#: the pool response header line by header (``X-Zdproxy-Pool: ``) and pool name
_pool_lines: dict[bytes, dict[str, bytes]] = {}


class _LastPoolLine:
    """The last pool line handed out, by header and pool object: one pool takes
    the traffic most of the time, and two identity checks are cheaper than two
    dict lookups."""

    __slots__ = ("header", "line", "pool")

    def __init__(self) -> None:
        self.header = b""
        self.pool = ""
        self.line = b""


_LAST_POOL_LINE: Final = _LastPoolLine()


def _pool_line(header: bytes, pool: str) -> bytes:
    """``X-Zdproxy-Pool: blue`` and CRLF, built once per pool (and header name)."""
    last = _LAST_POOL_LINE
    if pool is last.pool and header is last.header:
        return last.line
    line = _pool_line_cached(header, pool)
    last.header = header
    last.pool = pool
    last.line = line
    return line


def _pool_line_cached(header: bytes, pool: str) -> bytes:
    lines = _pool_lines.get(header)
    if lines is None:
        if len(_pool_lines) >= 16:  # header renamed by reloads: start over
            _pool_lines.clear()
        lines = _pool_lines[header] = {}
    line = lines.get(pool)
    if line is None:
        if len(lines) >= 1024:
            lines.clear()
        line = lines[pool] = header + pool.encode("ascii") + b"\r\n"
    return line


class _LastCookie:
    """The last Set-Cookie line made, by the value it carries: the selector hands
    every new client of a second the same pin object (``_pool_cookie``)."""

    __slots__ = ("line", "value")

    def __init__(self) -> None:
        self.value = b""
        self.line = b""


_LAST_COOKIE: Final = _LastCookie()


def _set_cookie_line(value: bytes) -> bytes:
    last = _LAST_COOKIE
    if value is not last.value:
        last.line = b"Set-Cookie: %s\r\n" % value
        last.value = value
    return last.line


def _forwarding(xff: bytes, proto: bytes, host: bytes | None) -> bytes:
    """The X-Forwarded-For, -Proto and -Host lines the proxy writes (no -Host for a
    request without a host)."""
    if host is None:
        return b"X-Forwarded-For: %s\r\nX-Forwarded-Proto: %s\r\n" % (xff, proto)
    return b"X-Forwarded-For: %s\r\nX-Forwarded-Proto: %s\r\nX-Forwarded-Host: %s\r\n" % (
        xff,
        proto,
        host,
    )


def _frame(chunk: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(chunk), chunk)


def _reject(status: int, cause: str, message: str) -> ProxyError:
    return ProxyError(message, status=status, cause=cause)
