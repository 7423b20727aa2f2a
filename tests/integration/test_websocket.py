"""WebSocket (Upgrade) through a real ``zdproxy run``: a real aiohttp client
against a real aiohttp echo backend, and raw sockets against the recording
backend for the handshake faults, half-closes and the tunnel idle timeout.

Pools: ``aio`` (weight 100) is the aiohttp echo server, started by each test
that needs it on a port reserved for the module; ``raw`` (weight 0, reached with
``X-Zdproxy-Pool: raw``) is the recording backend. The admin API is on so the
tests can read the tunnel gauges from /metrics.
"""

from __future__ import annotations

import asyncio
import re
import socket
import time
import urllib.request
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass

import aiohttp
import pytest
from aiohttp import web
from support_hostile import (
    HOST,
    ProxyProcess,
    RawClient,
    RecordingBackend,
    free_port,
    wait_for,
)

TOKEN = "websocket-test-token"
KEY = b"dGhlIHNhbXBsZSBub25jZQ=="
TUNNEL_IDLE = 1.0


@dataclass
class Setup:
    proxy: ProxyProcess
    raw: RecordingBackend
    aio_port: int
    admin_port: int


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    raw = RecordingBackend().start()
    aio_port = free_port()
    admin_port = free_port()
    proxy = ProxyProcess(
        tmp_path_factory.mktemp("websocket"),
        [],
        {
            "admin": {"enabled": True, "listen": f"{HOST}:{admin_port}"},
            "timeouts": {"tunnel_idle": TUNNEL_IDLE},
            "pools": {
                "blue": None,
                "aio": {"weight": 100, "backends": [{"address": f"{HOST}:{aio_port}"}]},
                "raw": {"weight": 0, "backends": [{"address": f"{HOST}:{raw.port}"}]},
            },
        },
        env={"ZDPROXY_ADMIN_TOKEN": TOKEN},
    ).start()
    yield Setup(proxy, raw, aio_port, admin_port)
    assert proxy.stop() == 0, proxy.log()
    raw.stop()


def metrics(setup: Setup) -> dict[str, float]:
    request = urllib.request.Request(
        f"http://{HOST}:{setup.admin_port}/metrics", headers={"Authorization": f"Bearer {TOKEN}"}
    )
    with urllib.request.urlopen(request, timeout=5) as response:
        text = response.read().decode()
    wanted = r'^(zdproxy_tunnels_total|zdproxy_connections\{side="tunnel"\}) (\S+)$'
    return {name: float(value) for name, value in re.findall(wanted, text, re.M)}


def open_tunnels(setup: Setup) -> float:
    return metrics(setup)['zdproxy_connections{side="tunnel"}']


def tunnels_total(setup: Setup) -> float:
    return metrics(setup)["zdproxy_tunnels_total"]


# ---- a real client and a real WebSocket server --------------------------------------


@pytest.fixture
async def echo_server(setup: Setup) -> AsyncIterator[list[str]]:
    """aiohttp WebSocket echo on the ``aio`` backend port; yields what it received."""
    received: list[str] = []

    async def handler(request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        async for message in ws:
            if message.type == aiohttp.WSMsgType.TEXT:
                received.append(message.data)
                await ws.send_str(message.data)
            elif message.type == aiohttp.WSMsgType.BINARY:
                received.append(f"<{len(message.data)} bytes>")
                await ws.send_bytes(message.data)
        return ws

    app = web.Application()
    app.router.add_get("/ws", handler)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, HOST, setup.aio_port).start()
    yield received
    await runner.cleanup()


