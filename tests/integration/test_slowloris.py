"""Slow and greedy clients through a real ``zdproxy run``: the request-header
timeout (408), the body-read timeout, the idle keep-alive timeout, 500
slowloris connections next to normal clients, and limits.max_connections
(extra connections wait in the listen backlog, they are never reset)."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest
from support_hostile import (
    HOST,
    ProxyProcess,
    RawClient,
    RecordingBackend,
    exchange,
    get,
    wait_for,
)

HEADER_TIMEOUT = 1.0
BODY_TIMEOUT = 1.0
IDLE_TIMEOUT = 1.0


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
        tmp_path_factory.mktemp("slow"),
        [backend.port],
        {
            "timeouts": {
                "request_header": HEADER_TIMEOUT,
                "request_body": BODY_TIMEOUT,
                "idle": IDLE_TIMEOUT,
            }
        },
    ).start()
    yield process
    assert process.stop() == 0, process.log()


def test_header_timeout_is_408_and_close(proxy: ProxyProcess) -> None:
    with RawClient(proxy.port) as client:
        started = time.monotonic()
        client.send(b"GET / HTTP/1.1\r\nHost: slow.test\r\n")
        response = client.read_response()
        elapsed = time.monotonic() - started
        assert response.status == 408
        assert response.header(b"x-zdproxy-error") == b"request-header-timeout"
        assert client.closed_by_peer()
    # not early; a deadline that never fires fails the read (RawClient's 5 s) instead
    # of a timed upper bound, which a loaded machine breaks
    assert elapsed >= HEADER_TIMEOUT * 0.7


def test_dribbling_bytes_does_not_extend_the_header_deadline(proxy: ProxyProcess) -> None:
    """The deadline covers the whole head, not the gap between two bytes."""
    with RawClient(proxy.port) as client:
        client.send(b"GET / HTTP/1.1\r\n")
        sock = client.sock
        sock.settimeout(0.1)
        data = b""
        for i in range(100):  # a header byte every 100 ms, far longer than the deadline
            try:
                sock.send(b"X-Drip-%d: x\r\n" % i)
                data += sock.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                break
            if data:
                break
        # a deadline that each byte extended would never answer within the 100 drips
        assert data.startswith(b"HTTP/1.1 408 "), data[:100]


def test_silent_connection_is_closed_without_answer(proxy: ProxyProcess) -> None:
    with RawClient(proxy.port) as client:
        assert client.closed_by_peer(timeout=HEADER_TIMEOUT + 2)


def test_body_timeout_is_408_and_upstream_closed(
    proxy: ProxyProcess, backend: RecordingBackend
) -> None:
    with RawClient(proxy.port) as client:
        client.send(b"POST /slow-body HTTP/1.1\r\nHost: slow.test\r\nContent-Length: 100\r\n\r\n")
        client.send(b"only ten b")
        response = client.read_response()
        assert response.status == 408
        assert response.header(b"x-zdproxy-error") == b"request-body-timeout"
        assert client.closed_by_peer()
    conn_id = backend.wait_head(b"/slow-body")
    wait_for(lambda: backend.conn(conn_id).closed, 5, "the upstream connection to close")
    assert backend.conn(conn_id).incomplete is not None


def test_idle_keep_alive_timeout_closes(proxy: ProxyProcess) -> None:
    with RawClient(proxy.port) as client:
        client.send(get("/idle"))
        assert client.read_response().status == 200
        started = time.monotonic()
        assert client.closed_by_peer(timeout=IDLE_TIMEOUT + 2)
    # the proxy's clock is coarse (a quarter of the shortest timeout)
    assert time.monotonic() - started >= IDLE_TIMEOUT * 0.7


def _open_slowloris(port: int, count: int) -> list[socket.socket]:
    socks = []
    for i in range(count):
        sock = socket.create_connection((HOST, port), timeout=5)
        sock.sendall(b"GET /loris-%d HTTP/1.1\r\nHost: slow.test\r\nX-A: " % i)
        socks.append(sock)
    return socks


def test_500_slowloris_do_not_stop_normal_clients(
    tmp_path_factory: pytest.TempPathFactory, backend: RecordingBackend
) -> None:
    # a header timeout long enough that every slow connection is alive throughout
    with_long_timeout = ProxyProcess(
        tmp_path_factory.mktemp("loris"),
        [backend.port],
        {"timeouts": {"request_header": "30s"}},
    ).start()
    socks: list[socket.socket] = []
    try:
        socks = _open_slowloris(with_long_timeout.port, 500)
        # keep them dribbling while normal clients come and go
        for sock in socks:
            sock.sendall(b"a")

        # a normal client stuck behind the slow ones would wait for their 30 s header
        # timeout: its read times out first (RawClient: 5 s) and the test fails
        def normal(i: int) -> None:
            response, client = exchange(with_long_timeout.port, get(f"/normal-{i}"))
            client.close()
            assert response.status == 200

        with ThreadPoolExecutor(10) as pool:
            list(pool.map(normal, range(200)))
        # every slow connection is still open and was never answered
        for sock in socks[:50]:
            sock.settimeout(0.001)
            with pytest.raises(TimeoutError):
                sock.recv(1)
        assert with_long_timeout.alive()
    finally:
        for sock in socks:
            sock.close()
        assert with_long_timeout.stop() == 0, with_long_timeout.log()


def test_max_connections_extra_ones_wait_in_the_backlog(
    tmp_path_factory: pytest.TempPathFactory, backend: RecordingBackend
) -> None:
    limited = ProxyProcess(
        tmp_path_factory.mktemp("limited"),
        [backend.port],
        {"limits": {"max_connections": 5}},
    ).start()
    held: list[RawClient] = []
    waiting: list[RawClient] = []
    try:
        # five connections busy with a request fill the limit (the readiness probe's
        # one is gone); idle keep-alive ones would be closed to make room instead
        # (test_downstream_hardening.py)
        for i in range(5):
            client = RawClient(limited.port)
            client.send(get(f"/held-{i}"))
            assert client.read_response().status == 200
            client.send(b"GET /held-again-%d HTTP/1.1\r\nHost: slow.test\r\n" % i)
            held.append(client)
        # more connect (the kernel completes the handshake into the backlog) ...
        for i in range(10):
            client = RawClient(limited.port)
            client.send(get(f"/waiting-{i}"))
            waiting.append(client)
        # ... and wait there: no answer, no reset
        for client in waiting:
            assert client.still_open(0.05)
        # a slot frees: the waiting connections are served one after another, none reset
        held.pop().close()
        for client in waiting:
            response = client.read_response()
            assert response.status == 200
            client.close()
        waiting.clear()
        assert limited.alive()
    finally:
        for client in held + waiting:
            client.close()
        assert limited.stop() == 0, limited.log()


def test_max_connections_burst_all_served(
    tmp_path_factory: pytest.TempPathFactory, backend: RecordingBackend
) -> None:
    """A burst of 50 short connections against a limit of 3: all are served,
    nothing is refused or reset."""
    limited = ProxyProcess(
        tmp_path_factory.mktemp("burst"),
        [backend.port],
        {"limits": {"max_connections": 3}},
    ).start()
    try:

        def one(i: int) -> int:
            with RawClient(limited.port, timeout=10) as client:
                client.send(get(f"/burst-{i}", extra=b"Connection: close\r\n"))
                return client.read_response().status

        with ThreadPoolExecutor(50) as pool:
            statuses = list(pool.map(one, range(50)))
        assert statuses == [200] * 50
    finally:
        assert limited.stop() == 0, limited.log()
