"""Draining through a real zdproxy process: in-flight work finishes, nothing new
lands, tunnels get the drain timeout, affinity-bound clients (if configured)
until the timeout."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from pathlib import Path

import aiohttp
from support_health import Client, Response, figure, running, wait_until


async def _slow(port: int, seconds: float) -> Response:
    client = Client(port, timeout=seconds + 20)
    try:
        return await client.request("GET", f"/slow?s={seconds}")
    finally:
        client.close()


async def test_drain_with_slow_requests_in_flight(tmp_path: Path) -> None:
    async with running(tmp_path, {"blue": 2}) as (proxy, backends):
        # a keep-alive client that blue-1 was serving
        regular = Client(proxy.port)
        while (await regular.request()).backend != "blue-1":
            pass
        slow = [asyncio.create_task(_slow(proxy.port, 2.0)) for _ in range(10)]

        async def all_started() -> bool:
            counts = [(await b.counts())["slow"] for b in backends.values()]
            return sum(counts) == 10

        await wait_until(all_started, 10, "10 slow requests on the backends")
        in_flight = (await proxy.backend("blue-1"))["in_flight"]
        drained_from = time.monotonic()
        status, body = await proxy.api("POST", "/api/v1/backends/blue-1/drain")
        assert status == 200, body
        assert (await proxy.backend("blue-1"))["state"] == "draining"
        # no new request lands on it: the keep-alive client moves, new clients too
        before = (await backends["blue-1"].counts())["requests"]
        served = Counter([(await regular.request()).backend for _ in range(20)])
        others = [Client(proxy.port) for _ in range(5)]
        for c in others:
            for _ in range(10):
                served[(await c.request()).backend] += 1
            c.close()
        landed = (await backends["blue-1"].counts())["requests"] - before
        responses = await asyncio.gather(*slow)
        took = await proxy.wait_state("blue-1", "drained", 10)
        drained_after = time.monotonic() - drained_from
        regular.close()
    figure(
        "drain with 10 slow requests in flight",
        slow_requests=len(responses),
        slow_failures=sum(r.status != 200 for r in responses),
        in_flight_on_drained_backend=in_flight,
        new_requests=sum(served.values()),
        new_requests_on_drained_backend=landed,
        drain_to_drained_s=round(drained_after, 2),
    )
    assert [r.status for r in responses] == [200] * 10
    assert in_flight == 5
    assert landed == 0 and set(served) == {"blue-2"}
    assert took < 10


async def test_websocket_tunnel_gets_the_drain_timeout(tmp_path: Path) -> None:
    timeout = 1.5
    async with (
        running(tmp_path, {"blue": 2}, draining={"timeout": f"{timeout}s"}) as (
            proxy,
            _,
        ),
        aiohttp.ClientSession() as session,
    ):
        sockets = [await session.ws_connect(f"http://127.0.0.1:{proxy.port}/ws") for _ in range(2)]
        owners = []
        for ws in sockets:
            await ws.send_str("hi")
            owners.append((await ws.receive_str()).split(":")[0])
        assert sorted(owners) == ["blue-1", "blue-2"]
        drained_ws = sockets[owners.index("blue-1")]
        other_ws = sockets[owners.index("blue-2")]
        started = time.monotonic()
        status, _ = await proxy.api("POST", "/api/v1/backends/blue-1/drain")
        assert status == 200
        # still open before the timeout
        await asyncio.sleep(timeout / 3)
        await drained_ws.send_str("still there")
        assert await drained_ws.receive_str() == "blue-1:still there"
        message = await drained_ws.receive(timeout=timeout + 5)
        closed_after = time.monotonic() - started
        assert message.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED)
        await proxy.wait_state("blue-1", "drained", 5)
        # the tunnel to the other backend is untouched
        await other_ws.send_str("ok")
        assert await other_ws.receive_str() == "blue-2:ok"
        for ws in sockets:
            await ws.close()
    figure(
        "websocket on a draining backend",
        drain_timeout_s=timeout,
        closed_after_s=round(closed_after, 2),
    )
    assert timeout * 0.9 <= closed_after <= timeout + 1.0


async def test_pinned_clients_reach_a_draining_backend_until_the_timeout(tmp_path: Path) -> None:
    timeout = 2.0
    async with running(
        tmp_path,
        {"blue": 2},
        sticky={"mode": "backend"},
        draining={"timeout": f"{timeout}s", "sticky_until_timeout": True},
    ) as (proxy, _):
        client = Client(proxy.port)
        first = await client.request()
        pin = first.cookie("zd_affinity")
        assert pin is not None
        pinned = first.backend
        started = time.monotonic()
        status, _ = await proxy.api("POST", f"/api/v1/backends/{pinned}/drain")
        assert status == 200
        cookie = {"Cookie": f"zd_affinity={pin}"}
        kept = Counter()
        while time.monotonic() - started < timeout * 0.8:
            kept[(await client.request(headers=cookie)).backend] += 1
            await asyncio.sleep(0.05)
        fresh = Client(proxy.port)
        new_clients = Counter([(await fresh.request()).backend for _ in range(10)])
        await proxy.wait_state(pinned or "", "drained", timeout + 3)
        moved = await client.request(headers=cookie)
        fresh.close()
        client.close()
    assert set(kept) == {pinned}
    assert pinned not in new_clients
    assert moved.status == 200 and moved.backend != pinned
    assert moved.cookie("zd_affinity") is not None  # re-pinned


async def test_flip_lets_the_old_pool_finish(tmp_path: Path) -> None:
    async with running(tmp_path, {"blue": 2, "green": 2}) as (proxy, _):
        slow = [asyncio.create_task(_slow(proxy.port, 1.5)) for _ in range(6)]

        async def all_in_flight() -> bool:
            return sum(b["in_flight"] for b in (await proxy.backends()).values()) == 6

        await wait_until(all_in_flight, 10, "the 6 slow requests in flight")
        status, body = await proxy.api("POST", "/api/v1/flip", {"to": "green"})
        assert status == 200, body
        client = Client(proxy.port)
        pools = Counter([(await client.request()).pool for _ in range(30)])
        responses = await asyncio.gather(*slow)
        client.close()
    assert [r.status for r in responses] == [200] * 6
    assert {r.pool for r in responses} == {"blue"}
    assert pools == {"green": 30}
