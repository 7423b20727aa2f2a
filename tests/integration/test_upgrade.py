"""Hot upgrade (SIGUSR2) with real processes, real backends and real clients.

Each test starts ``zdproxy run`` (``UpgradingProxy``), sends SIGUSR2 to the
serving process and follows the serving PID through ``GET /api/v1/state``.
Load comes from concurrent aiohttp keep-alive clients; every request must be
answered with a 2xx, none may fail, across one upgrade or many.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import signal
import socket
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from ports import free_port
from support import Backend, async_wait_for, in_thread
from support_upgrade import HOST, KeepAliveLoad, UpgradingProxy, upgrade_config

import zdproxy

pytestmark = pytest.mark.timeout(300)


@pytest.fixture
async def backends() -> AsyncIterator[list[Backend]]:
    started = [await Backend("blue-a").start(), await Backend("blue-b").start()]
    yield started
    for backend in started:
        await backend.stop()


def _pools(backends: list[Backend]) -> dict[str, Any]:
    return {
        "blue": {"weight": 100, "backends": [{"address": b.address} for b in backends[:1]]},
        "green": {"weight": 0, "backends": [{"address": b.address} for b in backends[1:]]},
    }


async def _start(config: dict[str, Any], tmp_path: Path, **kwargs: Any) -> UpgradingProxy:
    return await in_thread(UpgradingProxy(config, tmp_path, **kwargs).start)


def _metric(proxy: UpgradingProxy, name: str) -> dict[str, float]:
    import urllib.request

    request = urllib.request.Request(
        proxy.admin_url + "/metrics", headers={"Authorization": "Bearer " + _token()}
    )
    with urllib.request.urlopen(request, timeout=5) as response:
        text = response.read().decode()
    return {
        labels: float(value)
        for labels, value in re.findall(rf"^{name}(\{{[^}}]*\}})? (\S+)$", text, re.M)
    }


def _token() -> str:
    from support_upgrade import TOKEN

    return TOKEN


async def _upgrade(proxy: UpgradingProxy) -> tuple[int, int]:
    """SIGUSR2; (old pid, new pid) once the new one serves."""
    old = await in_thread(proxy.serving_pid)
    new = await in_thread(proxy.upgrade)
    return old, new


# ---- under load ----------------------------------------------------------------


async def test_upgrade_under_keep_alive_load_fails_no_request(
    backends: list[Backend], tmp_path: Path
) -> None:
    proxy = await _start(upgrade_config(_pools(backends), None), tmp_path)
    try:
        async with KeepAliveLoad(proxy.url, clients=20) as load:
            await load.wait_requests(300)
            old, new = await _upgrade(proxy)
            # the old process drained and left while the clients kept going
            await in_thread(proxy.wait_exited, old)
            await load.wait_requests(300)
        figures = load.figures
        assert figures.errors == [], figures.errors[:5]
        assert figures.non_2xx == 0, figures.statuses
        assert set(figures.backends) == {"blue-a"}
        state = await in_thread(proxy.state)
        assert state["pid"] == new != old and state["version"] == zdproxy.__version__
        assert await in_thread(proxy.processes) == [new]
        upgrades = await in_thread(_metric, proxy, "zdproxy_upgrades_total")
        assert upgrades == {'{result="ok"}': 1.0}
        _, events = await in_thread(proxy.api, "GET", "/api/v1/events")
        [event] = [e for e in events["events"] if e["action"] == "process.upgrade"]
        assert event["before"] == {"pid": old}
        assert event["after"] == {"result": "ok", "pid": new, "version": zdproxy.__version__}
    finally:
        await in_thread(proxy.stop)


async def test_new_connections_during_upgrades_are_never_refused_or_reset(
    backends: list[Backend], tmp_path: Path
) -> None:
    """A new connection for every request: connections land in the shared
    accept backlog while the old process stops accepting; the new process
    accepts them (a reset or a refusal is an error here: aiohttp retries only
    on a reused connection)."""
    proxy = await _start(upgrade_config(_pools(backends), None), tmp_path)
    try:
        async with KeepAliveLoad(proxy.url, clients=16, new_connections=True) as load:
            await load.wait_requests(100)
            for _ in range(3):
                old, _ = await _upgrade(proxy)
                await in_thread(proxy.wait_exited, old)
                await load.wait_requests(100)
        assert load.figures.errors == [], load.figures.errors[:5]
        assert load.figures.non_2xx == 0, load.figures.statuses
    finally:
        await in_thread(proxy.stop)


_WRK_DONE = """
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format("WRK %d %d %d %d %d %d\\n", summary.requests,
    e.connect, e.read, e.write, e.timeout, e.status))