async def test_websocket_echo_with_aiohttp_client(setup: Setup, echo_server: list[str]) -> None:
    before = await asyncio.to_thread(tunnels_total, setup)
    url = f"http://{HOST}:{setup.proxy.port}/ws"
    async with aiohttp.ClientSession() as session, session.ws_connect(url) as ws:
        assert await asyncio.to_thread(open_tunnels, setup) == 1
        await ws.send_str("hello through zdproxy")
        assert await ws.receive_str(timeout=5) == "hello through zdproxy"
        blob = bytes(range(256)) * 1024  # 256 KiB: several reads and writes each way
        await ws.send_bytes(blob)
        assert await ws.receive_bytes(timeout=5) == blob
        for i in range(50):
            await ws.send_str(f"message {i}")
        for i in range(50):
            assert await ws.receive_str(timeout=5) == f"message {i}"
        await ws.close()
        assert ws.close_code == 1000
    assert echo_server[:2] == ["hello through zdproxy", "<262144 bytes>"]
    assert len(echo_server) == 52
    assert await asyncio.to_thread(tunnels_total, setup) == before + 1

    async def closed() -> bool:
        return await asyncio.to_thread(open_tunnels, setup) == 0

    deadline = time.monotonic() + 5
    while not await closed():
        assert time.monotonic() < deadline, "the tunnel was not closed"
        await asyncio.sleep(0.02)


async def test_many_websockets_at_once(setup: Setup, echo_server: list[str]) -> None:
    url = f"http://{HOST}:{setup.proxy.port}/ws"
    async with aiohttp.ClientSession() as session:

        async def one(i: int) -> None:
            async with session.ws_connect(url) as ws:
                for j in range(10):
                    await ws.send_str(f"{i}-{j}")
                    assert await ws.receive_str(timeout=5) == f"{i}-{j}"

        await asyncio.gather(*(one(i) for i in range(25)))
    assert len(echo_server) == 250


# ---- raw sockets and the recording backend -------------------------------------------


def upgrade(path: str, key: bool = True, extra: bytes = b"") -> bytes:
    return (
        b"GET %s HTTP/1.1\r\nHost: ws.test\r\nX-Zdproxy-Pool: raw\r\n"
        b"Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\n"
        % path.encode()
        + (b"Sec-WebSocket-Key: " + KEY + b"\r\n" if key else b"")
        + extra
        + b"\r\n"
    )


def test_upgrade_without_key_is_400(setup: Setup) -> None:
    mark = setup.raw.mark()
    with RawClient(setup.proxy.port) as client:
        client.send(upgrade("/fault/ws-echo", key=False))
        response = client.read_response()
        assert response.status == 400
        assert response.header(b"x-zdproxy-error") == b"bad-request"
        assert client.closed_by_peer()
    assert setup.raw.since(mark)[0] == []


def test_101_without_accept_is_502(setup: Setup) -> None:
    with RawClient(setup.proxy.port) as client:
        client.send(upgrade("/fault/ws-no-accept"))
        response = client.read_response()
        assert response.status == 502
        assert response.header(b"x-zdproxy-error") == b"bad-upstream-response"
        # what the client sent after its upgrade request was never parsed: close
        assert client.closed_by_peer()
    conn_id = setup.raw.wait_head(b"/fault/ws-no-accept")
    wait_for(lambda: setup.raw.conn(conn_id).closed, 5, "the upstream connection to close")


def _handshake(client: RawClient) -> None:
    response = client.read_response()
    assert response.status == 101, response
    assert response.header(b"upgrade") == b"websocket"
    assert response.header(b"sec-websocket-accept") is not None
    assert response.header(b"x-zdproxy-error") is None


def _recv_until(client: RawClient, want: bytes, timeout: float = 5.0) -> bytes:
    deadline = time.monotonic() + timeout
    while want not in client.buf:
        assert time.monotonic() < deadline, f"did not receive {want!r}, got {client.buf!r}"
        assert client._fill(), f"closed before {want!r}, got {client.buf!r}"
    return client.buf


def test_client_half_close_is_passed_on(setup: Setup) -> None:
    """The client shuts its sending side: the backend sees EOF and can still
    answer through the tunnel before it closes."""
    with RawClient(setup.proxy.port) as client:
        # bytes right behind the request are held until the 101, then delivered
        client.send(upgrade("/fault/ws-echo/half") + b"early-bytes|")
        _handshake(client)
        _recv_until(client, b"early-bytes|")
        client.send(b"ping-1|")
        _recv_until(client, b"ping-1|")
        client.sock.shutdown(socket.SHUT_WR)
        _recv_until(client, b"<eof>")
        assert client.buf == b"early-bytes|ping-1|<eof>"
        client.buf = b""
        assert client.closed_by_peer()
    # both directions ended: the proxy closes the tunnel without waiting for its timeout
    wait_for(lambda: open_tunnels(setup) == 0, 5, "the tunnel to close")


