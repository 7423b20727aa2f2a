"""The data path's per-request caches give the answers the uncached code gives."""

from __future__ import annotations

import httptools
from support_exchange import Proxy

from zdproxy.balancing.model import Backend
from zdproxy.balancing.sticky import CACHE_SIZE, Pin, StickyCodec
from zdproxy.http import head, rules
from zdproxy.http.head import rewrite_response_head
from zdproxy.http.requestid import RequestIds
from zdproxy.proxy import exchange as exchange_module
from zdproxy.proxy.upstream import PEAK_SECONDS, UpstreamConnection, UpstreamPools

NGINX = (
    b"HTTP/1.1 200 OK\r\nServer: nginx\r\nDate: Tue, 01 Dec 2026 05:44:10 GMT\r\n"
    b"Content-Type: text/plain\r\nContent-Length: 1024\r\nConnection: keep-alive\r\n"
    b'ETag: "6"\r\n\r\n'
)
NGINX_OUT = (
    b"HTTP/1.1 200 OK\r\nServer: nginx\r\nDate: Tue, 01 Dec 2026 05:44:10 GMT\r\n"
    b'Content-Type: text/plain\r\nContent-Length: 1024\r\nETag: "6"\r\n'
)


def test_cached_head_is_the_rewritten_head() -> None:
    head._rewritten.clear()
    first = rewrite_response_head(NGINX)
    # a new bytes object with the same content: the cached answer
    again = rewrite_response_head(bytes(bytearray(NGINX)))
    assert first == again == (NGINX_OUT, head.RESPONSE_HAS_LENGTH)
    assert list(head._rewritten) == [NGINX]  # one entry, taken from the cache
    chunked = NGINX.replace(b"Content-Length: 1024", b"Transfer-Encoding: chunked")
    assert rewrite_response_head(chunked) == (
        NGINX_OUT.replace(b"Content-Length: 1024\r\n", b""),
        head.RESPONSE_CHUNKED,
    )
    # the cache does not mix up heads that differ in one byte
    close = NGINX.replace(b"keep-alive", b"close\r\nX-A: 1")
    assert rewrite_response_head(close)[0] == NGINX_OUT.replace(b"ETag", b"X-A: 1\r\nETag")


def test_head_cache_is_bounded() -> None:
    head._rewritten.clear()
    for i in range(head.HEAD_CACHE_SIZE * 3):
        raw = NGINX.replace(b'ETag: "6"', b'ETag: "%d"' % i)
        assert rewrite_response_head(raw)[0] == NGINX_OUT.replace(b'"6"', b'"%d"' % i)
        assert len(head._rewritten) <= head.HEAD_CACHE_SIZE
    big = NGINX.replace(b"Server: nginx", b"Server: " + b"n" * head.HEAD_CACHE_MAX_BYTES)
    head._rewritten.clear()
    assert rewrite_response_head(big)[1] == head.RESPONSE_HAS_LENGTH
    assert not head._rewritten


def test_backend_cookie_is_set_cookie_and_decodes() -> None:
    codec = StickyCodec(b"k" * 32, "zd", 3600)
    plain = StickyCodec(b"k" * 32, "zd", 3600)
    value = codec.backend_cookie("blue", "blue-1", 1_790_000_000)
    assert value == plain.set_cookie(Pin("blue", "blue-1", 1_790_000_000))
    assert codec.backend_cookie("blue", "blue-1", 1_790_000_000) is value
    # a new second, another pool or another backend: a new pin
    later = codec.backend_cookie("blue", "blue-1", 1_790_000_001)
    moved = codec.backend_cookie("green", "blue-1", 1_790_000_001)
    other = codec.backend_cookie("blue", "blue-2", 1_790_000_001)
    assert len({value, later, moved, other}) == 4
    for cookie, pin in (
        (later, Pin("blue", "blue-1", 1_790_000_001)),
        (moved, Pin("green", "blue-1", 1_790_000_001)),
        (other, Pin("blue", "blue-2", 1_790_000_001)),
    ):
        text = cookie.decode("latin-1").split(";")[0].partition("=")[2]
        assert plain.decode(text) == pin


def test_backend_cookie_cache_is_bounded() -> None:
    codec = StickyCodec(b"k" * 32, "zd", 3600)
    for i in range(CACHE_SIZE + 10):
        codec.backend_cookie("blue", f"b{i}", 1)
    assert len(codec._issued) <= CACHE_SIZE


class _Transport:
    """Just enough of a transport for the idle stack (no I/O is done)."""

    def __init__(self) -> None:
        self.closed = False

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True


