"""``workers: 2``: a control process and two data-path workers, real processes.

Both workers serve; a flip through the API reaches every worker before its answer
(traffic follows, no failed request); a worker killed with SIGKILL is restarted
and costs at most its in-flight requests; /metrics equals the requests sent;
SIGTERM exits 0 and leaves no worker behind (checked by PID); a reload and a hot
upgrade reach the workers.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
import pytest
import yaml
from support import Backend, async_wait_for, in_thread
from support_control import AdminClient, AdminProxy, admin_config
from support_upgrade import KeepAliveLoad, UpgradingProxy, upgrade_config

CLIENTS = 16
T = TypeVar("T")


@dataclass
class Load:
    #: (sent at, pool that answered) of every successful request
    done: list[tuple[float, str]] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    stop: bool = False

    def since(self, moment: float) -> list[str]:
        return [pool for sent, pool in self.done if sent > moment]


async def client(url: str, load: Load, force_close: bool = False) -> None:
    """One client connection after the other (``force_close``: a new connection
    each request, so that the kernel spreads them over the workers)."""
    loop = asyncio.get_running_loop()
    connector = aiohttp.TCPConnector(limit=1, force_close=force_close)
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
        backend.delay = 0.002  # requests stay in flight a little
    yield backends
    for backend in backends:
        await backend.stop()


def workers_config(pools: list[Backend]) -> dict[str, Any]:
    return admin_config(
        {
            name: {
                "weight": 100 if name == "blue" else 0,
                "backends": [{"id": b.name, "address": b.address} for b in pools if b.pool == name],
            }
            for name in ("blue", "green")
        },
        None,
        workers=2,
    )


async def start(config: dict[str, Any], tmp_path: Path) -> AdminProxy:
    process = AdminProxy(config, tmp_path).start()
    async with AdminClient(process.admin_url) as admin:

        async def ready() -> bool:
            workers = (await admin.state()).get("workers") or []
            return len(workers) == 2 and all(w["ready"] for w in workers)

        await async_wait_for(ready, 30, "two workers ready")
    return process


async def every_worker(admin: AdminClient, send: Callable[[], Awaitable[list[T]]]) -> list[T]:
    """Batches of requests (``send``) until every worker answered some of them;
    the results of all. Waits for the reports (every 200 ms) of each batch."""
    base = [w["requests"] for w in (await admin.state())["workers"]]
    results: list[T] = []
    for _ in range(20):
        results += await send()

        async def reported(sent: int = len(results)) -> bool:
            counts = [w["requests"] for w in (await admin.state())["workers"]]
            return sum(counts) - sum(base) >= sent

        await async_wait_for(reported, 10, "the workers' reports")
        counts = [w["requests"] for w in (await admin.state())["workers"]]
        if all(now > then for now, then in zip(counts, base, strict=True)):
            return results
    raise AssertionError("one worker took every connection of 20 batches")


def parent_of(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as stat:
        return int(stat.read().rpartition(")")[2].split()[1])


def alive(pid: int) -> bool:
    """Running (a zombie counts as gone: it serves nothing)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rpartition(")")[2].split()[0] != "Z"
    except FileNotFoundError:
        return False


async def requests_total(admin: AdminClient) -> int:
    answer = await admin.call("GET", "/metrics")
    assert answer.status == 200, answer
    text = answer.body.decode()
    return sum(
        int(float(value))
        for value in re.findall(r"^zdproxy_requests_total\{[^}]*\} (\S+)$", text, re.M)
    )


async def test_both_workers_serve_and_metrics_equal_the_requests_sent(
    pools: list[Backend], tmp_path: Path
) -> None:
    process = await start(workers_config(pools), tmp_path)
    try:
        async with AdminClient(process.admin_url) as admin:
            workers = (await admin.state())["workers"]
            pids = [w["pid"] for w in workers]
            assert len(set(pids)) == 2
            assert all(parent_of(pid) == process.pid for pid in pids)
            load = Load()
            tasks = [
                asyncio.get_running_loop().create_task(
                    client(process.url + "/", load, force_close=True)
                )
                for _ in range(CLIENTS)
            ]

            async def both_served() -> bool:
                workers = (await admin.state())["workers"]
                return all(w["requests"] >= 20 for w in workers) or bool(load.failures)

            await async_wait_for(both_served, 60, "requests served by both workers")
            load.stop = True
            await asyncio.gather(*tasks)
            assert load.failures == []
            sent = len(load.done)
            assert set(load.since(0)) == {"blue"}

            # the workers report every 200 ms: the totals reach the requests sent
            async def counted() -> bool:
                return await requests_total(admin) >= sent

            await async_wait_for(counted, 10, "every request in /metrics")
            assert await requests_total(admin) == sent
            state = await admin.state()
            assert sum(w["requests"] for w in state["workers"]) == sent
            by_backend = sum(b["requests"] for b in state["pools"]["blue"]["backends"])
            assert by_backend == sent
            assert sum(len(b.requests) for b in pools) == sent
    finally:
        assert process.stop() == 0
    assert not any(alive(pid) for pid in pids), "a worker outlived SIGTERM"


