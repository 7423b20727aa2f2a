"""Reload in place: SIGHUP, ``POST /api/v1/reload`` and ``zdproxy ctl reload``
against a real ``zdproxy run``, real backends and real keep-alive clients."""

from __future__ import annotations

import asyncio
import copy
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from support import async_wait_for
from support_control import DEPLOY_TOKEN, AdminClient, AdminProxy, actl, admin_config, dummy_pools
from support_reload import CountingBackend, metric, rewrite

CLIENTS = 30
HEALTH = {"enabled": True, "interval": "200ms", "timeout": "1s", "rise": 2, "fall": 3}


@dataclass
class Load:
    done: int = 0
    by_backend: dict[str, int] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)
    stop: bool = False


async def client(url: str, load: Load) -> None:
    connector = aiohttp.TCPConnector(limit=1)
    async with aiohttp.ClientSession(connector=connector) as session:
        while not load.stop:
            try:
                async with session.get(url) as response:
                    await response.read()
                    if response.status != 200:
                        load.failures.append(f"status {response.status}")
                        continue
                    name = response.headers["X-Backend"]
                    load.by_backend[name] = load.by_backend.get(name, 0) + 1
                    load.done += 1
            except (aiohttp.ClientError, KeyError) as exc:
                load.failures.append(repr(exc))


@pytest.fixture
async def backends() -> AsyncIterator[list[CountingBackend]]:
    started = [await CountingBackend(name).start() for name in ("a1", "a2", "a3", "b1")]
    yield started
    for backend in started:
        await backend.stop()


def pool_config(members: list[CountingBackend], weight: int = 100) -> dict[str, Any]:
    return {"weight": weight, "backends": [{"id": b.name, "address": b.address} for b in members]}


async def get(url: str) -> tuple[int, str, str]:
    """(status, X-Backend, body) of one GET on a fresh connection."""
    async with aiohttp.ClientSession() as session, session.get(url) as response:
        return response.status, response.headers.get("X-Backend", ""), await response.text()


async def metrics(admin: AdminClient) -> str:
    answer = await admin.call("GET", "/metrics")
    assert answer.status == 200, answer
    return answer.body.decode()


async def reloads(admin: AdminClient, result: str) -> float:
    return metric(await metrics(admin), "zdproxy_config_reloads_total", result=result)