def _upstreams(pools: UpstreamPools, backend: Backend, count: int) -> list[UpstreamConnection]:
    conns = []
    for _ in range(count):
        conn = UpstreamConnection(pools, backend)
        conn.transport = _Transport()  # type: ignore[assignment]
        conns.append(conn)
    return conns


def test_idle_stack_keeps_what_a_burst_needs() -> None:
    """Above max_idle, released connections stay up to the recent peak of requests
    in flight to the backend (closing them made the next burst reconnect: the c=200
    tail); the peak is forgotten after PEAK_SECONDS, and the sweep ages them out."""
    pools = UpstreamPools(max_idle_per_backend=2)
    backend = Backend("b-1", "blue", "127.0.0.1", 1)
    conns = _upstreams(pools, backend, 6)
    for in_flight in range(1, 7):  # a burst of 6, 4 of them at the peak of 4
        backend.in_flight = min(in_flight, 4)
        assert pools.acquire(backend) is None
    for conn in conns:
        backend.in_flight -= 1 if backend.in_flight else 0
        pools.release(conn, 0.0)
    assert pools.idle_count("b-1") == 4  # the peak, not max_idle
    assert [c.closed for c in conns] == [False] * 4 + [True] * 2
    pools.sweep(PEAK_SECONDS + 1.0, 3600.0)  # the peak is forgotten
    more = _upstreams(pools, backend, 1)
    pools.release(more[0], PEAK_SECONDS + 1.0)
    assert more[0].closed and pools.idle_count("b-1") == 4
    pools.sweep(7200.0, 3600.0)
    assert pools.idle_count("b-1") == 0


def test_no_pooling_stays_no_pooling_under_load() -> None:
    pools = UpstreamPools(max_idle_per_backend=0)
    backend = Backend("b-1", "blue", "127.0.0.1", 1)
    backend.in_flight = 100
    assert pools.acquire(backend) is None
    conns = _upstreams(pools, backend, 3)
    for conn in conns:
        pools.release(conn, 0.0)
    assert pools.idle_count("b-1") == 0 and all(c.closed for c in conns)


def test_host_check_is_remembered_per_connection_and_still_refuses() -> None:
    # a connection's requests name one host: checked once, then compared; a later
    # bad or empty Host on the same connection is still refused
    proxy = Proxy()
    for backend in ("blue-1", "blue-2"):
        proxy.pooled(backend)
    conn, client = proxy.client()
    conn.data_received(b"GET / HTTP/1.1\r\nHost: a.example\r\n\r\n")
    assert conn.valid_host == b"a.example"
    upstream = conn.queue[0].upstream
    assert upstream is not None
    upstream.data_received(b"HTTP/1.1 204 No Content\r\n\r\n")
    assert client.take().startswith(b"HTTP/1.1 204")
    conn.data_received(b"GET / HTTP/1.1\r\nHost: \r\n\r\n")
    assert client.take().startswith(b"HTTP/1.1 400")
    fresh, fresh_client = proxy.client()
    fresh.data_received(b"GET / HTTP/1.1\r\nHost: a b\r\n\r\n")
    assert fresh_client.take().startswith(b"HTTP/1.1 400")


def test_request_id_search_is_remembered_by_head_identity() -> None:
    ids = RequestIds("X-Trace", trust_incoming=True)
    with_it = b"HTTP/1.1 200 OK\r\nx-trace: 1\r\n"
    without = b"HTTP/1.1 200 OK\r\nX-Trace-Id: 1\r\n"
    assert ids.has_header(with_it) and ids.has_header(with_it)
    assert not ids.has_header(without) and not ids.has_header(without)
    # an equal head that is another object is searched anew, with the same answer
    assert ids.has_header(bytes(bytearray(with_it)))