async def test_flips_reach_every_worker_before_the_answer(
    pools: list[Backend], tmp_path: Path
) -> None:
    process = await start(workers_config(pools), tmp_path)
    loop = asyncio.get_running_loop()
    load = Load()
    # keep-alive clients (the next request follows the answer at once) and clients
    # with a new connection per request (so that both workers take some all along)
    tasks = [
        loop.create_task(client(process.url + "/", load, force_close=n % 2 == 1))
        for n in range(2 * CLIENTS)
    ]
    try:
        async with AdminClient(process.admin_url) as admin:

            async def both_serve() -> bool:
                workers = (await admin.state())["workers"]
                return all(w["requests"] >= 20 for w in workers) or bool(load.failures)

            await async_wait_for(both_serve, 60, "requests served by both workers")
            for target in ("green", "blue", "green", "blue"):
                answered = loop.time()
                await admin.ok("POST", "/api/v1/flip", {"to": target})
                answered = loop.time()
                settled = len(load.since(answered))

                async def enough(settled: int = settled, answered: float = answered) -> bool:
                    return len(load.since(answered)) >= settled + 200 or bool(load.failures)

                await async_wait_for(enough, 30, f"requests after the flip to {target}")
                # sent after the answer: every one answered by the new pool, in
                # whichever worker took it
                assert set(load.since(answered)) == {target}
            workers = (await admin.state())["workers"]
            assert all(w["requests"] > 0 for w in workers), workers
    finally:
        load.stop = True
        await asyncio.gather(*tasks)
        assert process.stop() == 0
    assert load.failures == []


async def test_a_killed_worker_is_restarted_and_costs_at_most_its_in_flight_requests(
    pools: list[Backend], tmp_path: Path
) -> None:
    process = await start(workers_config(pools), tmp_path)
    loop = asyncio.get_running_loop()
    load = Load()
    tasks = [
        loop.create_task(client(process.url + "/", load, force_close=True)) for _ in range(CLIENTS)
    ]
    try:
        async with AdminClient(process.admin_url) as admin:

            async def busy() -> bool:
                return len(load.done) >= 200

            await async_wait_for(busy, 30, "load going")
            victim = (await admin.state())["workers"][0]["pid"]
            os.kill(victim, signal.SIGKILL)

            async def restarted() -> bool:
                worker = (await admin.state())["workers"][0]
                return worker["pid"] != victim and worker["ready"] and worker["restarts"] == 1

            await async_wait_for(restarted, 30, "the worker restarted")
            assert not alive(victim)
            new_pid = (await admin.state())["workers"][0]["pid"]
            assert parent_of(new_pid) == process.pid
            before = (await admin.state())["workers"][0]["requests"]

            async def serves() -> bool:
                worker = (await admin.state())["workers"][0]
                return worker["requests"] >= before + 20

            await async_wait_for(serves, 30, "the new worker serving")
            events = await admin.events()
            restarts = [e for e in events if e["action"] == "worker.restarted"]
            assert len(restarts) == 1 and restarts[0]["before"]["pid"] == victim
            assert restarts[0]["before"]["exit"] == -signal.SIGKILL
        load.stop = True
        await asyncio.gather(*tasks)
        # one request at a time per client: at most one in flight on each
        assert len(load.failures) <= CLIENTS, load.failures
        assert "worker 0 (pid" in process.log() and "restarting" in process.log()
    finally:
        load.stop = True
        await asyncio.gather(*tasks)
        assert process.stop() == 0


async def fresh_get(url: str) -> tuple[int, str]:
    """One request on a connection of its own (any worker may take it)."""
    connector = aiohttp.TCPConnector(force_close=True)
    async with (
        aiohttp.ClientSession(connector=connector) as session,
        session.get(url) as response,
    ):
        await response.read()
        return response.status, response.headers.get("X-Zdproxy-Pool", "")