def check_lines(path: Path) -> list[str]:
    done = subprocess.run(
        [sys.executable, "-m", "zdproxy.cli", "check", "-c", str(path)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 1, done
    return done.stderr.splitlines()


async def test_reload_under_keepalive_load(backends: list[CountingBackend], tmp_path: Path) -> None:
    """A backend added and a timeout changed by file + SIGHUP under 30 keep-alive
    clients: no failed request, no new upstream connection to the unchanged
    backends, and the new backend takes traffic once it is healthy."""
    a1, a2, a3, _ = backends
    config = admin_config({"blue": pool_config([a1, a2])}, None, health_check=HEALTH)
    process = AdminProxy(config, tmp_path).start()
    loop = asyncio.get_running_loop()
    # warm: 30 requests held at each backend leave 30 pooled connections to each, all
    # 30 clients can need; so any later connection to them is the reload's doing
    holds: list[asyncio.Task[tuple[int, str, str]]] = []
    while a1.held < CLIENTS or a2.held < CLIENTS:
        holds.append(loop.create_task(get(process.url + "/hold")))
        count = len(holds)
        await async_wait_for(lambda c=count: a1.held + a2.held >= c, 10, "held")
    a1.release()
    a2.release()
    assert {status for status, _, _ in await asyncio.gather(*holds)} == {200}
    a1.hold_again()
    a2.hold_again()
    load = Load()
    tasks = [loop.create_task(client(process.url + "/", load)) for _ in range(CLIENTS)]
    try:
        async with AdminClient(process.admin_url) as admin:
            mark = load.done
            await async_wait_for(lambda: load.done >= mark + 1000, 60, "1000 requests")
            before = (a1.proxied, a2.proxied, a1.closed, a2.closed)
            new = copy.deepcopy(config)
            new["pools"]["blue"] = pool_config([a1, a2, a3])
            new["timeouts"] = {"upstream_response": "1s"}
            rewrite(process.path, new)
            process.signal(signal.SIGHUP)
            await async_wait_for(
                lambda: load.by_backend.get("a3", 0) >= 200, 30, "traffic on the new backend"
            )
            mark = load.done
            await async_wait_for(lambda: load.done >= mark + 1000, 60, "1000 more requests")
            # no new connection to the unchanged backends, and none of theirs closed
            assert (a1.proxied, a2.proxied, a1.closed, a2.closed) == before
            assert await reloads(admin, "ok") == 1
            # a3's first request came after its second passing check (rise 2)
            first = a3.log.index("request")
            assert a3.log[:first].count("health") >= 2, a3.log[: first + 1]
            event = (await admin.events())[-1]
            assert (event["action"], event["actor"]) == ("config.reload", "sighup")
            assert event["after"]["backends_added"] == ["a3"]
            assert event["after"]["sections"] == ["timeouts"]
        load.stop = True
        await asyncio.gather(*tasks)
        tasks = []
        assert load.failures == [], load.failures[:5]
        print(f"\nreload under load: {load.done} requests, 0 failed")
        # the new upstream_response timeout applies: a held request gets 504
        status, _, _ = await get(process.url + "/hold")
        assert status == 504
    finally:
        load.stop = True
        await asyncio.gather(*tasks)
        for backend in backends:
            backend.release()
        process.stop()


async def test_an_invalid_file_is_refused_whole(
    backends: list[CountingBackend], tmp_path: Path
) -> None:
    a1, a2, *_ = backends
    config = admin_config({"blue": pool_config([a1])}, None)
    process = AdminProxy(config, tmp_path).start()
    try:
        bad = copy.deepcopy(config)
        bad["pools"]["blue"] = pool_config([a2], weight=90)  # must sum to 100
        bad["timeouts"] = {"conect": "1s"}  # typo
        rewrite(process.path, bad)
        lines = check_lines(process.path)
        assert len(lines) == 2
        async with AdminClient(process.admin_url) as admin:
            process.signal(signal.SIGHUP)
            await async_wait_for(
                lambda: all(line in process.log() for line in lines), 15, "the check lines logged"
            )
            for line in lines:
                assert f"ERROR zdproxy.error: {line}" in process.log()
            assert await reloads(admin, "invalid") == 1
            assert await reloads(admin, "ok") == 0
            status, name, _ = await get(process.url + "/")
            assert (status, name) == (200, "a1")  # not a2: nothing was applied
            answer = await admin.call("POST", "/api/v1/reload")
            assert answer.status == 400, answer
            assert answer.json()["problems"] == lines
            assert await reloads(admin, "invalid") == 2
            assert process.proc is not None and process.proc.poll() is None
    finally:
        process.stop()


async def test_a_removed_backend_drains_then_disappears(
    backends: list[CountingBackend], tmp_path: Path
) -> None:
    a1, a2, *_ = backends
    config = admin_config({"blue": pool_config([a1, a2])}, None, draining={"timeout": "60s"})
    process = AdminProxy(config, tmp_path).start()
    loop = asyncio.get_running_loop()
    holds: list[asyncio.Task[tuple[int, str]]] = []

    async def hold() -> tuple[int, str]:
        status, _, text = await get(process.url + "/hold")
        return status, text

    try:
        async with AdminClient(process.admin_url) as admin:
            while a2.held == 0:  # until one request waits on a2
                holds.append(loop.create_task(hold()))
                count = len(holds)
                await async_wait_for(lambda c=count: a1.held + a2.held >= c, 10, "held")
            new = copy.deepcopy(config)
            new["pools"]["blue"] = pool_config([a1])
            rewrite(process.path, new)
            answer = await admin.call("POST", "/api/v1/reload", token=DEPLOY_TOKEN)
            assert answer.status == 200, answer
            assert answer.json()["diff"]["backends_removed"] == ["a2"]
            view = await admin.backend("a2")
            assert view is not None and view["removing"] and view["state"] == "draining"
            async with aiohttp.ClientSession() as session:
                for _ in range(10):
                    async with session.get(process.url + "/") as response:
                        assert response.headers["X-Backend"] == "a1"
            a1.release()
            a2.release()
            results = await asyncio.gather(*holds)
            assert all(status == 200 for status, _ in results), results
            assert "a2\n" in [text for _, text in results]

            async def gone() -> bool:
                return await admin.backend("a2") is None

            await async_wait_for(gone, 10, "a2 gone")
            event = next(e for e in await admin.events() if e["action"] == "config.reload")
            assert event["actor"] == "deploy"
    finally:
        for backend in backends:
            backend.release()
        await asyncio.gather(*holds, return_exceptions=True)
        process.stop()


async def test_pool_weights_api_kept_until_the_file_changes_them(tmp_path: Path) -> None:
    config = admin_config(dummy_pools(), tmp_path / "state.json")
    process = AdminProxy(config, tmp_path).start()
    try:
        async with AdminClient(process.admin_url) as admin:
            await admin.ok("PUT", "/api/v1/split", {"blue": 60, "green": 40})
            # the file changes something else: the API's weights stay
            new = copy.deepcopy(config)
            new["pools"]["green"]["backends"][0]["weight"] = 5
            rewrite(process.path, new)
            result = await admin.ok("POST", "/api/v1/reload")
            assert result["diff"]["weights"] is None
            assert result["diff"]["backends_reweighted"] == {"green-1": 5}
            state = await admin.state()
            assert {n: p["weight"] for n, p in state["pools"].items()} == {"blue": 60, "green": 40}
            assert (await admin.backend("green-1") or {})["weight"] == 5
            # the file's weights change: the file wins
            new["pools"]["blue"]["weight"], new["pools"]["green"]["weight"] = 10, 90
            rewrite(process.path, new)
            result = await admin.ok("POST", "/api/v1/reload")
            assert result["diff"]["weights"] == {"blue": 10, "green": 90}
            state = await admin.state()
            assert {n: p["weight"] for n, p in state["pools"].items()} == {"blue": 10, "green": 90}
    finally:
        process.stop()


async def test_what_needs_a_restart_is_refused_and_the_rest_applied(tmp_path: Path) -> None:
    config = admin_config(dummy_pools(), tmp_path / "state.json")
    process = AdminProxy(config, tmp_path).start()
    try:
        async with AdminClient(process.admin_url) as admin:
            new = copy.deepcopy(config)
            new["listen"] = ["127.0.0.1:1"]
            new["state"] = {"path": str(tmp_path / "other.json")}
            new["pools"]["green"]["backends"].append({"id": "green-9", "address": "127.0.0.1:2"})
            rewrite(process.path, new)
            result = await admin.ok("POST", "/api/v1/reload")
            needed = result["restart_needed"]
            assert any(m.startswith("listen changes need a restart") for m in needed), needed
            assert any(m.startswith("state changes") for m in needed), needed
            assert await admin.backend("green-9") is not None
            assert "listen changes need a restart" in process.log()
            status, _, _ = await get(process.url + "/")  # the old listener serves on
            assert status == 502  # dummy backends: closed ports
    finally:
        process.stop()


async def test_ctl_reload_exit_codes(tmp_path: Path) -> None:
    config = admin_config(dummy_pools(), None)
    process = AdminProxy(config, tmp_path).start()
    try:
        new = copy.deepcopy(config)
        new["pools"]["blue"]["backends"].append({"id": "blue-9", "address": "127.0.0.1:3"})
        rewrite(process.path, new)
        done = await actl(process.admin_url, "reload")
        assert done.returncode == 0, done
        assert "backend blue-9 added to pool blue at 127.0.0.1:3" in done.stdout
        again = await actl(process.admin_url, "reload")
        assert again.returncode == 0 and "nothing changed" in again.stdout, again
        new["pools"]["blue"]["weight"] = 7
        rewrite(process.path, new)
        lines = check_lines(process.path)
        refused = await actl(process.admin_url, "reload")
        assert refused.returncode == 1, refused
        assert refused.stderr.splitlines()[1:] == lines
        assert refused.stdout == ""
    finally:
        process.stop()


async def test_sighup_twice_quickly(tmp_path: Path) -> None:
    """Two SIGHUPs in a row: the second waits for the first (or the kernel merged
    them); the file as it is when the last one runs is what stays."""
    config = admin_config(dummy_pools(), None)
    process = AdminProxy(config, tmp_path).start()
    try:
        async with AdminClient(process.admin_url) as admin:
            first = copy.deepcopy(config)
            first["pools"]["blue"]["backends"].append({"id": "blue-8", "address": "127.0.0.1:4"})
            rewrite(process.path, first)
            process.signal(signal.SIGHUP)
            second = copy.deepcopy(first)
            second["pools"]["green"]["backends"].append({"id": "green-8", "address": "127.0.0.1:5"})
            rewrite(process.path, second)
            process.signal(signal.SIGHUP)

            # POSIX does not queue a signal already pending: when the second
            # SIGHUP comes before the process took the first, the kernel delivers
            # one, and one reload reads the second file (on a busy machine, often)
            # (a reload may still be running between two reads: read until the
            # counter and the events agree)
            async def second_file_applied() -> bool:
                if await admin.backend("green-8") is None:
                    return False
                actions = [e["action"] for e in await admin.events()]
                # the second may find nothing new: it records an event all the same
                return actions.count("config.reload") == await reloads(admin, "ok")

            await async_wait_for(second_file_applied, 15, "the second file applied")
            assert await admin.backend("blue-8") is not None
            assert await reloads(admin, "ok") in (1, 2)
            assert await reloads(admin, "error") == 0
            assert await reloads(admin, "invalid") == 0
            assert process.proc is not None and process.proc.poll() is None
    finally:
        process.stop()


async def test_a_new_address_replaces_the_backend_and_its_connections(
    backends: list[CountingBackend], tmp_path: Path
) -> None:
    """Same id, new address: the next requests go to the new address, not over
    the connections pooled to the old one."""
    a1, a2, *_ = backends
    config = admin_config(
        {"blue": {"weight": 100, "backends": [{"id": "x", "address": a1.address}]}}, None
    )
    process = AdminProxy(config, tmp_path).start()
    try:
        async with AdminClient(process.admin_url) as admin, aiohttp.ClientSession() as session:
            for _ in range(5):  # one keep-alive client: the proxy pools a connection to a1
                async with session.get(process.url + "/") as response:
                    assert response.headers["X-Backend"] == "a1"
            new = copy.deepcopy(config)
            new["pools"]["blue"]["backends"][0]["address"] = a2.address
            rewrite(process.path, new)
            result = await admin.ok("POST", "/api/v1/reload")
            assert result["diff"]["backends_replaced"] == ["x"]
            for _ in range(5):
                async with session.get(process.url + "/") as response:
                    assert response.headers["X-Backend"] == "a2"
            assert (await admin.backend("x") or {})["address"] == a2.address
    finally:
        process.stop()