def test_header_kinds_are_remembered_by_name_as_sent() -> None:
    # the routing override header and the hop-by-hop ones are recognised in any
    # case, the second time from the table by the name as sent; the table is bounded
    proxy = Proxy()
    kinds = proxy.ctx.header_kinds
    for backend in ("blue-1", "blue-2", "blue-1", "blue-2"):
        proxy.pooled(backend)
    conn, client = proxy.client()
    request = (
        b"GET / HTTP/1.1\r\nHOST: a\r\nX-ZDPROXY-POOL: green\r\nKeep-Alive: 5\r\nX-Other: 1\r\n\r\n"
    )
    for _ in range(2):
        conn.data_received(request)
        exchange = conn.queue[0]
        assert exchange.pool_override == "green" and exchange.host == b"a"
        assert b"Keep-Alive" not in exchange.request_head
        assert b"X-ZDPROXY-POOL: green\r\nX-Other: 1\r\n" in exchange.request_head
        assert b"HOST" in kinds and b"X-ZDPROXY-POOL" in kinds
        upstream = exchange.upstream
        assert upstream is not None
        upstream.data_received(b"HTTP/1.1 204 No Content\r\n\r\n")
        assert client.take().startswith(b"HTTP/1.1 204")
    for i in range(1000):
        conn.data_received(b"GET / HTTP/1.1\r\nHost: a\r\nX-%d: 1\r\n\r\n" % i)
        upstream = conn.queue[0].upstream
        assert upstream is not None
        upstream.data_received(b"HTTP/1.1 204 No Content\r\n\r\n")
    assert len(kinds) <= 512


def test_one_table_serves_the_checker_and_the_exchange() -> None:
    # a name remembered as sent carries the checker's code: a second
    # Content-Length is still seen, on the first request and on a later one
    client = _Client()
    kinds = client.proxy.ctx.header_kinds
    double = b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab"
    for _ in range(2):
        conn, wire = client.proxy.client()
        conn.data_received(double)
        assert wire.take().startswith(b"HTTP/1.1 400 ")
        assert b"Content-Length" in kinds
    # a name the checker finds odd (here a look-alike of Content-Length,
    # forwarded in lenient mode) is analysed whole each time, never remembered
    lenient = _Client("lenient")
    request = b"GET / HTTP/1.1\r\nHost: a\r\nContent_Length: 5\r\nX-Plain: 1\r\n\r\n"
    for _ in range(2):
        assert b"\r\nContent_Length: 5\r\nX-Plain: 1\r\n" in lenient.send(request)
        assert b"Content_Length" not in lenient.proxy.ctx.header_kinds
        assert b"X-Plain" in lenient.proxy.ctx.header_kinds
    assert max(rules.name_code(n) for n in (b"Host", b"te", b"Content-Length", b"A_B", b"")) < (
        1 << rules.NAME_CODE_BITS
    )


def test_version_read_from_the_request_line() -> None:
    line_version = exchange_module._line_version
    assert line_version(b"GET /a HTTP/1.1\r\nHost: a\r\n\r\n", b"GET", b"/a") == 11
    assert line_version(b"GET /a HTTP/1.0\r\n\r\n", b"GET", b"/a") == 10
    # anything else is left to the parser: another version, a bare LF, a line
    # cut short, leading empty lines, more spaces, another request's line
    assert line_version(b"GET /a HTTP/2.0\r\n\r\n", b"GET", b"/a") == 0
    assert line_version(b"GET /a HTTP/1.1\n\n", b"GET", b"/a") == 0
    assert line_version(b"GET /a HTTP/1.", b"GET", b"/a") == 0
    assert line_version(b"\r\nGET /a HTTP/1.1\r\n\r\n", b"GET", b"/a") == 0
    assert line_version(b"GET  /a HTTP/1.1\r\n\r\n", b"GET", b"/a") == 0
    assert line_version(b"PUT /a HTTP/1.1\r\n\r\n", b"GET", b"/a") == 0


def test_version_of_pipelined_and_split_requests() -> None:
    """The version comes from the parser whenever the read does not start with
    the request's own line: the second of two pipelined requests with the same
    line but another version, and a head split across reads."""
    proxy = Proxy()
    for backend in ("blue-1", "blue-2", "blue-1", "blue-2"):
        proxy.pooled(backend)  # no connect is started
    conn, _client = proxy.client()
    conn.data_received(b"GET /a HTTP/1.1\r\nHost: a\r\n\r\nGET /a HTTP/1.0\r\nHost: a\r\n\r\n")
    assert [e.version for e in conn.queue] == ["1.1", "1.0"]
    other, _ = proxy.client()
    other.data_received(b"GET /b HTTP/1.0\r\nHo")
    other.data_received(b"st: a\r\n\r\n")
    assert [e.version for e in other.queue] == ["1.0"]
    third, _ = proxy.client()
    third.data_received(b"GET /b HT")
    third.data_received(b"TP/1.0\r\nHost: a\r\n\r\n")
    assert [e.version for e in third.queue] == ["1.0"]


# ---- the request line and Host line, one piece per connection --------------------

QUIET = (
    "listen: 127.0.0.1:8080\nhealth_check: {enabled: false}\n"
    "pools: {blue: {weight: 100, backends: [{address: 127.0.0.1:9001}]}}\n"
    "http: {request_id: {enabled: false}, strictness: %s}\n"
)