def test_backend_half_close_is_passed_on(setup: Setup) -> None:
    """The backend shuts its sending side: the client sees EOF and can still send."""
    with RawClient(setup.proxy.port) as client:
        client.send(upgrade("/fault/ws-half-close"))
        _handshake(client)
        _recv_until(client, b"hello")
        client.buf = b""
        assert client.closed_by_peer(), "the backend's EOF did not reach the client"
        client.send(b"still-talking")
    conn_id = setup.raw.wait_head(b"/fault/ws-half-close")
    wait_for(lambda: b"still-talking" in setup.raw.conn(conn_id).raw, 5, "the late bytes")


def test_tunnel_idle_timeout(setup: Setup) -> None:
    with RawClient(setup.proxy.port) as client:
        client.send(upgrade("/fault/ws-echo/idle"))
        _handshake(client)
        # traffic with pauses shorter than the idle timeout keeps it open past it ...
        started = time.monotonic()
        beat = 0
        while True:
            message = b"beat-%d|" % beat
            client.send(message)
            _recv_until(client, message)
            client.buf = b""
            silent_since = time.monotonic()
            if silent_since - started > TUNNEL_IDLE * 2:
                break
            beat += 1
            time.sleep(TUNNEL_IDLE / 3)  # the client's own pace, not a wait for the proxy
        # ... and silence closes both sides. The deadline is renewed on the loop's
        # clock (a stale coarse clock cut tunnels half a second early on a busy
        # machine); the check runs on the sweeper's tick, so the close is late by
        # up to a tick, never early. The slack below is only the echo's own trip.
        assert client.closed_by_peer(timeout=TUNNEL_IDLE + 2)
        assert time.monotonic() - silent_since >= TUNNEL_IDLE * 0.7
    conn_id = setup.raw.wait_head(b"/fault/ws-echo/idle")
    wait_for(lambda: setup.raw.conn(conn_id).closed, 5, "the upstream side of the tunnel to close")


def test_tunnel_kept_open_by_backend_traffic_alone(setup: Setup) -> None:
    """A feed the client never answers (server push) is traffic too: the tunnel
    idle timeout counts silence in both directions, not only the client's."""
    with RawClient(setup.proxy.port) as client:
        client.send(upgrade("/fault/ws-push"))
        _handshake(client)
        started = time.monotonic()
        # 3 s of ticks, three idle timeouts without a byte from the client
        _recv_until(client, b"done|", timeout=10)
        assert time.monotonic() - started > TUNNEL_IDLE * 2
        assert client.buf == b"tick|" * 15 + b"done|"
        client.buf = b""
        silent_since = time.monotonic()
        assert client.closed_by_peer(timeout=TUNNEL_IDLE + 2)
        assert time.monotonic() - silent_since >= TUNNEL_IDLE * 0.7
    conn_id = setup.raw.wait_head(b"/fault/ws-push")
    wait_for(lambda: setup.raw.conn(conn_id).closed, 5, "the upstream side of the tunnel to close")


def test_bytes_after_an_upgrade_request_never_reach_a_backend_that_declines(
    setup: Setup,
) -> None:
    """Upgrade smuggling: the proxy stops parsing HTTP after an upgrade request, so
    what follows must wait for the 101. A backend that answers 200 instead must not
    get those bytes (it would read them as a request the proxy never checked), and
    the client connection closes after that answer."""
    with RawClient(setup.proxy.port) as client:
        client.send(
            upgrade("/declines-upgrade")
            + b"GET /smuggled-upgrade HTTP/1.1\r\nHost: ws.test\r\nContent-Length: 0\r\n\r\n"
        )
        response = client.read_response()
        assert response.status == 200
        assert client.closed_by_peer()
    setup.raw.wait_head(b"/declines-upgrade")
    # a fresh request through the same pool: the smuggled one would have arrived by now
    with RawClient(setup.proxy.port) as client:
        client.send(upgrade("/after-declined").replace(b"Upgrade: websocket\r\n", b""))
        assert client.read_response().status == 200
    assert all(b"/smuggled-upgrade" not in c.raw for c in setup.raw.snapshot()[2])
