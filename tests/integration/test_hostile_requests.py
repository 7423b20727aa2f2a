"""Hostile and broken requests through a real ``zdproxy run`` process: a table of
raw-socket cases, each with the status it must get and whether the proxy must
close the connection.

Every case is sent in one write followed by a pipelined request:

* when the case must close, the follow-up is a smuggling attempt
  (``GET /smuggled-<case>``): the connection must close after the answer and
  the recording backend must never see it, nor any complete request of the case
  that the proxy refused;
* when the case keeps the connection, the follow-up is a legitimate request
  that must be answered on the same connection (the framing stayed in sync).

The recording backend checks that everything it receives is one well-formed
HTTP/1.1 request (its own strict parser), so a case that is forwarded is also
checked for what the proxy sent.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from support_hostile import (
    ProxyProcess,
    RawClient,
    RecordingBackend,
    exchange,
    get,
)

MAX_BODY = 4096


@dataclass(frozen=True)
class Case:
    id: str
    request: bytes
    #: the status the client must get
    status: int
    #: whether the proxy closes the connection after answering
    closes: bool
    #: the X-Zdproxy-Error the answer carries; None: a proxied response (no such header)
    error: str | None = None
    #: complete requests the backend receives from the case (not counting the follow-up)
    forwarded: int = 0


H = b"Host: hostile.test\r\n"


def post(extra: bytes, body: bytes = b"", version: bytes = b"HTTP/1.1") -> bytes:
    return b"POST /upload " + version + b"\r\n" + H + extra + b"\r\n" + body


def req(line: bytes, extra: bytes = b"") -> bytes:
    return line + b"\r\n" + H + extra + b"\r\n"


CHUNKED = b"Transfer-Encoding: chunked\r\n"
BAD = "bad-request"

CASES = [
    # ---- body framing: Content-Length and Transfer-Encoding -----------------------------
    Case("cl-and-te", post(b"Content-Length: 5\r\n" + CHUNKED, b"0\r\n\r\n"), 400, True, BAD),
    Case("te-and-cl", post(CHUNKED + b"Content-Length: 5\r\n", b"0\r\n\r\n"), 400, True, BAD),
    Case(
        "cl-differing",
        post(b"Content-Length: 5\r\nContent-Length: 6\r\n", b"hello!"),
        400,
        True,
        BAD,
    ),
    Case(
        "cl-duplicate",
        post(b"Content-Length: 5\r\nContent-Length: 5\r\n", b"hello"),
        400,
        True,
        BAD,
    ),
    Case("cl-list", post(b"Content-Length: 5, 5\r\n", b"hello"), 400, True, BAD),
    Case("cl-plus", post(b"Content-Length: +5\r\n", b"hello"), 400, True, BAD),
    Case("cl-hex", post(b"Content-Length: 0x5\r\n", b"hello"), 400, True, BAD),
    Case("cl-negative", post(b"Content-Length: -1\r\n", b"hello"), 400, True, BAD),
    Case("cl-two-numbers", post(b"Content-Length: 5 5\r\n", b"hello"), 400, True, BAD),
    Case("cl-decimal-point", post(b"Content-Length: 5.0\r\n", b"hello"), 400, True, BAD),
    Case("cl-overflow", post(b"Content-Length: 99999999999999999999999\r\n"), 400, True, BAD),
    Case("cl-empty", post(b"Content-Length: \r\n", b"hello"), 400, True, BAD),
    Case(
        "te-chunked-chunked",
        post(b"Transfer-Encoding: chunked, chunked\r\n", b"0\r\n\r\n"),
        400,
        True,
        BAD,
    ),
    Case("te-two-headers", post(CHUNKED + CHUNKED, b"0\r\n\r\n"), 400, True, BAD),
    Case("te-gzip", post(b"Transfer-Encoding: gzip\r\n", b"0\r\n\r\n"), 400, True, BAD),
    Case("te-identity", post(b"Transfer-Encoding: identity\r\n", b"0\r\n\r\n"), 400, True, BAD),
    Case("te-unknown", post(b"Transfer-Encoding: xchunked\r\n", b"0\r\n\r\n"), 400, True, BAD),
    Case(
        "te-chunked-not-last",
        post(b"Transfer-Encoding: chunked, gzip\r\n", b"0\r\n\r\n"),
        400,
        True,
        BAD,
    ),
    Case(
        "te-space-before-colon",
        post(b"Transfer-Encoding : chunked\r\n", b"0\r\n\r\n"),
        400,
        True,
        BAD,
    ),
    Case(
        "te-underscore-name", post(b"Transfer_Encoding: chunked\r\n", b"0\r\n\r\n"), 400, True, BAD
    ),
    Case("te-vtab-value", post(b"Transfer-Encoding:\x0bchunked\r\n", b"0\r\n\r\n"), 400, True, BAD),
    Case("te-in-http10", post(CHUNKED, b"0\r\n\r\n", b"HTTP/1.0"), 400, True, BAD),
    Case(
        "get-with-body", req(b"GET / HTTP/1.1", b"Content-Length: 5\r\n") + b"hello", 400, True, BAD
    ),
    # ---- header syntax -----------------------------------------------------------------
    Case("obs-fold", req(b"GET / HTTP/1.1", b"X-Folded: a\r\n b\r\n"), 400, True, BAD),
    Case(
        "obs-fold-te",
        post(b"X-A: a\r\n Transfer-Encoding: chunked\r\n", b"0\r\n\r\n"),
        400,
        True,
        BAD,
    ),
    Case("space-before-colon", req(b"GET / HTTP/1.1", b"X-Name : value\r\n"), 400, True, BAD),
    Case("tab-before-colon", req(b"GET / HTTP/1.1", b"X-Name\t: value\r\n"), 400, True, BAD),
    Case("nul-in-name", req(b"GET / HTTP/1.1", b"X-Na\x00me: value\r\n"), 400, True, BAD),
    Case("cr-in-name", req(b"GET / HTTP/1.1", b"X-Na\rme: value\r\n"), 400, True, BAD),
    Case("nul-in-value", req(b"GET / HTTP/1.1", b"X-Name: va\x00lue\r\n"), 400, True, BAD),
    Case("cr-in-value", req(b"GET / HTTP/1.1", b"X-Name: va\rlue\r\n"), 400, True, BAD),
    Case("lf-in-value", req(b"GET / HTTP/1.1", b"X-Name: va\nlue\r\n"), 400, True, BAD),
    Case("no-colon", req(b"GET / HTTP/1.1", b"X-Name value\r\n"), 400, True, BAD),
    Case("bare-lf-lines", b"GET / HTTP/1.1\nHost: hostile.test\n\n", 400, True, BAD),
    Case("several-host", req(b"GET / HTTP/1.1", b"Host: other.test\r\n"), 400, True, BAD),
    Case("no-host-http11", b"GET / HTTP/1.1\r\nX-A: b\r\n\r\n", 400, True, BAD),
    # ---- request line: target, method, version -------------------------------------------
    Case("nul-in-target", req(b"GET /a\x00b HTTP/1.1"), 400, True, "bad-target"),
    Case("cr-in-target", req(b"GET /a\rb HTTP/1.1"), 400, True, "bad-target"),
    Case("lf-in-target", req(b"GET /a\nb HTTP/1.1"), 400, True, BAD),
    Case("space-in-target", req(b"GET /a b HTTP/1.1"), 400, True, BAD),
    Case("target-not-origin-form", req(b"GET foo HTTP/1.1"), 400, True, "bad-target"),
    Case("asterisk-with-get", req(b"GET * HTTP/1.1"), 400, True, BAD),
    Case("bad-method", req(b"G@T / HTTP/1.1"), 400, True, "bad-method"),
    Case("http2-version", req(b"GET / HTTP/2.0"), 505, True, "bad-version"),
    Case("http12-version", req(b"GET / HTTP/1.2"), 505, True, "bad-version"),
    Case("http30-version", req(b"GET / HTTP/3.0"), 505, True, "bad-version"),
    Case("version-three-parts", req(b"GET / HTTP/1.1.1"), 400, True, BAD),
    Case("version-lowercase", req(b"GET / http/1.1"), 400, True, BAD),
    Case("version-not-http", req(b"GET / FOO/1.1"), 400, True, BAD),
    Case("version-no-dot", req(b"GET / HTTP/11"), 400, True, BAD),
    # ---- chunked bodies ------------------------------------------------------------------
    Case("chunk-size-not-hex", post(CHUNKED, b"zz\r\nhello\r\n0\r\n\r\n"), 400, True, BAD),
    Case("chunk-size-negative", post(CHUNKED, b"-5\r\nhello\r\n0\r\n\r\n"), 400, True, BAD),
    Case("chunk-size-0x", post(CHUNKED, b"0x5\r\nhello\r\n0\r\n\r\n"), 400, True, BAD),
    Case(
        "chunk-size-overflow",
        post(CHUNKED, b"1" + b"0" * 17 + b"\r\nx\r\n0\r\n\r\n"),
        400,
        True,
        BAD,
    ),
    Case("chunk-size-space", post(CHUNKED, b"5 \r\nhello\r\n0\r\n\r\n"), 400, True, BAD),
    Case("chunk-size-empty", post(CHUNKED, b"\r\nhello\r\n0\r\n\r\n"), 400, True, BAD),
    Case("chunk-ext-space", post(CHUNKED, b"5;a=b c\r\nhello\r\n0\r\n\r\n"), 400, True, BAD),
    Case("chunk-ext-bad-char", post(CHUNKED, b"5;a\x01\r\nhello\r\n0\r\n\r\n"), 400, True, BAD),
    Case("chunk-data-overrun", post(CHUNKED, b"5\r\nhelloXX0\r\n\r\n"), 400, True, BAD),
    Case("chunk-bare-lf", post(CHUNKED, b"5\nhello\n0\n\n"), 400, True, BAD),
    Case(
        "chunk-ext-valid", post(CHUNKED, b"5;name=value\r\nhello\r\n0\r\n\r\n"), 200, False, None, 1
    ),
    Case(
        "chunk-ext-quoted", post(CHUNKED, b'5;n="v w"\r\nhello\r\n0\r\n\r\n'), 200, False, None, 1
    ),
    # ---- limits ----------------------------------------------------------------------------
    Case(
        "header-too-large",
        req(b"GET / HTTP/1.1", b"X-Big: " + b"a" * 70_000 + b"\r\n"),
        431,
        True,
        "headers-too-large",
    ),
    Case(
        "headers-total-too-large",
        req(b"GET / HTTP/1.1", b"".join(b"X-H%d: %s\r\n" % (i, b"b" * 800) for i in range(90))),
        431,
        True,
        "headers-too-large",
    ),
    Case(
        "target-too-large",
        req(b"GET /" + b"u" * 70_000 + b" HTTP/1.1"),
        431,
        True,
        "headers-too-large",
    ),
    Case(
        "too-many-headers",
        req(b"GET / HTTP/1.1", b"".join(b"X-H%d: v\r\n" % i for i in range(101))),
        431,
        True,
        "too-many-headers",
    ),
    Case(
        "many-headers-at-limit",
        req(b"GET / HTTP/1.1", b"".join(b"X-H%d: v\r\n" % i for i in range(99))),
        200,
        False,
        None,
        1,
    ),
    Case(
        "body-cl-too-large",
        post(b"Content-Length: %d\r\n" % (MAX_BODY + 1)),
        413,
        True,
        "body-too-large",
    ),
    Case(
        "body-chunked-too-large",
        post(CHUNKED, b"%x\r\n%s\r\n0\r\n\r\n" % (MAX_BODY + 1, b"z" * (MAX_BODY + 1))),
        413,
        True,
        "body-too-large",
    ),
    Case(
        "body-chunked-too-large-in-pieces",
        post(
            CHUNKED,
            b"800\r\n" + b"z" * 0x800 + b"\r\n" + b"801\r\n" + b"z" * 0x801 + b"\r\n0\r\n\r\n",
        ),
        413,
        True,
        "body-too-large",
    ),
    Case(
        "expect-100-too-large",
        post(b"Expect: 100-continue\r\nContent-Length: %d\r\n" % (MAX_BODY + 1)),
        413,
        True,
        "body-too-large",
    ),
    Case(
        "body-at-limit",
        post(b"Content-Length: %d\r\n" % MAX_BODY, b"q" * MAX_BODY),
        200,
        False,
        None,
        1,
    ),
    # ---- other refusals ----------------------------------------------------------------
    Case(
        "expect-unknown",
        req(b"GET / HTTP/1.1", b"Expect: teapot\r\n"),
        417,
        True,
        "expectation-failed",
    ),
    Case(
        "websocket-without-key",
        req(
            b"GET /ws HTTP/1.1",
            b"Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\n",
        ),
        400,
        True,
        BAD,
    ),
    Case("connect-method", req(b"CONNECT hostile.test:443 HTTP/1.1"), 400, True, BAD),
    Case(
        "upgrade-with-body",
        req(b"POST /up HTTP/1.1", b"Upgrade: foo\r\nConnection: Upgrade\r\nContent-Length: 3\r\n")
        + b"abc",
        400,
        True,
        BAD,
    ),
    # ---- accepted: the framing is sound ----------------------------------------------------
    Case("plain-get", req(b"GET /plain HTTP/1.1"), 200, False, None, 1),
    Case("post-content-length", post(b"Content-Length: 5\r\n", b"hello"), 200, False, None, 1),
    Case(
        "post-chunked",
        post(CHUNKED, b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n"),
        200,
        False,
        None,
        1,
    ),
    Case(
        "post-chunked-trailer",
        post(CHUNKED, b"5\r\nhello\r\n0\r\nX-T: 1\r\n\r\n"),
        200,
        False,
        None,
        1,
    ),
    Case("double-space-after-method", req(b"GET  /double HTTP/1.1"), 200, False, None, 1),
    Case(
        "te-gzip-chunked",
        post(b"Transfer-Encoding: gzip, chunked\r\n", b"0\r\n\r\n"),
        200,
        False,
        None,
        1,
    ),
    Case(
        "te-chunked-uppercase",
        post(b"Transfer-Encoding: CHUNKED\r\n", b"0\r\n\r\n"),
        200,
        False,
        None,
        1,
    ),
    Case("cl-leading-zeros", post(b"Content-Length: 005\r\n", b"hello"), 200, False, None, 1),
    Case("get-cl-zero", req(b"GET / HTTP/1.1", b"Content-Length: 0\r\n"), 200, False, None, 1),
    Case("absolute-form", req(b"GET http://hostile.test/abs HTTP/1.1"), 200, False, None, 1),
    Case("options-asterisk", req(b"OPTIONS * HTTP/1.1"), 200, False, None, 1),
    Case("obs-text-in-value", req(b"GET / HTTP/1.1", b"X-Latin: caf\xe9\r\n"), 200, False, None, 1),
    Case(
        "http10-keep-alive",
        req(b"GET / HTTP/1.0", b"Connection: keep-alive\r\n"),
        200,
        False,
        None,
        1,
    ),
    Case("http10-default-close", req(b"GET / HTTP/1.0"), 200, True, None, 1),
    Case("connection-close", req(b"GET / HTTP/1.1", b"Connection: close\r\n"), 200, True, None, 1),
    Case(
        "hop-by-hop-stripped",
        req(
            b"GET / HTTP/1.1",
            b"Connection: X-Secret, keep-alive\r\nX-Secret: 1\r\nKeep-Alive: 5\r\n"
            b"TE: trailers\r\nProxy-Connection: keep-alive\r\nTrailer: X-T\r\n",
        ),
        200,
        False,
        None,
        1,
    ),
]


def _case_id(case: Case) -> str:
    return case.id


@pytest.fixture(scope="module")
def backend() -> Iterator[RecordingBackend]:
    server = RecordingBackend().start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def proxy(
    backend: RecordingBackend, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ProxyProcess]:
    workdir: Path = tmp_path_factory.mktemp("hostile")
    process = ProxyProcess(
        workdir, [backend.port], {"limits": {"max_body_bytes": MAX_BODY}}
    ).start()
    yield process
    code = process.stop()
    # SIGTERM ends it cleanly: it never crashed along the way
    assert code == 0, process.log()


def settle(proxy: ProxyProcess, backend: RecordingBackend) -> None:
    """A fresh request through the proxy and back: anything the proxy forwarded
    before it has reached the backend by now."""
    count = len(backend.snapshot()[0])
    response, client = exchange(proxy.port, get("/barrier"))
    client.close()
    assert response.status == 200
    backend.wait_requests(count + 1)


def test_table_has_enough_cases() -> None:
    assert len(CASES) >= 40
    assert len({case.id for case in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_case(case: Case, proxy: ProxyProcess, backend: RecordingBackend) -> None:
    mark = backend.mark()
    follow = b"/smuggled-" if case.closes else b"/follow-"
    follow_target = follow + case.id.encode()
    with RawClient(proxy.port) as client:
        client.send(case.request + get(follow_target.decode()))
        response = client.read_response()
        assert response.status == case.status, response
        assert response.header(b"x-zdproxy-error") == (
            None if case.error is None else case.error.encode()
        ), response.headers
        if case.error is not None:
            assert response.header(b"connection") == b"close"
        if case.closes:
            assert client.closed_by_peer(), "the proxy kept the connection open"
        else:
            second = client.read_response()
            assert second.status == 200, second
            assert client.still_open()
    settle(proxy, backend)
    requests, malformed, _ = backend.since(mark)
    assert malformed == [], "the proxy sent a malformed request upstream"
    mine = [r for r in requests if not r.target.startswith(b"/barrier")]
    follow_ups = [r for r in mine if r.target == follow_target]
    assert len(mine) - len(follow_ups) == case.forwarded, [r.raw[:200] for r in mine]
    if case.closes:
        assert follow_ups == [], "a request pipelined after the answer reached the backend"
        assert b"/smuggled-" not in b"".join(bytes(c.raw) for c in backend.conns)
    else:
        assert len(follow_ups) == 1
    assert proxy.alive()


def test_forwarded_request_is_rewritten(proxy: ProxyProcess, backend: RecordingBackend) -> None:
    """Hop-by-hop headers and whatever Connection names are gone; framing is redone."""
    mark = backend.mark()
    request = req(
        b"POST /rewrite HTTP/1.1",
        b"Connection: X-Secret\r\nX-Secret: 1\r\nKeep-Alive: 5\r\nTE: trailers\r\n"
        b"Transfer-Encoding: chunked\r\n",
    )
    response, client = exchange(proxy.port, request + b"3\r\nabc\r\n2;x=y\r\nde\r\n0\r\n\r\n")
    client.close()
    assert response.status == 200
    seen = backend.wait_requests(mark[0] + 1)[mark[0]]
    names = {name.lower() for name, _ in seen.headers}
    assert names.isdisjoint({b"x-secret", b"keep-alive", b"te", b"connection"})
    assert seen.header(b"transfer-encoding") == b"chunked"
    assert seen.body == b"abcde"


def test_transfer_codings_before_chunked_travel_on(
    proxy: ProxyProcess, backend: RecordingBackend
) -> None:
    """gzip applied before chunked is the body's own coding: the proxy redoes the
    chunking but must not drop the gzip (identity means nothing and goes)."""
    mark = backend.mark()
    request = post(b"Transfer-Encoding: gzip\r\nTransfer-Encoding: identity, chunked\r\n")
    response, client = exchange(proxy.port, request + b"3\r\n\x1f\x8b\x08\r\n0\r\n\r\n")
    client.close()
    assert response.status == 200
    seen = backend.wait_requests(mark[0] + 1)[mark[0]]
    assert seen.header(b"transfer-encoding") == b"gzip, chunked"
    assert seen.body == b"\x1f\x8b\x08"


def test_pipelined_good_bad_smuggled(proxy: ProxyProcess, backend: RecordingBackend) -> None:
    """A good request, then a broken one, then a smuggling attempt, in one write:
    the good one is answered, the broken one gets 400, the rest is never read."""
    mark = backend.mark()
    data = (
        get("/pipe-good")
        + post(b"Content-Length: 5\r\n" + CHUNKED, b"0\r\n\r\n")
        + get("/smuggled-pipe")
    )
    with RawClient(proxy.port) as client:
        client.send(data)
        first = client.read_response()
        second = client.read_response()
        assert (first.status, second.status) == (200, 400)
        assert second.header(b"x-zdproxy-error") == b"bad-request"
        assert client.closed_by_peer()
    settle(proxy, backend)
    requests, malformed, _ = backend.since(mark)
    assert malformed == []
    assert [r.target for r in requests if r.target != b"/barrier"] == [b"/pipe-good"]


def test_pipelined_bad_chunk_behind_slow_answer(
    proxy: ProxyProcess, backend: RecordingBackend
) -> None:
    """A request whose chunked body breaks while an earlier pipelined request is
    still being answered: the earlier answer comes first, then 400, and the broken
    request never starts."""
    mark = backend.mark()
    data = get("/pipe-first") + post(CHUNKED, b"zz\r\n") + get("/smuggled-behind")
    with RawClient(proxy.port) as client:
        client.send(data)
        assert client.read_response().status == 200
        refused = client.read_response()
        assert refused.status == 400
        assert client.closed_by_peer()
    settle(proxy, backend)
    requests, malformed, _ = backend.since(mark)
    assert malformed == []
    assert [r.target for r in requests if r.target != b"/barrier"] == [b"/pipe-first"]


def test_connection_close_stops_reading(proxy: ProxyProcess, backend: RecordingBackend) -> None:
    """Bytes after a request that asked to close are never parsed as a request."""
    mark = backend.mark()
    with RawClient(proxy.port) as client:
        client.send(
            req(b"GET /closing HTTP/1.1", b"Connection: close\r\n") + get("/smuggled-close")
        )
        assert client.read_response().status == 200
        # the proxy may answer the stray bytes with a 400, never with a proxied response
        while not client.closed_by_peer():
            assert client.read_response().status == 400
    settle(proxy, backend)
    requests, _, _ = backend.since(mark)
    assert [r.target for r in requests if r.target != b"/barrier"] == [b"/closing"]


def test_nothing_smuggled_in_the_whole_module(backend: RecordingBackend) -> None:
    """Last: across every case, no smuggled request reached the backend."""
    _, malformed, conns = backend.snapshot()
    assert malformed == []
    assert all(b"/smuggled-" not in bytes(c.raw) for c in conns)