async def test_a_reload_reaches_every_worker(pools: list[Backend], tmp_path: Path) -> None:
    """Weights from the file and a data-path setting (the upstream response
    timeout, applied by each worker) hold in both workers once the reload is
    answered."""
    config = workers_config(pools)
    process = await start(config, tmp_path)
    try:
        async with AdminClient(process.admin_url) as admin:
            assert await fresh_get(process.url + "/slow/0.6") == (200, "blue")
            config["pools"]["blue"]["weight"] = 0
            config["pools"]["green"]["weight"] = 100
            config["timeouts"] = {"upstream_response": "200ms"}
            process.path.write_text(yaml.safe_dump(config, sort_keys=False))
            answer = await admin.call("POST", "/api/v1/reload")
            assert answer.status == 200, answer

            async def batch(path: str) -> list[tuple[int, str]]:
                return list(
                    await asyncio.gather(*(fresh_get(process.url + path) for _ in range(CLIENTS)))
                )

            results = await every_worker(admin, lambda: batch("/"))
            assert set(results) == {(200, "green")}
            slow = await every_worker(admin, lambda: batch("/slow/0.6"))
            assert {status for status, _ in slow} == {504}
    finally:
        assert process.stop() == 0


def wait_workers_ready(proxy: UpgradingProxy, pid: int) -> list[int]:
    """Until the process ``pid`` serves with two ready workers; their pids."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        state = proxy.state()
        workers = state.get("workers") or []
        if state["pid"] == pid and len(workers) == 2 and all(w["ready"] for w in workers):
            return [int(w["pid"]) for w in workers]
        time.sleep(0.05)
    raise AssertionError(f"no two ready workers:\n{proxy.log()}")


async def test_hot_upgrade_with_workers_under_load_fails_no_request(
    pools: list[Backend], tmp_path: Path
) -> None:
    """SIGUSR2: the new control process starts its workers; once it serves, the
    old one stops its workers (each drains) and exits; no request fails."""
    config = upgrade_config(
        {"blue": {"weight": 100, "backends": [{"address": pools[0].address}]}}, None, workers=2
    )
    proxy = await in_thread(UpgradingProxy(config, tmp_path).start)
    try:
        old = proxy.first_pid
        old_workers = await in_thread(wait_workers_ready, proxy, old)
        async with KeepAliveLoad(proxy.url, clients=CLIENTS) as load:
            await load.wait_requests(300)
            new = await in_thread(proxy.upgrade)
            new_workers = await in_thread(wait_workers_ready, proxy, new)
            await in_thread(proxy.wait_exited, old)
            await load.wait_requests(300)
        figures = load.figures
        assert figures.errors == [], figures.errors[:5]
        assert figures.non_2xx == 0, figures.statuses
        assert set(figures.backends) == {"blue-1"}
        assert proxy.proc is not None and proxy.proc.returncode == 0
        assert not any(alive(pid) for pid in old_workers), "an old worker outlived the upgrade"
        assert all(parent_of(pid) == new for pid in new_workers)
        assert not set(new_workers) & set(old_workers)
    finally:
        await in_thread(proxy.stop)


async def pinned_get(url: str, cookie: str | None = None) -> tuple[str, str | None]:
    """One request on a connection of its own: (pool, the affinity pin set)."""
    connector = aiohttp.TCPConnector(force_close=True)
    headers = {"Cookie": f"zd_affinity={cookie}"} if cookie else {}
    async with (
        aiohttp.ClientSession(connector=connector) as session,
        session.get(url, headers=headers) as response,
    ):
        await response.read()
        assert response.status == 200
        morsel = response.cookies.get("zd_affinity")
        return response.headers["X-Zdproxy-Pool"], morsel.value if morsel else None


async def test_affinity_pins_hold_in_every_worker(pools: list[Backend], tmp_path: Path) -> None:
    """The control process's sticky key is every worker's: a pin set by one worker
    is honoured by the other (with different keys, half would move)."""
    config = workers_config(pools)
    config["pools"]["blue"]["weight"] = config["pools"]["green"]["weight"] = 50
    config["sticky"] = {"mode": "pool"}
    process = await start(config, tmp_path)
    try:
        first = [await pinned_get(process.url + "/") for _ in range(30)]
        assert all(pin for _, pin in first)
        assert {pool for pool, _ in first} == {"blue", "green"}

        async def batch() -> list[tuple[tuple[str, str | None], str]]:
            answers = await asyncio.gather(
                *(pinned_get(process.url + "/", pin) for _, pin in first)
            )
            return list(zip(answers, [pool for pool, _ in first], strict=True))

        async with AdminClient(process.admin_url) as admin:
            # until both workers answered pinned requests: each honours every pin
            results = await every_worker(admin, batch)
        assert all(answer == (pool, None) for answer, pool in results)
    finally:
        assert process.stop() == 0


async def test_passive_health_results_reach_the_control_process(
    pools: list[Backend], tmp_path: Path
) -> None:
    """Outlier detection runs in the control process on the workers' results: a
    backend answering 500 is ejected, as with one process."""
    config = workers_config(pools)
    config["outlier_detection"] = {
        "enabled": True,
        "consecutive_5xx": 3,
        "base_ejection_time": "30s",
        "max_ejection_percent": 50,
    }
    process = await start(config, tmp_path)
    try:
        async with AdminClient(process.admin_url) as admin:
            statuses = [(await fresh_get(process.url + "/status/500"))[0] for _ in range(CLIENTS)]
            assert set(statuses) == {500}

            async def ejected() -> bool:
                backends = (await admin.state())["pools"]["blue"]["backends"]
                return sum(b["ejected"] for b in backends) == 1

            await async_wait_for(ejected, 10, "one blue backend ejected")
    finally:
        assert process.stop() == 0


async def test_shadow_settings_from_the_api_reach_every_worker(
    pools: list[Backend], tmp_path: Path
) -> None:
    process = await start(workers_config(pools), tmp_path)
    blue = [b for b in pools if b.pool == "blue"]
    green = [b for b in pools if b.pool == "green"]
    try:
        async with AdminClient(process.admin_url) as admin:
            await admin.ok("PUT", "/api/v1/shadow", {"pool": "green", "percent": 100})

            async def batch() -> list[tuple[int, str]]:
                return list(
                    await asyncio.gather(*(fresh_get(process.url + "/") for _ in range(CLIENTS)))
                )

            results = await every_worker(admin, batch)
            assert set(results) == {(200, "blue")}

            def copied() -> bool:
                return sum(len(b.requests) for b in green) >= len(results)

            await async_wait_for(copied, 10, "a shadow copy of every request")
            assert sum(len(b.requests) for b in green) == sum(len(b.requests) for b in blue)
            sent = sum(len(b.requests) for b in green)

            # the figures are the sum of the workers'
            async def summed() -> bool:
                figures = (await admin.ok("GET", "/api/v1/shadow"))["figures"]
                # (a copy answered before its live request is compared when the live
                # one ends: that result must reach the control process too)
                return bool(
                    figures["sent"] >= sent
                    and figures["in_flight"] == 0
                    and figures["compared"] >= sent
                )

            await async_wait_for(summed, 10, "the shadow figures summed")
            figures = (await admin.ok("GET", "/api/v1/shadow"))["figures"]
            assert figures["sent"] == sent
            assert figures["results"]["match"] == sent, figures
            assert figures["compared"] == sent
            await admin.ok("DELETE", "/api/v1/shadow")
            copies = sum(len(b.requests) for b in green)
            await asyncio.gather(*(fresh_get(process.url + "/") for _ in range(CLIENTS)))
            assert sum(len(b.requests) for b in green) == copies
    finally:
        assert process.stop() == 0


async def test_a_tunnel_in_a_worker_gets_the_drain_timeout(tmp_path: Path) -> None:
    """The control process drains (in-flight counts the workers' tunnels) and
    marks the backend drained at the timeout; the worker holding the tunnel
    closes it then. The tunnel to the other backend is untouched."""
    from support_health import running as running_backends

    async with (
        running_backends(tmp_path, {"blue": 2}, draining={"timeout": "1.5s"}, workers=2) as (
            proxy,
            _,
        ),
        aiohttp.ClientSession() as session,
    ):
        # each worker balances on its own (two connections taken by two workers may
        # both go to blue-1): open tunnels until each backend holds one
        sockets = []
        owners: list[str] = []
        while not {"blue-1", "blue-2"} <= set(owners):
            assert len(sockets) < 20, owners
            ws = await session.ws_connect(f"http://127.0.0.1:{proxy.port}/ws")
            sockets.append(ws)
            await ws.send_str("hi")
            owners.append((await ws.receive_str()).split(":")[0])
        drained_ws = sockets[owners.index("blue-1")]
        other_ws = sockets[owners.index("blue-2")]
        for ws in sockets:
            if ws is not drained_ws and ws is not other_ws:
                await ws.close()  # one tunnel per backend, as the test means
        status, _ = await proxy.api("POST", "/api/v1/backends/blue-1/drain")
        assert status == 200
        # open while draining: the tunnel counts as in flight, the drain waits
        await drained_ws.send_str("still there")
        assert await drained_ws.receive_str() == "blue-1:still there"
        message = await drained_ws.receive(timeout=15)
        assert message.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED)
        await proxy.wait_state("blue-1", "drained", 5)
        await other_ws.send_str("ok")
        assert await other_ws.receive_str() == "blue-2:ok"
        for ws in sockets:
            await ws.close()
