"""Blue/green flips under load: 10 flips while 30 keep-alive clients send requests.

Zero failed requests, and once a flip is answered every request sent after it is
answered by the new pool (the data path names the pool in ``X-Zdproxy-Pool``).
Requests already in flight on the old pool finish there.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import pytest
from support import Backend, async_wait_for
from support_control import AdminClient, AdminProxy, admin_config

CLIENTS = 30
FLIPS = 10
#: requests sent after a flip's answer that must be seen before the next flip
SETTLED_PER_FLIP = 500


@dataclass
class Load:
    #: (sent at, pool that answered) of every successful request, in completion order
    done: list[tuple[float, str]] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    stop: bool = False

    def since(self, moment: float) -> list[str]:
        return [pool for sent, pool in self.done if sent > moment]


async def client(url: str, load: Load) -> None:
    loop = asyncio.get_running_loop()
    connector = aiohttp.TCPConnector(limit=1, force_close=False)
    async with aiohttp.ClientSession(connector=connector) as session:
        while not load.stop:
            sent = loop.time()
            try:
                async with session.get(url) as response:
                    await response.read()
                    if response.status != 200:
                        load.failures.append(f"status {response.status}")
                        continue
                    load.done.append((sent, response.headers["X-Zdproxy-Pool"]))
            except (aiohttp.ClientError, KeyError) as exc:
                load.failures.append(repr(exc))


@pytest.fixture
async def pools() -> AsyncIterator[list[Backend]]:
    backends = [
        await Backend(f"{pool}-{n}", pool).start() for pool in ("blue", "green") for n in (1, 2)
    ]
    for backend in backends:
        backend.delay = 0.002  # keep requests in flight when the flips land
    yield backends
    for backend in backends:
        await backend.stop()


async def test_ten_flips_under_keepalive_load(pools: list[Backend], tmp_path: Path) -> None:
    config = admin_config(
        {
            name: {
                "weight": 100 if name == "blue" else 0,
                "backends": [{"id": b.name, "address": b.address} for b in pools if b.pool == name],
            }
            for name in ("blue", "green")
        },
        None,
    )
    process = AdminProxy(config, tmp_path).start()
    loop = asyncio.get_running_loop()
    load = Load()
    tasks = [loop.create_task(client(process.url + "/", load)) for _ in range(CLIENTS)]
    flips: list[tuple[str, int, int]] = []
    try:
        async with AdminClient(process.admin_url) as admin:
            await async_wait_for(lambda: len(load.done) >= 200, 20, "traffic before the flips")
            assert set(load.since(0)) == {"blue"}
            for n in range(FLIPS):
                target = "green" if n % 2 == 0 else "blue"
                old = "blue" if target == "green" else "green"
                before = len(load.done)
                result = await admin.ok("POST", "/api/v1/flip", {"to": target})
                assert result["changed"] is True
                answered = loop.time()
                await async_wait_for(
                    lambda answered=answered: len(load.since(answered)) >= SETTLED_PER_FLIP,
                    30,
                    f"traffic after flip {n + 1}",
                )
                after = load.since(answered)
                assert set(after) == {target}, f"flip {n + 1}: {after.count(old)} from {old}"

                async def old_pool_idle(old: str = old) -> bool:
                    state = await admin.state()
                    return all(b["in_flight"] == 0 for b in state["pools"][old]["backends"])

                await async_wait_for(old_pool_idle, 10, f"{old} finished its requests")
                flips.append((target, len(load.done) - before, len(after)))
            load.stop = True
            await asyncio.gather(*tasks)
            metrics = (await admin.call("GET", "/metrics")).body.decode()
    finally:
        load.stop = True
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        process.stop()

    assert load.failures == []
    total = len(load.done)
    accepted = next(
        float(line.split()[-1])
        for line in metrics.splitlines()
        if line.startswith("zdproxy_connections_accepted_total ")
    )
    assert accepted <= CLIENTS + 5, "clients did not keep their connections alive"
    print(
        f"\nflip under load: {CLIENTS} keep-alive clients, {FLIPS} flips, {total} requests, "
        f"{len(load.failures)} failed, {accepted:.0f} client connections; per flip "
        f"(target, requests during the phase, sent after the answer): {flips}"
    )