class _Client:
    """One client connection; ``send`` returns what the backend receives for a
    request (on a pooled connection) and answers it, so the next can follow."""

    def __init__(self, strictness: str = "strict") -> None:
        self.proxy = Proxy(QUIET % strictness)
        self.conn, self.wire = self.proxy.client()

    def send(self, request: bytes) -> bytes:
        upstream, wire = self.proxy.pooled("blue-1")
        self.conn.data_received(request)
        sent = bytes(wire.written)
        upstream.data_received(b"HTTP/1.1 204 No Content\r\n\r\n")
        return sent


def test_a_target_split_across_reads_is_forwarded_whole() -> None:
    # the first piece of a target is taken as it is, the next ones appended
    client = _Client()
    upstream, wire = client.proxy.pooled("blue-1")
    client.conn.data_received(b"GET /lo")
    client.conn.data_received(b"ng/pa")
    client.conn.data_received(b"th?q=1 HTTP/1.1\r\nHost: a\r\n\r\n")
    assert (
        bytes(wire.written) == b"GET /long/path?q=1 HTTP/1.1\r\nHost: a\r\n" + _fwd(b"a") + b"\r\n"
    )
    upstream.data_received(b"HTTP/1.1 204 No Content\r\n\r\n")
    # and the next request on the connection starts from an empty target
    assert client.send(b"GET /b HTTP/1.1\r\nHost: a\r\n\r\n").startswith(b"GET /b HTTP/1.1\r\n")


