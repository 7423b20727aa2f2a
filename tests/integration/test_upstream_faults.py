"""Broken backends and vanishing clients, through a real ``zdproxy run``.

The recording backend misbehaves on demand (``/fault/<name>``) and numbers its
connections (``X-Backend-Conn``), so a test can tell whether the proxy reused an
upstream connection or opened a new one, and whether it closed the one that
went wrong.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator

import pytest
from support_hostile import (
    HOST,
    ProxyProcess,
    RawClient,
    RecordingBackend,
    exchange,
    free_port,
    get,
    wait_for,
)


@pytest.fixture(scope="module")
def backend() -> Iterator[RecordingBackend]:
    server = RecordingBackend().start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def proxy(
    backend: RecordingBackend, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ProxyProcess]:
    process = ProxyProcess(
        tmp_path_factory.mktemp("faults"),
        [backend.port],
        {
            "timeouts": {"upstream_response": "1s"},
            # a pool nobody listens for, reached with X-Zdproxy-Pool: dead
            "pools": {
                "blue": {"weight": 100},
                "dead": {"weight": 0, "backends": [{"address": f"{HOST}:{free_port()}"}]},
            },
        },
    ).start()
    yield process
    assert process.stop() == 0, process.log()


def backend_conn(response_headers: list[tuple[bytes, bytes]]) -> int:
    for name, value in response_headers:
        if name.lower() == b"x-backend-conn":
            return int(value)
    raise AssertionError("no X-Backend-Conn: the response did not come from the backend")


def test_keep_alive_reuses_the_upstream_connection(proxy: ProxyProcess) -> None:
    """Control for the tests below: healthy exchanges share one upstream connection."""
    with RawClient(proxy.port) as client:
        client.send(get("/one"))
        first = client.read_response()
        client.send(get("/two"))
        second = client.read_response()
    assert backend_conn(first.headers) == backend_conn(second.headers)


BAD_RESPONSES = [
    "bad-status",
    "garbage",
    "te-chunked-chunked",
    "te-gzip",
    "two-cl",
    "ws-no-accept",  # a 101 to a request that did not ask to upgrade
]


@pytest.mark.parametrize("fault", BAD_RESPONSES)
def test_invalid_response_is_502_and_upstream_discarded(
    fault: str, proxy: ProxyProcess, backend: RecordingBackend
) -> None:
    target = f"/fault/{fault}"
    with RawClient(proxy.port) as client:
        client.send(get(target))
        response = client.read_response()
        assert response.status == 502, response
        assert response.header(b"x-zdproxy-error") == b"bad-upstream-response"
        # the request was complete and the answer is the proxy's own: keep-alive holds
        client.send(get("/after-bad"))
        after = client.read_response()
        assert after.status == 200
    conn_id = backend.wait_head(target.encode())
    assert backend_conn(after.headers) != conn_id
    wait_for(lambda: backend.conn(conn_id).closed, 5, "the bad upstream connection to close")


@pytest.mark.parametrize("fault", ["reset-mid-body", "close-mid-body", "bad-chunk"])
def test_upstream_dies_mid_body_client_sees_truncation(
    fault: str, proxy: ProxyProcess, backend: RecordingBackend
) -> None:
    """Headers already went out: the only honest signal left is closing the client
    connection before the declared end of the body."""
    with RawClient(proxy.port) as client:
        client.send(get(f"/fault/{fault}") + get("/never-sent"))
        response = client.read_response()
        assert response.status == 200
        assert response.truncated, "a cut response was passed off as complete"
        assert client.closed_by_peer()
    settle(proxy, backend)
    assert b"/never-sent" not in [r.target for r in backend.snapshot()[0]]


def test_response_with_cl_and_chunked_is_forwarded_chunked(
    proxy: ProxyProcess, backend: RecordingBackend
) -> None:
    with RawClient(proxy.port) as client:
        client.send(get("/fault/cl-and-chunked"))
        response = client.read_response()
        assert response.status == 200
        assert response.header(b"content-length") is None
        assert response.header(b"transfer-encoding") == b"chunked"
        assert response.body == b"hello world"
        assert not response.truncated
        client.send(get("/after-both-framings"))
        after = client.read_response()
    conn_id = backend_conn(response.headers)
    # the framing was in doubt: that upstream connection is not reused
    assert backend_conn(after.headers) != conn_id
    wait_for(lambda: backend.conn(conn_id).closed, 5, "the upstream connection to close")


def test_early_response_is_delivered_then_both_sides_closed(
    proxy: ProxyProcess, backend: RecordingBackend
) -> None:
    """The backend answers before the request body is complete: the client gets
    the answer, then both connections close (the rest of the body is never read)."""
    head = b"POST /fault/early-response HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\n"
    with RawClient(proxy.port) as client:
        client.send(head + b"a" * 1000)
        response = client.read_response()
        assert (response.status, response.body) == (200, b"early")
        # the head went out before the proxy knew the body would not finish, so it
        # may not say close; the close itself follows the complete response
        assert client.closed_by_peer()
    conn_id = backend.wait_head(b"/fault/early-response")
    wait_for(lambda: backend.conn(conn_id).closed, 5, "the upstream connection to close")


def test_client_gone_mid_request_closes_upstream(
    proxy: ProxyProcess, backend: RecordingBackend
) -> None:
    head = b"POST /gone-mid-request HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\n"
    with RawClient(proxy.port) as client:
        client.send(head + b"b" * 5000)
        conn_id = backend.wait_head(b"/gone-mid-request")
    wait_for(lambda: backend.conn(conn_id).closed, 5, "the upstream connection to close")
    assert backend.conn(conn_id).incomplete is not None
    response, client = exchange(proxy.port, get("/after-gone-request"))
    client.close()
    assert backend_conn(response.headers) != conn_id


def test_client_gone_mid_response_closes_upstream(
    proxy: ProxyProcess, backend: RecordingBackend
) -> None:
    with RawClient(proxy.port) as client:
        client.send(get("/fault/slow-body"))
        client.sock.recv(100)  # the head and some of the body
        conn_id = backend.wait_head(b"/fault/slow-body")
    wait_for(lambda: backend.conn(conn_id).closed, 5, "the upstream connection to close")
    response, client = exchange(proxy.port, get("/after-gone-response"))
    client.close()
    assert response.status == 200
    assert backend_conn(response.headers) != conn_id


def test_upstream_timeout_is_504(proxy: ProxyProcess, backend: RecordingBackend) -> None:
    with RawClient(proxy.port) as client:
        client.send(get("/fault/hang"))
        response = client.read_response()
        assert response.status == 504
        assert response.header(b"x-zdproxy-error") == b"upstream-timeout"
    conn_id = backend.wait_head(b"/fault/hang")
    wait_for(lambda: backend.conn(conn_id).closed, 5, "the timed-out connection to close")


def test_unreachable_backend_is_502_and_head_gets_no_body(proxy: ProxyProcess) -> None:
    """A proxy error to HEAD carries no body, or a keep-alive client would read it
    as the start of the next response."""
    with RawClient(proxy.port) as client:
        client.send(b"HEAD / HTTP/1.1\r\nHost: x\r\nX-Zdproxy-Pool: dead\r\n\r\n")
        response = client.read_response(b"HEAD")
        assert response.status == 502
        assert response.header(b"x-zdproxy-error") == b"upstream-connect"
        client.send(get("/after-head"))
        after = client.read_response()
        assert after.status == 200, "the error's body desynced the connection"
        assert client.still_open()


def settle(proxy: ProxyProcess, backend: RecordingBackend) -> None:
    count = len(backend.snapshot()[0])
    response, client = exchange(proxy.port, get("/barrier"))
    client.close()
    assert response.status == 200
    backend.wait_requests(count + 1)


def test_client_half_close_after_full_request_still_answered(proxy: ProxyProcess) -> None:
    """EOF after a complete request is a half-close, not a disconnect."""
    with RawClient(proxy.port) as client:
        client.send(get("/half-closed"))
        client.sock.shutdown(socket.SHUT_WR)
        response = client.read_response()
        assert response.status == 200
        assert client.closed_by_peer()