end
"""


async def test_upgrades_under_wrk_load_cost_no_socket_error(
    backends: list[Backend], tmp_path: Path
) -> None:
    """wrk (30 keep-alive connections, bounded to 10 s) with three upgrades inside."""
    assert shutil.which("wrk"), "wrk is not installed (bash scripts/system-deps installs it)"
    proxy = await _start(upgrade_config(_pools(backends), None), tmp_path)
    script = tmp_path / "done.lua"
    script.write_text(_WRK_DONE)
    argv = ["wrk", "-t1", "-c30", "-d10s", "--timeout", "5s", "-s", str(script), proxy.url + "/"]
    try:
        wrk = await asyncio.create_subprocess_exec(*argv, stdout=asyncio.subprocess.PIPE)
        await async_wait_for(lambda: len(backends[0].requests) > 200, what="wrk's load")
        pids = [proxy.first_pid]
        for _ in range(3):
            old, new = await _upgrade(proxy)
            await in_thread(proxy.wait_exited, old)
            pids.append(new)
        stdout, _ = await asyncio.wait_for(wrk.communicate(), 60)
        assert wrk.returncode == 0
        [line] = [x for x in stdout.decode().splitlines() if x.startswith("WRK ")]
        requests, connect, read, write, timeout, non_2xx = map(int, line.split()[1:])
        assert requests > 1000
        assert (connect, read, write, timeout, non_2xx) == (0, 0, 0, 0, 0), line
        assert len(set(pids)) == 4
    finally:
        await in_thread(proxy.stop)


async def test_twenty_upgrades_in_a_row_under_load(backends: list[Backend], tmp_path: Path) -> None:
    """Each upgrade follows as soon as the previous new process serves, the old
    ones still draining meanwhile."""
    proxy = await _start(upgrade_config(_pools(backends), None), tmp_path)
    seen: list[int] = [proxy.first_pid]
    try:
        async with KeepAliveLoad(proxy.url, clients=16) as load:
            await load.wait_requests(100)
            for _ in range(20):
                _, new = await _upgrade(proxy)
                await load.wait_requests(20)
                seen.append(new)
            for pid in seen[:-1]:
                await in_thread(proxy.wait_exited, pid)
            await load.wait_requests(100)
        assert load.figures.errors == [], load.figures.errors[:5]
        assert load.figures.non_2xx == 0, load.figures.statuses
        assert len(set(seen)) == 21
        assert await in_thread(proxy.processes) == [seen[-1]]
        # the event ids go on from process to process: twenty upgrades, ids in order
        _, events = await in_thread(proxy.api, "GET", "/api/v1/events")
        upgrades = [e for e in events["events"] if e["action"] == "process.upgrade"]
        assert [e["after"]["pid"] for e in upgrades] == seen[1:]
        ids = [e["id"] for e in events["events"]]
        assert ids == sorted(set(ids))
    finally:
        await in_thread(proxy.stop)


async def test_a_slow_request_in_flight_on_the_old_process_completes(
    backends: list[Backend], tmp_path: Path
) -> None:
    proxy = await _start(upgrade_config(_pools(backends), None), tmp_path)
    try:
        async with aiohttp.ClientSession() as session:
            slow = asyncio.create_task(session.get(proxy.url + "/slow/5"))
            await async_wait_for(
                lambda: any(r["path"] == "/slow/5" for r in backends[0].requests),
                what="the slow request at the backend",
            )
            old, new = await _upgrade(proxy)
            # the new process serves, the old one waits for its request
            async with session.get(proxy.url + "/") as response:
                assert response.status == 200
            assert await in_thread(proxy.processes) == sorted([old, new])
            assert old in await in_thread(proxy.processes)
            response = await slow
            assert response.status == 200
            assert await response.text() == "blue-a slow\n"
            # answered while draining: the client is told to go elsewhere next time
            assert response.headers["Connection"] == "close"
            response.release()
        await in_thread(proxy.wait_exited, old)
    finally:
        await in_thread(proxy.stop)


# ---- WebSocket -----------------------------------------------------------------


async def _ws_echo(request: web.Request) -> web.WebSocketResponse:
    ws = web.WebSocketResponse()
    await ws.prepare(request)
    async for message in ws:
        if message.type == aiohttp.WSMsgType.TEXT:
            await ws.send_str(message.data)
    return ws


@pytest.fixture
async def ws_backend() -> AsyncIterator[int]:
    app = web.Application()
    app.router.add_get("/ws", _ws_echo)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, HOST, port).start()
    yield port
    await runner.cleanup()


async def test_an_open_websocket_gets_the_drain_deadline(ws_backend: int, tmp_path: Path) -> None:
    pools = {"blue": {"weight": 100, "backends": [{"address": f"{HOST}:{ws_backend}"}]}}
    config = upgrade_config(pools, None, shutdown_timeout="3s")
    proxy = await _start(config, tmp_path)
    try:
        async with aiohttp.ClientSession() as session:
            old_ws = await session.ws_connect(proxy.url + "/ws")
            await old_ws.send_str("before")
            assert (await old_ws.receive_str()) == "before"
            old, _ = await _upgrade(proxy)
            # not closed at once: the tunnel on the old process still carries messages
            await old_ws.send_str("during")
            assert (await old_ws.receive_str()) == "during"
            assert old in await in_thread(proxy.processes)
            # a new WebSocket goes to the new process (its tunnel counter says so)
            new_ws = await session.ws_connect(proxy.url + "/ws")
            await new_ws.send_str("new")
            assert (await new_ws.receive_str()) == "new"
            tunnels = await in_thread(_metric, proxy, "zdproxy_tunnels_total")
            assert tunnels == {"": 1.0}
            # at the drain deadline (shutdown_timeout) the old tunnel is closed
            message = await old_ws.receive(timeout=30)
            assert message.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED)
            await in_thread(proxy.wait_exited, old)
            await new_ws.send_str("still")
            assert (await new_ws.receive_str()) == "still"
            await new_ws.close()
            await old_ws.close()
    finally:
        await in_thread(proxy.stop)


# ---- failures ------------------------------------------------------------------


async def test_a_new_process_with_an_invalid_config_leaves_the_old_one_serving(
    backends: list[Backend], tmp_path: Path
) -> None:
    config = upgrade_config(_pools(backends), None)
    proxy = await _start(config, tmp_path)
    try:
        async with KeepAliveLoad(proxy.url, clients=8) as load:
            await load.wait_requests(100)
            proxy.path.write_text(proxy.path.read_text() + "bogus_key: 1\n")
            os.kill(proxy.first_pid, signal.SIGUSR2)
            await async_wait_for(
                lambda: "hot upgrade failed" in proxy.log(), 30, "the failure in the log"
            )
            await load.wait_requests(100)
        assert load.figures.errors == [] and load.figures.non_2xx == 0
        log = proxy.log()
        assert re.search(r"did not start: .*zdproxy\.yaml:\d+: bogus_key: ", log), log
        assert "this process serves on" in log
        state = await in_thread(proxy.state)
        assert state["pid"] == proxy.first_pid
        assert await in_thread(proxy.processes) == [proxy.first_pid]
        failed = await in_thread(_metric, proxy, "zdproxy_upgrades_total")
        assert failed == {'{result="failed"}': 1.0}
        _, events = await in_thread(proxy.api, "GET", "/api/v1/events")
        [event] = [e for e in events["events"] if e["action"] == "process.upgrade"]
        assert event["after"]["result"] == "failed"
        assert any("bogus_key" in line for line in event["after"]["problems"])
        # changes are taken again once the upgrade is over, and a fixed file upgrades
        status, _ = await in_thread(proxy.api, "PUT", "/api/v1/split", {"blue": 90, "green": 10})
        assert status == 200
        proxy.write_config(config)
        _, new = await _upgrade(proxy)
        state = await in_thread(proxy.state)
        assert state["pid"] == new and state["pools"]["green"]["weight"] == 10
    finally:
        await in_thread(proxy.stop)


async def test_a_second_sigusr2_during_an_upgrade_is_refused(
    backends: list[Backend], tmp_path: Path
) -> None:
    proxy = await _start(upgrade_config(_pools(backends), None), tmp_path)
    try:
        os.kill(proxy.first_pid, signal.SIGUSR2)
        await async_wait_for(lambda: "starting a new process" in proxy.log(), what="the start")
        os.kill(proxy.first_pid, signal.SIGUSR2)
        new = await in_thread(proxy.wait_serving, lambda pid: pid != proxy.first_pid)
        await in_thread(proxy.wait_exited, proxy.first_pid)
        assert "refused: one is already in progress" in proxy.log()
        assert proxy.log().count("starting a new process") == 1
        assert await in_thread(proxy.processes) == [new]
    finally:
        await in_thread(proxy.stop)


# ---- what is handed over ------------------------------------------------------------


def _runtime_view(state: dict[str, Any]) -> dict[str, Any]:
    return {
        name: (pool["weight"], [(b["id"], b["admin"], b["state"]) for b in pool["backends"]])
        for name, pool in state["pools"].items()
    }


@pytest.mark.parametrize("saved", [False, True], ids=["handed-over", "state-file"])
async def test_weights_admin_states_and_added_backends_survive(
    backends: list[Backend], tmp_path: Path, saved: bool
) -> None:
    pools = {
        "blue": {"weight": 100, "backends": [{"address": b.address} for b in backends]},
        "green": {"weight": 0, "backends": [{"address": backends[1].address}]},
    }
    state_path = tmp_path / "state.json" if saved else None
    proxy = await _start(upgrade_config(pools, state_path), tmp_path)
    try:
        api = proxy.api
        assert (await in_thread(api, "PUT", "/api/v1/split", {"blue": 70, "green": 30}))[0] == 200
        assert (await in_thread(api, "POST", "/api/v1/backends/blue-2/disable"))[0] == 200
        added = {"pool": "green", "address": backends[0].address}
        assert (await in_thread(api, "POST", "/api/v1/backends", added))[0] == 201
        before = await in_thread(proxy.state)
        _, new = await _upgrade(proxy)
        after = await in_thread(proxy.state)
        assert after["pid"] == new
        assert _runtime_view(after) == _runtime_view(before)
        assert _runtime_view(after)["blue"][0] == 70
        assert ("green-2", "enabled", "up") in _runtime_view(after)["green"][1]
    finally:
        await in_thread(proxy.stop)


@pytest.mark.parametrize("saved", [False, True], ids=["handed-over", "state-file"])
async def test_a_pin_issued_before_the_upgrade_routes_the_same_after(
    backends: list[Backend], tmp_path: Path, saved: bool
) -> None:
    pools = {"blue": {"weight": 100, "backends": [{"address": b.address} for b in backends]}}
    state_path = tmp_path / "state.json" if saved else None
    config = upgrade_config(pools, state_path, sticky={"mode": "backend"})
    proxy = await _start(config, tmp_path)
    try:
        pins: dict[str, str] = {}
        async with aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar()) as session:
            while set(pins.values()) != {"blue-a", "blue-b"}:
                async with session.get(proxy.url + "/") as response:
                    cookie = response.cookies["zd_affinity"].value
                    pins[cookie] = (await response.text()).strip()
            await _upgrade(proxy)
            for cookie, backend in pins.items():
                for _ in range(3):
                    headers = {"Cookie": f"zd_affinity={cookie}"}
                    async with session.get(proxy.url + "/", headers=headers) as response:
                        assert (await response.text()).strip() == backend
                        # a valid pin is kept, not re-issued
                        assert "zd_affinity" not in response.cookies
    finally:
        await in_thread(proxy.stop)


async def test_a_configured_sticky_secret_file_signs_the_same_across_processes(
    backends: list[Backend], tmp_path: Path
) -> None:
    """Two separate runs (a restart without state, not an upgrade) with one
    secret_file: a pin from the first routes the same in the second."""
    secret = tmp_path / "sticky.key"
    secret.write_text("a shared secret\n")
    pools = {"blue": {"weight": 100, "backends": [{"address": b.address} for b in backends]}}
    sticky = {"mode": "backend", "secret_file": str(secret)}
    config = upgrade_config(pools, None, sticky=sticky)
    pins: dict[str, str] = {}
    proxy = await _start(config, tmp_path)
    try:
        async with aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar()) as session:
            while len(set(pins.values())) < 2:
                async with session.get(proxy.url + "/") as response:
                    pins[response.cookies["zd_affinity"].value] = (await response.text()).strip()
    finally:
        await in_thread(proxy.stop)
    second = tmp_path / "second"
    second.mkdir()
    proxy = await _start(config, second)
    try:
        async with aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar()) as session:
            for cookie, backend in pins.items():
                headers = {"Cookie": f"zd_affinity={cookie}"}
                async with session.get(proxy.url + "/", headers=headers) as response:
                    assert (await response.text()).strip() == backend
                    assert "zd_affinity" not in response.cookies
    finally:
        await in_thread(proxy.stop)


async def test_an_unreadable_sticky_secret_file_is_one_error_and_exit_1(
    backends: list[Backend], tmp_path: Path
) -> None:
    import subprocess
    import sys

    pools = {"blue": {"weight": 100, "backends": [{"address": backends[0].address}]}}
    missing = tmp_path / "nope.key"
    config = upgrade_config(pools, None, sticky={"mode": "pool", "secret_file": str(missing)})
    proxy = UpgradingProxy(config, tmp_path)
    done = await in_thread(
        lambda: subprocess.run(
            [sys.executable, "-m", "zdproxy.cli", "run", "-c", str(proxy.path)],
            capture_output=True,
            timeout=60,
            env=proxy.env,
        )
    )
    assert done.returncode == 1
    assert f"sticky.secret_file: cannot read {missing}: No such file or directory" in (
        done.stderr.decode()
    )


# ---- systemd and PID 1 --------------------------------------------------------------


async def test_sd_notify_tells_ready_and_the_new_main_pid(
    backends: list[Backend], tmp_path: Path
) -> None:
    notify_path = tmp_path / "notify.sock"
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(notify_path))
    notify.settimeout(30)
    config = upgrade_config(_pools(backends), None)
    proxy = await _start(config, tmp_path, env={"NOTIFY_SOCKET": str(notify_path)})
    try:
        first = (await in_thread(notify.recv, 4096)).decode()
        assert first.splitlines()[:2] == ["READY=1", f"MAINPID={proxy.first_pid}"]
        _, new = await _upgrade(proxy)
        second = (await in_thread(notify.recv, 4096)).decode()
        assert second.splitlines()[:2] == ["READY=1", f"MAINPID={new}"]
    finally:
        notify.close()
        await in_thread(proxy.stop)


async def test_as_pid_1_the_old_process_stays_as_a_supervisor(
    backends: list[Backend], tmp_path: Path
) -> None:
    """ZDPROXY_SUPERVISOR=1 makes the first process behave as PID 1 does."""
    config = upgrade_config(_pools(backends), None)
    proxy = await _start(config, tmp_path, env={"ZDPROXY_SUPERVISOR": "1"})
    supervisor = proxy.first_pid
    try:
        async with KeepAliveLoad(proxy.url, clients=8) as load:
            await load.wait_requests(100)
            _, second = await _upgrade(proxy)
            await async_wait_for(
                lambda: f"supervising pid {second}" in proxy.log(), 30, "the supervisor"
            )
            # SIGUSR2 to the supervisor (what `docker kill -s USR2` does) is forwarded
            os.kill(supervisor, signal.SIGUSR2)
            third = await in_thread(proxy.wait_serving, lambda pid: pid not in (supervisor, second))
            await in_thread(proxy.wait_exited, second)
            await load.wait_requests(100)
        assert load.figures.errors == [] and load.figures.non_2xx == 0
        assert await in_thread(proxy.processes) == sorted([supervisor, third])
        # SIGTERM to the supervisor ends the serving process, and then the supervisor
        # with its status
        os.kill(supervisor, signal.SIGTERM)
        assert proxy.proc is not None
        assert await in_thread(proxy.proc.wait, 60) == 0
        await in_thread(proxy.wait_exited, third)
        assert f"supervisor: pid {third} serves now" in proxy.log()
    finally:
        await in_thread(proxy.stop)


# ---- health verdicts and ejections ------------------------------------------------


def _backend(state: dict[str, Any], backend_id: str) -> dict[str, Any]:
    for pool in state["pools"].values():
        for backend in pool["backends"]:
            if backend["id"] == backend_id:
                return dict(backend)
    raise AssertionError(f"no backend {backend_id}")


async def test_a_backend_found_down_stays_down_until_it_rises(
    backends: list[Backend], tmp_path: Path
) -> None:
    """The old process found blue-2 down; it answers again just before the
    upgrade. A fresh start would take it up after one passing check (its quick
    rise); the new process goes on from the verdict and wants ``rise`` (5)."""
    pools = {"blue": {"weight": 100, "backends": [{"address": b.address} for b in backends]}}
    health = {"enabled": True, "interval": "1s", "rise": 5, "fall": 1}
    proxy = await _start(upgrade_config(pools, None, health_check=health), tmp_path)
    try:
        backends[1].health_status = 500
        await async_wait_for(
            lambda: _backend(proxy.state(), "blue-2")["health"] == "down", what="blue-2 down"
        )
        backends[1].health_status = 200
        _, new = await _upgrade(proxy)
        after = _backend(await in_thread(proxy.state), "blue-2")
        assert after["health"] == "down"
        assert after["health_checks"]["checks_total"] >= 1
        assert _backend(await in_thread(proxy.state), "blue-1")["health"] == "up"
        # and it does rise, on the new process's own checks
        await async_wait_for(
            lambda: _backend(proxy.state(), "blue-2")["health"] == "up", 30, "blue-2 up"
        )
        assert await in_thread(proxy.serving_pid) == new
    finally:
        await in_thread(proxy.stop)


async def test_an_ejection_continues_in_the_new_process(
    backends: list[Backend], tmp_path: Path
) -> None:
    pools = {"blue": {"weight": 100, "backends": [{"address": b.address} for b in backends]}}
    outlier = {"consecutive_5xx": 3, "base_ejection_time": "5m", "max_ejection_percent": 50}
    proxy = await _start(upgrade_config(pools, None, outlier_detection=outlier), tmp_path)
    try:
        async with aiohttp.ClientSession() as session:

            async def ejected() -> bool:
                async with session.get(proxy.url + "/status/500") as response:
                    await response.read()
                state = await in_thread(proxy.state)
                return any(b["ejected"] for b in state["pools"]["blue"]["backends"])

            await async_wait_for(ejected, what="an ejection")
        before = await in_thread(proxy.state)
        [out] = [b["id"] for b in before["pools"]["blue"]["backends"] if b["ejected"]]
        until = _backend(before, out)["health_checks"]["ejected_until"]
        _, new = await _upgrade(proxy)
        after = await in_thread(proxy.state)
        assert after["pid"] == new
        assert [b["id"] for b in after["pools"]["blue"]["backends"] if b["ejected"]] == [out]
        checks = _backend(after, out)["health_checks"]
        assert checks["ejections_total"] == 1
        # the same end (to the clocks' rounding), not a fresh five minutes, nor one
        # lengthened by the hand-over's duration
        assert abs(checks["ejected_until"] - until) < 0.01
        # and traffic avoids it: every answer comes from the other backend
        other = {"blue-1": "blue-a", "blue-2": "blue-b"}["blue-2" if out == "blue-1" else "blue-1"]
        async with aiohttp.ClientSession() as session:
            for _ in range(10):
                async with session.get(proxy.url + "/") as response:
                    assert (await response.text()).strip() == other
    finally:
        await in_thread(proxy.stop)


# ---- the admin API and zdproxy ctl ------------------------------------------------------


async def test_ctl_upgrade_answers_once_the_new_process_serves(
    backends: list[Backend], tmp_path: Path
) -> None:
    import subprocess
    import sys

    config = upgrade_config(_pools(backends), None)
    proxy = await _start(config, tmp_path)
    env = {**proxy.env, "ZDPROXY_ADMIN_URL": proxy.admin_url}
    argv = [sys.executable, "-m", "zdproxy.cli", "ctl"]
    try:
        done = await in_thread(
            lambda: subprocess.run([*argv, "upgrade"], capture_output=True, env=env, timeout=120)
        )
        assert done.returncode == 0, done.stderr
        new = await in_thread(proxy.serving_pid)
        assert done.stdout.decode() == (
            f"upgraded: pid {new} serves, pid {proxy.first_pid} drains\n"
        )
        await in_thread(proxy.wait_exited, proxy.first_pid)
        # an invalid file: 500 with the check lines, exit 1, the process serves on
        proxy.path.write_text(proxy.path.read_text() + "bogus_key: 1\n")
        status, body = await in_thread(proxy.api, "POST", "/api/v1/upgrade", {})
        assert status == 500
        assert body["error"].startswith("the new process (pid ")
        assert any(re.search(r"zdproxy\.yaml:\d+: bogus_key: ", p) for p in body["problems"])
        done = await in_thread(
            lambda: subprocess.run([*argv, "upgrade"], capture_output=True, env=env, timeout=120)
        )
        assert done.returncode == 1 and b"did not start" in done.stderr
        assert await in_thread(proxy.serving_pid) == new
        assert await in_thread(proxy.processes) == [new]
    finally:
        await in_thread(proxy.stop)


async def test_a_new_process_that_exits_before_ready_leaves_the_old_one_serving(
    backends: list[Backend], tmp_path: Path
) -> None:
    """The sticky secret file is gone at upgrade time: the new process logs it and
    exits 1 without a word on the channel; the old one says so and serves on."""
    secret = tmp_path / "sticky.key"
    secret.write_text("secret\n")
    pools = {"blue": {"weight": 100, "backends": [{"address": b.address} for b in backends]}}
    sticky = {"mode": "backend", "secret_file": str(secret)}
    proxy = await _start(upgrade_config(pools, None, sticky=sticky), tmp_path)
    try:
        secret.unlink()
        status, body = await in_thread(proxy.api, "POST", "/api/v1/upgrade", {})
        assert status == 500
        assert re.fullmatch(
            r"the new process \(pid \d+\) exited with status 1 before it was ready "
            r"\(see its log lines above\)",
            body["error"],
        ), body
        assert "sticky.secret_file: cannot read" in proxy.log()
        assert await in_thread(proxy.processes) == [proxy.first_pid]
        async with aiohttp.ClientSession() as session, session.get(proxy.url + "/") as response:
            assert response.status == 200
    finally:
        await in_thread(proxy.stop)


async def test_a_new_process_not_ready_in_time_is_ended_and_the_old_one_serves(
    backends: list[Backend], tmp_path: Path
) -> None:
    """ZDPROXY_UPGRADE_TIMEOUT=0.2: no Python process starts that fast."""
    config = upgrade_config(_pools(backends), None)
    proxy = await _start(config, tmp_path, env={"ZDPROXY_UPGRADE_TIMEOUT": "0.2"})
    try:
        status, body = await in_thread(proxy.api, "POST", "/api/v1/upgrade", {})
        assert status == 500
        assert re.fullmatch(
            r"the new process \(pid (\d+)\) was not ready within 0\.2s", body["error"]
        ), body
        assert await in_thread(proxy.processes) == [proxy.first_pid]
        assert await in_thread(proxy.serving_pid) == proxy.first_pid
    finally:
        await in_thread(proxy.stop)


async def test_the_generated_sticky_key_survives_a_restart_and_a_configured_one_is_not_saved(
    backends: list[Backend], tmp_path: Path
) -> None:
    import json

    pools = {"blue": {"weight": 100, "backends": [{"address": b.address} for b in backends]}}
    state_path = tmp_path / "state.json"
    config = upgrade_config(pools, state_path, sticky={"mode": "backend"})
    pins: dict[str, str] = {}
    proxy = await _start(config, tmp_path)
    try:
        async with aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar()) as session:
            while len(set(pins.values())) < 2:
                async with session.get(proxy.url + "/") as response:
                    pins[response.cookies["zd_affinity"].value] = (await response.text()).strip()
    finally:
        await in_thread(proxy.stop)
    assert len(json.loads(state_path.read_text())["sticky"]["key"]) == 64
    second = tmp_path / "second"
    second.mkdir()
    proxy = await _start(config, second)
    try:
        async with aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar()) as session:
            for cookie, backend in pins.items():
                headers = {"Cookie": f"zd_affinity={cookie}"}
                async with session.get(proxy.url + "/", headers=headers) as response:
                    assert (await response.text()).strip() == backend
                    assert "zd_affinity" not in response.cookies
    finally:
        await in_thread(proxy.stop)
    # a key from the environment is never written to the state file
    third = tmp_path / "third"
    third.mkdir()
    state_path.unlink()
    sticky = {"mode": "backend", "secret_env": "UPGRADE_TEST_STICKY"}
    config = upgrade_config(pools, state_path, sticky=sticky)
    proxy = await _start(config, third, env={"UPGRADE_TEST_STICKY": "from the environment"})
    try:
        status, _ = await in_thread(proxy.api, "POST", "/api/v1/backends/blue-2/drain")
        assert status == 200
    finally:
        await in_thread(proxy.stop)
    saved = json.loads(state_path.read_text())
    # (saved: the drain was written, and with it the null sticky section)
    assert saved["admin"]["blue-2"] in ("draining", "drained")
    assert saved["sticky"] is None


@pytest.mark.parametrize("saved", [False, True], ids=["handed-over", "state-file"])
async def test_a_rollout_in_progress_goes_on_in_the_new_process(
    backends: list[Backend], tmp_path: Path, saved: bool
) -> None:
    state_path = tmp_path / "state.json" if saved else None
    proxy = await _start(upgrade_config(_pools(backends), state_path), tmp_path)
    try:
        body = {
            "to": "green",
            "steps": [{"weight": 20, "pause": "10m"}, {"weight": 100}],
            "analysis": {"interval": "300ms", "min_requests": 1000000},
        }
        status, started = await in_thread(proxy.api, "POST", "/api/v1/rollouts", body)
        assert status in (200, 201), started
        _, before = await in_thread(proxy.api, "GET", "/api/v1/rollouts/current")
        _, new = await _upgrade(proxy)
        _, after = await in_thread(proxy.api, "GET", "/api/v1/rollouts/current")
        keys = ("id", "to", "phase", "step", "step_weight")
        assert {k: after["rollout"][k] for k in keys} == {k: before["rollout"][k] for k in keys}
        assert after["rollout"]["step_weight"] == 20
        state = await in_thread(proxy.state)
        assert state["pid"] == new and state["pools"]["green"]["weight"] == 20
        # and it is driven by the new process: abort goes back to blue
        status, _ = await in_thread(proxy.api, "POST", "/api/v1/rollouts/current/abort", {})
        assert status == 200
        state = await in_thread(proxy.state)
        assert state["pools"]["blue"]["weight"] == 100
    finally:
        await in_thread(proxy.stop)