def test_a_response_ends_at_the_time_of_the_read_that_ends_it() -> None:
    # whole in one read: its end is the time its head came (no second clock
    # read); its head in one read and the rest later: the later read's time
    proxy = Proxy(QUIET % "strict")
    stats = proxy.selector.pool_view("blue").stats
    conn, client = proxy.client()
    upstream, _ = proxy.pooled("blue-1")
    conn.data_received(b"GET /a HTTP/1.1\r\nHost: a\r\n\r\n")
    proxy.loop.clock += 0.25
    upstream.data_received(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
    assert client.take().endswith(b"\r\n\r\nok")
    assert stats.latency_sum == 0.25
    conn.data_received(b"GET /b HTTP/1.1\r\nHost: a\r\n\r\n")
    proxy.loop.clock += 0.5
    upstream.data_received(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n")
    proxy.loop.clock += 2.0
    upstream.data_received(b"ok")
    assert client.take().endswith(b"\r\n\r\nok")
    assert stats.latency_sum == 0.25 + 2.5
    # a head, then no other read: a response cut by the upstream timeout ends
    # when the timeout struck, not when its head came
    conn.data_received(b"GET /c HTTP/1.1\r\nHost: a\r\n\r\n")
    upstream.data_received(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n")
    waited = proxy.ctx.t_upstream + 1.0
    proxy.advance(waited)
    assert client.closed
    assert stats.latency_sum == 0.25 + 2.5 + waited


def _fwd(host: bytes) -> bytes:
    return (
        b"X-Forwarded-For: 192.0.2.7\r\nX-Forwarded-Proto: http\r\nX-Forwarded-Host: %s\r\n" % host
    )


def test_request_line_and_host_line_follow_each_request() -> None:
    # the piece is rebuilt when the Host value or its name's spelling changes
    client = _Client()
    assert client.send(b"GET /a HTTP/1.1\r\nHost: a\r\nX-A: 1\r\n\r\n") == (
        b"GET /a HTTP/1.1\r\nHost: a\r\nX-A: 1\r\n" + _fwd(b"a") + b"\r\n"
    )
    assert client.send(b"GET /b HTTP/1.1\r\nHost: b\r\n\r\n") == (
        b"GET /b HTTP/1.1\r\nHost: b\r\n" + _fwd(b"b") + b"\r\n"
    )
    assert client.send(b"GET /b HTTP/1.1\r\nHOST: b\r\n\r\n") == (
        b"GET /b HTTP/1.1\r\nHOST: b\r\n" + _fwd(b"b") + b"\r\n"
    )
    # another method, and a Host that is not the first header: order kept
    assert client.send(b"DELETE /c HTTP/1.1\r\nX-B: 2\r\nHost: b\r\nX-C: 3\r\n\r\n") == (
        b"DELETE /c HTTP/1.1\r\nX-B: 2\r\nHost: b\r\nX-C: 3\r\n" + _fwd(b"b") + b"\r\n"
    )
    # a header the proxy drops before Host: Host is still the first line sent
    assert client.send(b"GET /d HTTP/1.1\r\nKeep-Alive: 5\r\nHost: b\r\n\r\n") == (
        b"GET /d HTTP/1.1\r\nHost: b\r\n" + _fwd(b"b") + b"\r\n"
    )


def test_absolute_form_target_puts_its_authority_in_the_first_host_line() -> None:
    sent = _Client().send(b"GET http://c.example/p?q HTTP/1.1\r\nHost: other\r\n\r\n")
    assert sent == b"GET /p?q HTTP/1.1\r\nHost: c.example\r\n" + _fwd(b"c.example") + b"\r\n"


def test_two_host_headers_in_lenient_mode_both_go_in_order() -> None:
    sent = _Client("lenient").send(b"GET / HTTP/1.1\r\nHost: a\r\nX-A: 1\r\nHost: b\r\n\r\n")
    assert sent == b"GET / HTTP/1.1\r\nHost: a\r\nX-A: 1\r\nHost: b\r\n" + _fwd(b"b") + b"\r\n"
    sent = _Client("lenient").send(b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n")
    assert sent == b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n" + _fwd(b"b") + b"\r\n"


def test_hash_on_the_host_header_reads_the_host_line_kept_aside() -> None:
    # sticky.mode hash on header:Host: each Host keeps to one backend (read from the
    # Host kept for the request line, not from the other forwarded headers)
    proxy = Proxy(
        "listen: 127.0.0.1:8080\nhealth_check: {enabled: false}\n"
        "sticky: {mode: hash, hash_on: 'header:Host'}\n"
        "pools: {blue: {weight: 100, backends: [{address: 127.0.0.1:9001}, "
        "{address: 127.0.0.1:9002}, {address: 127.0.0.1:9003}]}}\n"
    )
    conn, _ = proxy.client()
    chosen: dict[bytes, set[str]] = {}
    for i in range(30):
        host = b"h%d.example" % (i % 6)
        for backend in ("blue-1", "blue-2", "blue-3"):
            proxy.pooled(backend)
        conn.data_received(b"GET / HTTP/1.1\r\nHost: %s\r\n\r\n" % host)
        exchange = conn.queue[0]
        assert exchange.hash_key == host.decode()
        assert exchange.backend is not None and exchange.upstream is not None
        chosen.setdefault(host, set()).add(exchange.backend.id)
        exchange.upstream.data_received(b"HTTP/1.1 204 No Content\r\n\r\n")
    assert all(len(backends) == 1 for backends in chosen.values()), chosen


# ---- the last response head, taken by a prefix compare ----------------------------

H1 = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nX-B: 1\r\n\r\n"


def _answer(client: _Client, response: bytes) -> tuple[bytes, int]:
    """Send a GET, answer it with ``response``: what the client got, and the status."""
    upstream, _ = client.proxy.pooled("blue-1")
    client.conn.data_received(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
    exchange = client.conn.queue[0]
    upstream.data_received(response)
    return client.wire.take(), exchange.status


def test_a_repeated_response_head_is_relayed_as_the_first_was() -> None:
    client = _Client()
    out = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nX-B: 1\r\nX-Zdproxy-Pool: blue\r\n\r\nhello"
    assert _answer(client, H1 + b"hello") == (out, 200)
    assert _answer(client, H1 + b"hello") == (out, 200)  # the same head: by prefix
    # another status and head after it: parsed, not taken for the last one
    other = b"HTTP/1.1 404 Not Found\r\nContent-Length: 5\r\nX-B: 1\r\n\r\n"
    got = _answer(client, other + b"nope!")
    assert got == (other[:-2] + b"X-Zdproxy-Pool: blue\r\n\r\nnope!", 404)
    # the same status and a head that differs late: parsed too
    late = H1.replace(b"X-B: 1", b"X-B: 2")
    assert _answer(client, late + b"hello") == (out.replace(b"X-B: 1", b"X-B: 2"), 200)
    assert _answer(client, late + b"hello") == (out.replace(b"X-B: 1", b"X-B: 2"), 200)
    # a 1xx before the same head: the final head is found after it
    assert _answer(client, b"HTTP/1.1 102 Processing\r\n\r\n" + H1 + b"hello") == (out, 200)
    assert _answer(client, H1 + b"hello") == (out, 200)


def test_a_repeated_response_head_still_meets_a_lowered_head_limit() -> None:
    client = _Client()
    _answer(client, H1 + b"hello")
    client.proxy.pools.max_head_bytes = len(H1) - 1  # as a reload would lower it
    got, status = _answer(client, H1 + b"hello")
    assert got.startswith(b"HTTP/1.1 502 ") and status == 502


def test_get_is_read_from_the_request_line_and_other_methods_from_the_parser() -> None:
    client = _Client()
    assert client.send(b"GET /g HTTP/1.1\r\nHost: a\r\n\r\n").startswith(b"GET /g HTTP/1.1\r\n")
    client = _Client()
    assert client.send(b"HEAD /h HTTP/1.1\r\nHost: a\r\n\r\n").startswith(b"HEAD /h HTTP/1.1")


def test_keep_alive_without_asking_the_parser_only_when_nothing_says_otherwise() -> None:
    for request, closes in (
        (b"GET / HTTP/1.1\r\nHost: a\r\n\r\n", False),
        (b"GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n", True),
        (b"GET / HTTP/1.1\r\nHost: a\r\nConnection: X-A, close\r\n\r\n", True),
        (b"GET / HTTP/1.1\r\nHost: a\r\nConnection: keep-alive\r\n\r\n", False),
        (b"GET / HTTP/1.0\r\nHost: a\r\n\r\n", True),
        (b"GET / HTTP/1.0\r\nHost: a\r\nConnection: keep-alive\r\n\r\n", False),
    ):
        client = _Client()
        upstream, _ = client.proxy.pooled("blue-1")
        client.conn.data_received(request)
        upstream.data_received(H1 + b"hello")
        out = client.wire.take()
        assert (b"\r\nConnection: close\r\n" in out) is closes, request
        assert client.wire.closed is closes, request


KEEP = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n"
CLOSE = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nConnection: close\r\n\r\n"


def _pooled_after(client: _Client, response: bytes) -> bool:
    """Whether the upstream connection went back to the pool after ``response``."""
    upstream, wire = client.proxy.pooled("blue-1")
    client.conn.data_received(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
    upstream.data_received(response)
    assert client.wire.take().endswith(b"hello")
    return not wire.closed


def test_keep_alive_of_a_repeated_head_is_the_heads_own() -> None:
    client = _Client()
    got = [_pooled_after(client, r + b"hello") for r in (KEEP, KEEP, CLOSE, CLOSE, KEEP)]
    assert got == [True, True, False, False, True]


def test_keep_alive_learnt_only_for_the_head_it_was_asked_for() -> None:
    # client A's response begins (head KEEP), B's whole CLOSE response comes, then
    # A's ends: A's answer must not be taken for B's head, nor B's for A's
    a, b = _Client(), _Client()
    b.proxy = a.proxy
    b.conn, b.wire = a.proxy.client()
    a_up, a_wire = a.proxy.pooled("blue-1")
    a.conn.data_received(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
    a_up.data_received(KEEP + b"he")
    assert not _pooled_after(b, CLOSE + b"hello")
    a_up.data_received(b"llo")
    assert a.wire.take().endswith(b"hello") and not a_wire.closed
    assert not _pooled_after(b, CLOSE + b"hello")
    assert _pooled_after(a, KEEP + b"hello")


def test_keep_alive_of_a_split_head_after_a_head_request_is_asked_anew() -> None:
    # a HEAD's answer ends without the parser's message-complete; the next
    # response on that connection, its head split across reads, is not the last
    # head: its own Connection: close counts
    empty = b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"
    client = _Client()
    upstream, wire = client.proxy.pooled("blue-1")
    for method in (b"GET", b"HEAD"):  # the second: the head is the last one
        client.conn.data_received(method + b" / HTTP/1.1\r\nHost: a\r\n\r\n")
        upstream.data_received(empty)
        assert client.wire.take().startswith(b"HTTP/1.1 200 OK\r\n") and not wire.closed
    client.conn.data_received(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
    upstream.data_received(CLOSE[:20])
    upstream.data_received(CLOSE[20:] + b"hello")
    assert client.wire.take().endswith(b"hello") and wire.closed


# ---- the request-ID line ends both heads --------------------------------------------


def _with_ids() -> _Client:
    """Request IDs on (in the config, so the data path knows the header), with a
    known prefix for exact bytes."""
    client = _Client.__new__(_Client)
    client.proxy = Proxy((QUIET % "strict").replace("id: {enabled: false}", "id: {enabled: true}"))
    client.conn, client.wire = client.proxy.client()
    assert client.proxy.ctx.request_ids is not None
    client.proxy.ctx.request_ids = RequestIds("X-Request-Id", True, prefix=b"p")
    return client


def test_request_id_line_ends_both_heads_or_goes_before_the_last_lines() -> None:
    client = _with_ids()
    up, up_wire = client.proxy.pooled("blue-1")
    client.conn.data_received(b"GET /a HTTP/1.1\r\nHost: a\r\n\r\n")
    assert up_wire.take() == b"GET /a HTTP/1.1\r\nHost: a\r\n" + _fwd(b"a") + (
        b"X-Request-Id: p-01\r\n\r\n"
    )
    up.data_received(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
    assert client.wire.take() == (
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nX-Zdproxy-Pool: blue\r\n"
        b"X-Request-Id: p-01\r\n\r\nok"
    )
    # a chunked answer: its Transfer-Encoding line, then the blank line
    client.conn.data_received(b"GET /b HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
    assert up_wire.take().endswith(b"X-Request-Id: p-02\r\n\r\n")
    up.data_received(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n")
    assert client.wire.take() == (
        b"HTTP/1.1 200 OK\r\nX-Zdproxy-Pool: blue\r\nX-Request-Id: p-02\r\n"
        b"Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n2\r\nok\r\n0\r\n\r\n"
    )


def test_request_id_line_of_a_request_without_host_and_an_echoing_backend() -> None:
    client = _with_ids()
    up, up_wire = client.proxy.pooled("blue-1")
    client.conn.data_received(b"GET /a HTTP/1.0\r\nX-Request-Id: mine\r\n\r\n")
    assert up_wire.take() == (
        b"GET /a HTTP/1.1\r\nX-Forwarded-For: 192.0.2.7\r\nX-Forwarded-Proto: http\r\n"
        b"X-Request-Id: mine\r\nHost: 127.0.0.1:9001\r\n\r\n"
    )
    # the backend sets the header itself: not written twice
    up.data_received(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nx-request-id: mine\r\n\r\nok")
    assert client.wire.take() == (
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nx-request-id: mine\r\n"
        b"X-Zdproxy-Pool: blue\r\nConnection: close\r\n\r\nok"
    )


def test_head_prefix_is_kept_only_while_its_three_pieces_are_the_same() -> None:
    proxy = Proxy(QUIET % "strict")
    upstream, _ = proxy.pooled("blue-1")
    head, pool, cookie = b"HTTP/1.1 200 OK\r\nA: 1\r\n", b"X-Pool: blue\r\n", b"Set-Cookie: 1\r\n"
    first = upstream.head_prefix(head, pool, cookie)
    assert first == head + pool + cookie
    assert upstream.head_prefix(head, pool, cookie) is first
    # another pin (a new second), another pool, another head: made anew
    for args in (
        (head, pool, b"Set-Cookie: 2\r\n"),
        (head, b"X-Pool: green\r\n", b"Set-Cookie: 2\r\n"),
        (b"HTTP/1.1 200 OK\r\nA: 2\r\n", b"X-Pool: green\r\n", b"Set-Cookie: 2\r\n"),
        (b"HTTP/1.1 200 OK\r\nA: 2\r\n", b"", b""),
    ):
        assert upstream.head_prefix(*args) == b"".join(args)


# ---- a whole response the same as the last one: relayed without the parser ---------

OUT1 = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nX-B: 1\r\nX-Zdproxy-Pool: blue\r\n\r\n"


class _Spy:
    """A parser protocol that records every callback: fed, it shows the parser ran."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    def on_message_begin(self) -> None:
        self.calls.append("begin")

    def on_message_complete(self) -> None:
        self.calls.append("complete")


class _Backend:
    """One kept-alive upstream connection of one client's requests, reused each
    time (the pool holds it alone)."""

    def __init__(self) -> None:
        self.client = _Client()
        self.upstream, self.wire = self.client.proxy.pooled("blue-1")

    def ask(
        self, response: bytes, *reads: int, method: bytes = b"GET", version: bytes = b"1.1"
    ) -> bytes:
        """Send a request, answer it with ``response`` (cut at ``reads``): what
        the client got. The request must reach this connection."""
        request = b"%s / HTTP/%s\r\nHost: a\r\n\r\n" % (method, version)
        self.client.conn.data_received(request)
        assert self.wire.take().startswith(method + b" / HTTP/1.1\r\n")
        start = 0
        for cut in (*reads, len(response)):
            self.upstream.data_received(response[start:cut])
            start = cut
        return self.client.wire.take()

    def pooled(self) -> bool:
        """The connection is idle in the pool, open."""
        return not self.wire.closed and self.client.proxy.pools.idle_count("blue-1") == 1


def test_a_repeated_whole_response_is_relayed_without_the_parser() -> None:
    backend = _Backend()
    assert backend.ask(H1 + b"hello") == OUT1 + b"hello"
    assert backend.upstream.repeat_size == len(H1) + 5 and backend.pooled()
    spy = _Spy()
    parser = backend.upstream.parser
    backend.upstream.parser = httptools.HttpResponseParser(spy)
    for body in (b"hello", b"world"):  # the same head; the body is relayed as read
        assert backend.ask(H1 + body) == OUT1 + body
        assert backend.pooled()
    assert spy.calls == []
    # the parser stays between messages: it reads the next other response
    backend.upstream.parser = parser
    other = b"HTTP/1.1 404 Not Found\r\nContent-Length: 4\r\n\r\n"
    assert backend.ask(other + b"nope") == other[:-2] + b"X-Zdproxy-Pool: blue\r\n\r\nnope"
    chunked = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
    got = backend.ask(chunked + b"2\r\nok\r\n0\r\n\r\n")
    assert got == (
        b"HTTP/1.1 200 OK\r\nX-Zdproxy-Pool: blue\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"2\r\nok\r\n0\r\n\r\n"
    )
    assert backend.ask(H1 + b"hello") == OUT1 + b"hello" and backend.pooled()


def test_a_repeat_is_taken_only_whole_and_alone_in_its_read() -> None:
    backend = _Backend()
    backend.ask(H1 + b"hello")
    # split across reads: the parser's way, the same bytes out
    assert backend.ask(H1 + b"hello", 3, len(H1) + 2) == OUT1 + b"hello" and backend.pooled()
    # more bytes than the response: the parser sees them, the connection is
    # out of step with its backend and closes; the client still gets its answer
    assert backend.ask(H1 + b"hello" + b"HTTP/1.1 200 OK\r\n") == OUT1 + b"hello"
    assert backend.wire.closed and backend.client.proxy.pools.idle_count("blue-1") == 0


def test_a_head_request_is_never_answered_as_a_repeat() -> None:
    backend = _Backend()
    backend.ask(H1 + b"hello")
    # a backend that sends a body after the head of a HEAD's answer: the body is
    # not relayed, and the connection is not trusted again
    assert backend.ask(H1 + b"hello", method=b"HEAD") == OUT1
    assert backend.wire.closed


def test_only_a_kept_alive_content_length_response_is_learnt() -> None:
    for response in (
        CLOSE + b"hello",  # closes: never reused
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
        b"HTTP/1.1 204 No Content\r\nX-B: 1\r\n\r\n",  # no body: its head does not say
        b"HTTP/1.1 304 Not Modified\r\nContent-Length: 5\r\n\r\n",
        b"HTTP/1.0 200 OK\r\nContent-Length: 5\r\n\r\nhello",  # 1.0 without keep-alive
    ):
        backend = _Backend()
        backend.ask(response)
        assert backend.upstream.repeat_size == -1, response
    # chunked to an HTTP/1.0 client (relayed as it comes, to the close): the
    # upstream connection is kept, its chunked size not learnt
    backend = _Backend()
    chunked = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n"
    assert backend.ask(chunked, version=b"1.0").endswith(b"\r\n\r\nhello")
    assert backend.upstream.repeat_size == -1 and backend.pooled()
    # a HEAD's answer is not a size either, nor is a response split from its head
    backend = _Backend()
    backend.ask(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n", method=b"HEAD")
    assert backend.upstream.repeat_size == -1 and backend.pooled()
    backend.ask(KEEP + b"hello", len(KEEP) - 4)
    assert backend.upstream.repeat_size == -1
    # a new head forgets the size learnt with the last one
    backend.ask(KEEP + b"hello")
    assert backend.upstream.repeat_size == len(KEEP) + 5
    backend.ask(H1 + b"hello")
    assert backend.upstream.repeat_size == len(H1) + 5
    # a head split across reads is parsed, and leaves what was learnt alone
    assert backend.ask(H1 + b"hello", 20) == OUT1 + b"hello"
    assert backend.upstream.repeat_size == len(H1) + 5 and backend.pooled()


def test_a_repeat_still_meets_a_lowered_head_limit() -> None:
    backend = _Backend()
    backend.ask(H1 + b"hello")
    backend.client.proxy.pools.max_head_bytes = len(H1) - 1  # as a reload would lower it
    got = backend.ask(H1 + b"hello")
    assert got.startswith(b"HTTP/1.1 502 ") and backend.wire.closed
