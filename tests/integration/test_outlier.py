"""Passive health (outlier ejection) and panic mode through a real zdproxy process."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from pathlib import Path

from support_health import Client, figure, running, wait_until

BASE = 1.0
OUTLIER = {
    "enabled": True,
    "consecutive_5xx": 3,
    "consecutive_connect_failures": 2,
    "base_ejection_time": f"{BASE}s",
    "max_ejection_time": "10s",
    "max_ejection_percent": 50,
}


async def test_backend_answering_500_is_ejected_then_tried_again(tmp_path: Path) -> None:
    async with running(
        tmp_path, {"blue": 3}, outlier_detection=OUTLIER, health_check={"enabled": False}
    ) as (proxy, backends):
        bad = backends["blue-1"]
        await bad.ctl(fail=500)
        client = Client(proxy.port)
        statuses: Counter[int] = Counter()
        start = time.monotonic()
        while not (await proxy.backend("blue-1"))["ejected"]:
            statuses[(await client.request()).status] += 1
            assert time.monotonic() - start < 10, statuses
        ejected_at = time.monotonic()
        before = (await bad.counts())["requests"]
        served = Counter([(await client.request()).backend for _ in range(60)])
        during = (await bad.counts())["requests"] - before
        # the ejection ends on its own; blue-1 gets requests again, fails, goes out longer
        await proxy.wait_state("blue-1", False, BASE + 2, key="ejected")
        back_after = time.monotonic() - ejected_at

        async def ejected_again() -> bool:
            await client.request()
            return bool((await proxy.backend("blue-1"))["ejected"])

        await wait_until(ejected_again, 10, "a second ejection")
        info = (await proxy.backend("blue-1"))["health_checks"]
        client.close()
    figure(
        "outlier: backend answering 500",
        answers_500_before_ejection=statuses[500],
        requests_to_it_while_ejected=during,
        ejection_s=round(back_after, 2),
    )
    assert statuses[500] == OUTLIER["consecutive_5xx"]
    assert during == 0
    assert set(served) == {"blue-2", "blue-3"}
    assert BASE * 0.8 <= back_after <= BASE + 1.5
    assert info["ejections_total"] == 2


async def test_max_ejection_percent_keeps_half_the_pool(tmp_path: Path) -> None:
    async with running(
        tmp_path, {"blue": 2}, outlier_detection=OUTLIER, health_check={"enabled": False}
    ) as (proxy, backends):
        for backend in backends.values():
            await backend.ctl(fail=500)
        client = Client(proxy.port)
        for _ in range(30):
            await client.request()
        state = await proxy.backends()
        client.close()
    assert sorted(b["ejected"] for b in state.values()) == [False, True]


async def test_panic_mode_serves_when_every_health_check_fails(tmp_path: Path) -> None:
    """The health endpoint breaks everywhere while the application works: every
    backend is down, and requests are spread over all of them instead of 503."""
    async with running(tmp_path, {"blue": 2}) as (proxy, backends):
        for backend in backends.values():
            await backend.ctl(health=500)
        for backend_id in backends:
            await proxy.wait_state(backend_id, "down", 10)
        client = Client(proxy.port)
        responses = [await client.request() for _ in range(40)]
        client.close()
    statuses = Counter(r.status for r in responses)
    served = Counter(r.backend for r in responses)
    figure("panic mode", requests=40, statuses=dict(statuses), spread=dict(served))
    assert statuses == {200: 40}
    assert served == {"blue-1": 20, "blue-2": 20}


async def test_dead_canary_pool_falls_back_to_the_other_pool(tmp_path: Path) -> None:
    async with running(tmp_path, {"blue": 2, "green": 1}, weights={"blue": 50, "green": 50}) as (
        proxy,
        backends,
    ):
        backends["green-1"].kill()
        await proxy.wait_state("green-1", "down", 10)
        client = Client(proxy.port)
        responses = await asyncio.gather(*(client_get(proxy.port) for _ in range(40)))
        client.close()
    assert Counter(r[0] for r in responses) == {200: 40}
    assert {r[1] for r in responses} == {"blue"}


async def client_get(port: int) -> tuple[int, str | None]:
    client = Client(port)
    try:
        response = await client.request()
        return response.status, response.pool
    finally:
        client.close()
