"""Property-based fuzzing of request parsing through a real ``zdproxy run``.

Hypothesis mutates valid seed requests (single and pipelined, with Content-Length
and chunked bodies) with byte insertions, deletions, replacements and spliced
hostile fragments (framing headers, CR/LF/NUL, versions, chunk sizes), sends
each result on a fresh raw connection and half-closes it. For every example:

* the proxy process is alive and closes the connection promptly (it never
  wedges: a half-closed client either gets its answers or is let go);
* everything it sends back parses as HTTP/1.1 responses; its own errors are
  among the statuses it may generate and carry ``X-Zdproxy-Error``;
* everything the recording backend receives is well-formed HTTP/1.1 (the
  backend's own strict parser), and no forwarded body holds a head the proxy
  wrote (which would mean the proxy and backend disagreed about framing);
* there are never more proxied answers than requests the backend saw.

The run is derandomized and bounded (``ZDPROXY_FUZZ_EXAMPLES``, 4000 by default)
so CI can afford it; for a long local run set it higher, and set
``ZDPROXY_FUZZ_RANDOM=1`` to explore new inputs instead of the same ones.
"""

from __future__ import annotations

import os
import socket
import warnings
from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from support_hostile import (
    HOST,
    ProxyProcess,
    RawClient,
    RecordingBackend,
    Response,
    exchange,
    get,
)

# Hypothesis imports libcst to print a failing example as a patch; libcst's import
# warns (DeprecationWarning from mypy_extensions), which filterwarnings=error turns
# into an INTERNALERROR that hides the example. Import it once here, quietly.
with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    try:
        import libcst  # noqa: F401
    except ImportError:
        pass

EXAMPLES = int(os.environ.get("ZDPROXY_FUZZ_EXAMPLES", "4000"))

H = b"Host: fuzz.test\r\n"
SEEDS = [
    b"GET /a HTTP/1.1\r\n" + H + b"\r\n",
    b"POST /b HTTP/1.1\r\n" + H + b"Content-Length: 5\r\n\r\nhello",
    b"POST /c HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
    b"GET /d HTTP/1.1\r\n" + H + b"\r\nGET /e HTTP/1.1\r\n" + H + b"\r\n",
    b"POST /f HTTP/1.1\r\n" + H + b"Content-Length: 3\r\n\r\nabcGET /g HTTP/1.1\r\n" + H + b"\r\n",
    b"PUT /h HTTP/1.1\r\n"
    + H
    + b"Transfer-Encoding: chunked\r\n\r\n3;x=y\r\nabc\r\n0\r\nX-T: 1\r\n\r\n"
    + b"GET /i HTTP/1.1\r\n"
    + H
    + b"\r\n",
    b"GET /j HTTP/1.0\r\nConnection: keep-alive\r\n\r\n",
    b"GET /k?q=1 HTTP/1.1\r\n" + H + b"Accept: */*\r\nX-A: b\r\nCookie: c=d\r\n\r\n",
    b"OPTIONS * HTTP/1.1\r\n" + H + b"Expect: 100-continue\r\nContent-Length: 2\r\n\r\nok",
]

FRAGMENTS = [
    b"\r\n",
    b"\n",
    b"\r",
    b"\x00",
    b" ",
    b"\t",
    b":",
    b",",
    b";",
    b"0",
    b"5",
    b"-",
    b"+",
    b"\x0b",
    b"\x7f",
    b"\x80",
    b"\xff",
    b"chunked",
    b"Transfer-Encoding: chunked\r\n",
    b"Transfer-Encoding: chunked, chunked\r\n",
    b"Transfer-Encoding: gzip\r\n",
    b"Transfer-Encoding : chunked\r\n",
    b"Content-Length: 3\r\n",
    b"Content-Length: 0\r\n",
    b"Content-Length: -1\r\n",
    b"Content-Length: 1, 2\r\n",
    b"X-Folded: a\r\n b\r\n",
    b"Host: other\r\n",
    b"Connection: close\r\n",
    b"Upgrade: websocket\r\nConnection: Upgrade\r\n",
    b"Expect: 100-continue\r\n",
    b"HTTP/1.0",
    b"HTTP/2.0",
    b"HTTP/1.2",
    b"ffffffffffffffffff",
    b"0\r\n\r\n",
    b"\r\n\r\n",
    b"GET /p HTTP/1.1\r\nHost: q\r\n\r\n",
]

#: statuses the proxy itself may answer a client request with
PROXY_STATUSES = {400, 408, 413, 417, 431, 502, 503, 504, 505}
#: bytes only a head the proxy wrote contains (clients' X-Forwarded-* are dropped)
PROXY_HEAD_MARK = b"X-Forwarded-Proto: http\r\n"


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    data = bytearray(draw(st.sampled_from(SEEDS)))
    for _ in range(draw(st.sampled_from([1, 1, 1, 2, 2, 3, 4]))):
        at = draw(st.integers(0, len(data)))
        op = draw(st.integers(0, 5))
        if op == 0:  # insert a fragment, often at the start of a line
            if draw(st.booleans()):
                at = data.rfind(b"\n", 0, at) + 1
            data[at:at] = draw(st.sampled_from(FRAGMENTS))
        elif op == 1:  # insert random bytes
            data[at:at] = draw(st.binary(min_size=1, max_size=4))
        elif op == 2:  # delete a few bytes
            del data[at : at + draw(st.integers(1, 4))]
        elif op == 3:  # replace one byte
            if at < len(data):
                data[at] = draw(st.integers(0, 255))
        elif op == 4:  # duplicate a line
            start = data.rfind(b"\n", 0, at) + 1
            end = data.find(b"\n", at)
            if end > 0:
                data[end + 1 : end + 1] = data[start : end + 1]
        else:  # truncate
            del data[at:]
    return bytes(data)


@pytest.fixture(scope="module")
def backend() -> Iterator[RecordingBackend]:
    server = RecordingBackend(faults=False).start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def proxy(
    backend: RecordingBackend, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ProxyProcess]:
    process = ProxyProcess(
        tmp_path_factory.mktemp("fuzz"),
        [backend.port],
        {"limits": {"max_body_bytes": 65536}, "timeouts": {"request_header": "5s"}},
    ).start()
    yield process
    # not wedged: still serving after the whole run, and it stops cleanly
    response, client = exchange(process.port, get("/after-fuzz"))
    client.close()
    assert response.status == 200
    assert process.stop() == 0, process.log()


def send_half_closed(port: int, data: bytes, timeout: float = 5.0) -> bytes:
    """Send ``data``, half-close, and read until the proxy closes (or fail)."""
    received = b""
    with socket.create_connection((HOST, port), timeout=timeout) as sock:
        try:
            sock.sendall(data)
            sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass  # the proxy already refused and closed
        while True:
            try:
                chunk = sock.recv(65536)
            except ConnectionResetError:
                break
            except TimeoutError:
                raise AssertionError(f"wedged: no close {timeout}s after {data!r}") from None
            if not chunk:
                break
            received += chunk
    return received


def parse_responses(data: bytes) -> list[Response]:
    reader = RawClient.__new__(RawClient)
    reader.buf = data
    reader.eof = True
    responses = []
    while reader.buf:
        # interim answers included: a 100 Continue may be all a client that then
        # left mid-body got
        responses.append(reader._read_one(b"GET"))
    return responses


class Stats:
    """What the run did, for the summary test after it."""

    examples = 0
    forwarded = 0
    refused = 0
    statuses: set[int] = set()


@settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize="ZDPROXY_FUZZ_RANDOM" not in os.environ,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(data=mutated())
# found by earlier runs: an upgrade request with a body wedged until the body timeout
@example(
    data=b"POST /f HTTP/1.1\r\n"
    + H
    + b"Upgrade: foo\r\nConnection: Upgrade\r\nContent-Length: 3\r\n\r\nabc"
    + b"GET /g HTTP/1.1\r\n"
    + H
    + b"\r\n"
)
@example(data=b"CONNECT fuzz.test:443 HTTP/1.1\r\n" + H + b"\r\n")
def test_fuzz_requests(data: bytes, proxy: ProxyProcess, backend: RecordingBackend) -> None:
    mark = backend.mark()
    received = send_half_closed(proxy.port, data)
    assert proxy.alive(), proxy.log()
    responses = parse_responses(received)
    for response in responses:
        error = response.header(b"x-zdproxy-error")
        if error is not None:
            assert response.status in PROXY_STATUSES, response
        else:
            assert response.status in (100, 200), response
        Stats.statuses.add(response.status)
    # a barrier: anything the proxy forwarded has reached the backend after this
    response, client = exchange(proxy.port, get("/barrier"))
    client.close()
    assert response.status == 200
    requests, malformed, _ = backend.since(mark)
    assert malformed == [], f"malformed request forwarded for {data!r}: {malformed}"
    forwarded = [r for r in requests if r.target != b"/barrier"]
    for request in forwarded:
        assert PROXY_HEAD_MARK not in request.body, f"framing desync for {data!r}"
    proxied = [r for r in responses if r.status == 200 and r.header(b"x-zdproxy-error") is None]
    assert len(proxied) <= len(forwarded), (data, responses, forwarded)
    Stats.examples += 1
    Stats.forwarded += len(forwarded)
    Stats.refused += sum(r.header(b"x-zdproxy-error") is not None for r in responses)


def test_fuzz_summary(proxy: ProxyProcess, backend: RecordingBackend) -> None:
    """The fuzz run exercised both sides of the parser; run alone, it fuzzes first."""
    if Stats.examples == 0:
        test_fuzz_requests(proxy=proxy, backend=backend)
    print(
        f"fuzz: {Stats.examples} examples, {Stats.forwarded} requests forwarded, "
        f"{Stats.refused} refused, statuses {sorted(Stats.statuses)}"
    )
    assert Stats.forwarded > 0
    assert Stats.refused > 0
