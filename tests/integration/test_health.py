"""Active health checks through a real zdproxy process and real backend processes."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from support_health import BackendProc, Client, Load, ProxyProc, figure, running, wait_until

INTERVAL = 0.25
RISE = 2
FALL = 3
#: jitter of 10 %, one interval for the check in flight, and the 100 ms tick of
#: the test's own polling: generous bounds derived from the config
SLACK = 1.0


async def test_sigkill_one_of_three_under_keepalive_load(tmp_path: Path) -> None:
    async with running(tmp_path, {"blue": 3}) as (proxy, backends):
        load = Load(proxy.port, clients=30).start()
        await wait_until(lambda: load.result.requests >= 300, 10, "the load running")
        victim = backends["blue-2"]
        killed_at = time.monotonic()
        victim.kill()
        await proxy.wait_state("blue-2", True, 10, key="ejected")
        to_ejected = time.monotonic() - killed_at
        await proxy.wait_state("blue-2", "down", 10)
        down_at = time.monotonic()
        to_down = down_at - killed_at
        await wait_until(
            lambda: sum(load.served_since(down_at + 0.05).values()) >= 300, 10, "load after down"
        )
        after_down = load.served_since(down_at + 0.05)
        # it comes back: started again on the same port, it rises and takes traffic
        restarted_at = time.monotonic()
        await victim.start()
        to_up = await proxy.wait_state("blue-2", "up", 15)
        await wait_until(
            lambda: load.served_since(restarted_at + to_up)["blue-2"] > 0, 10, "traffic to blue-2"
        )
        result = await load.stop()
        info = (await proxy.backend("blue-2"))["health_checks"]
    figure(
        "sigkill 1 of 3, 30 keep-alive clients",
        requests=result.requests,
        failures=result.failures,
        errors=dict(result.errors),
        death_to_ejection_s=round(to_ejected, 3),
        death_to_down_s=round(to_down, 3),
        restart_to_up_s=round(to_up, 3),
    )
    assert result.failures == 0, result.errors
    assert result.requests > 1000
    assert after_down["blue-2"] == 0
    assert to_down <= FALL * INTERVAL * 1.1 + INTERVAL + SLACK
    assert info["consecutive_passes"] >= RISE and info["checks_total"] > 0


async def test_failing_health_check_takes_backend_out_and_back(tmp_path: Path) -> None:
    async with running(tmp_path, {"blue": 2}) as (proxy, backends):
        client = Client(proxy.port)
        b1 = backends["blue-1"]
        await b1.ctl(health=503)
        out = await proxy.wait_state("blue-1", "down", 10)
        info = (await proxy.backend("blue-1"))["health_checks"]
        served = [(await client.request()).backend for _ in range(20)]
        await b1.ctl(health=200)
        back = await proxy.wait_state("blue-1", "up", 10)
        served_after = [(await client.request()).backend for _ in range(20)]
        client.close()
    figure("health check 503", out_s=round(out, 3), back_s=round(back, 3))
    assert out <= FALL * INTERVAL * 1.1 + INTERVAL + SLACK
    assert back <= RISE * INTERVAL * 1.1 + INTERVAL + SLACK
    assert info["last_status"] == 503 and info["last_error"] == "status 503"
    assert info["consecutive_failures"] >= FALL
    assert set(served) == {"blue-2"}
    assert set(served_after) == {"blue-1", "blue-2"}


async def test_checks_reuse_one_connection(tmp_path: Path) -> None:
    async with running(tmp_path, {"blue": 1}) as (_proxy, backends):
        b1 = backends["blue-1"]
        await wait_until(lambda: _at_least(b1, "health", 10), 20, "ten health checks on blue-1")
        counts = await b1.counts()
    assert counts["health_connections"] == 1, counts


async def _at_least(backend: BackendProc, key: str, n: int) -> bool:
    return (await backend.counts())[key] >= n


async def test_hung_health_endpoint_never_piles_up_checks(tmp_path: Path) -> None:
    timeout = 0.5
    async with running(
        tmp_path,
        {"blue": 2},
        health_check={"interval": "200ms", "timeout": f"{timeout}s", "rise": 2, "fall": 2},
    ) as (proxy, backends):
        b1 = backends["blue-1"]
        await b1.ctl(health_delay=30)
        before = (await b1.counts())["health"]
        started = time.monotonic()
        await proxy.wait_state("blue-1", "down", 10)
        await asyncio.sleep(3.0)
        checks = (await b1.counts())["health"] - before
        elapsed = time.monotonic() - started
        info = (await proxy.backend("blue-1"))["health_checks"]
    # one check at a time: at most one per (interval + timeout), never one per interval
    assert checks <= elapsed / (0.2 * 0.9 + timeout) + 2, (checks, elapsed)
    assert info["last_error"].startswith("timeout")


async def test_frozen_backend_is_taken_out_and_new_requests_avoid_it(tmp_path: Path) -> None:
    async with running(
        tmp_path,
        {"blue": 2},
        health_check={"interval": "200ms", "timeout": "300ms", "rise": 2, "fall": 2},
    ) as (proxy, backends):
        b1 = backends["blue-1"]
        b1.freeze()
        try:
            took = await proxy.wait_state("blue-1", "down", 10)
            client = Client(proxy.port, timeout=5)
            served = [(await client.request()).backend for _ in range(20)]
            client.close()
        finally:
            b1.thaw()
        await proxy.wait_state("blue-1", "up", 10)
    figure("frozen backend (SIGSTOP)", out_s=round(took, 3))
    assert set(served) == {"blue-2"}


async def test_added_backend_starts_after_rise_and_removed_one_stops(tmp_path: Path) -> None:
    async with running(tmp_path, {"blue": 1}) as (proxy, _backends):
        extra = await BackendProc("blue-9").start()
        try:
            status, body = await proxy.api(
                "POST",
                "/api/v1/backends",
                {"pool": "blue", "address": extra.address, "id": "blue-9"},
            )
            assert status in (200, 201), body
            assert (await proxy.backend("blue-9"))["state"] == "starting"
            await proxy.wait_state("blue-9", "up", 10)
            client = Client(proxy.port)
            served = {(await client.request()).backend for _ in range(10)}
            assert served == {"blue-1", "blue-9"}
            status, body = await proxy.api("DELETE", "/api/v1/backends/blue-9")
            assert status in (200, 202), body
            await wait_until(_gone(proxy, "blue-9"), 10, "blue-9 removed")
            before = (await extra.counts())["health"]
            await asyncio.sleep(4 * INTERVAL)
            assert (await extra.counts())["health"] - before <= 1
            client.close()
        finally:
            extra.stop()


def _gone(proxy: ProxyProc, backend_id: str) -> Callable[[], Awaitable[bool]]:
    async def check() -> bool:
        return backend_id not in await proxy.backends()

    return check


async def test_disable_enable_rises_again(tmp_path: Path) -> None:
    async with running(tmp_path, {"blue": 2}) as (proxy, _backends):
        status, _ = await proxy.api("POST", "/api/v1/backends/blue-1/disable")
        assert status == 200
        assert (await proxy.backend("blue-1"))["state"] == "disabled"
        status, _ = await proxy.api("POST", "/api/v1/backends/blue-1/enable")
        assert status == 200
        state = (await proxy.backend("blue-1"))["state"]
        assert state == "starting"
        took = await proxy.wait_state("blue-1", "up", 10)
    assert took <= RISE * INTERVAL * 1.1 + INTERVAL + SLACK


async def test_restarted_proxy_serves_at_once_new_backends_need_rise(tmp_path: Path) -> None:
    """Backends of the config were serving before a restart: one passing check
    brings them up, so a restarted proxy does not answer 503 for rise x interval.
    A backend added at runtime needs its full rise."""
    slow_checks = {"interval": "2s", "timeout": "500ms", "rise": 3, "fall": 3}
    async with running(tmp_path, {"blue": 2}, wait_up=False, health_check=slow_checks) as (
        proxy,
        _,
    ):
        client = Client(proxy.port)
        first = [await client.request() for _ in range(10)]
        extra = await BackendProc("blue-9").start()
        try:
            status, _ = await proxy.api(
                "POST", "/api/v1/backends", {"pool": "blue", "address": extra.address}
            )
            assert status in (200, 201)
            seen: list[dict[str, Any]] = []

            async def passed_once() -> bool:
                backends = (await proxy.backends()).values()
                seen.append(next(b for b in backends if b["address"] == extra.address))
                return bool(seen[-1]["health_checks"]["consecutive_passes"] >= 1)

            await wait_until(passed_once, 10, "the added backend's first passing check")
            # one pass of three: still starting (rise), unlike the config's backends
            assert seen[-1]["state"] == "starting", seen[-1]
        finally:
            extra.stop()
        client.close()
    assert [r.status for r in first] == [200] * 10


async def test_backend_frozen_under_load_costs_no_request(tmp_path: Path) -> None:
    """SIGSTOP: the backend accepts connections and never answers. Requests in
    flight on it time out and go to another backend; checks take it out."""
    async with running(
        tmp_path,
        {"blue": 3},
        health_check={"interval": "250ms", "timeout": "300ms", "rise": 2, "fall": 2},
        timeouts={"upstream_response": "1s"},
    ) as (proxy, backends):
        load = Load(proxy.port, clients=30).start()
        await wait_until(lambda: load.result.requests >= 300, 10, "the load running")
        victim = backends["blue-3"]
        frozen_at = time.monotonic()
        victim.freeze()
        try:
            await proxy.wait_state("blue-3", "down", 10)
            to_down = time.monotonic() - frozen_at
            await asyncio.sleep(1.0)
        finally:
            victim.thaw()
        thawed_at = time.monotonic()
        to_up = await proxy.wait_state("blue-3", "up", 10)
        await wait_until(
            lambda: load.served_since(thawed_at + to_up)["blue-3"] > 0, 10, "traffic to blue-3"
        )
        result = await load.stop()
    figure(
        "SIGSTOP 1 of 3, 30 keep-alive clients, upstream timeout 1s",
        requests=result.requests,
        failures=result.failures,
        errors=dict(result.errors),
        freeze_to_down_s=round(to_down, 3),
    )
    assert result.failures == 0, result.errors


async def test_slow_start_ramps_a_recovered_backend(tmp_path: Path) -> None:
    window = 3.0
    async with running(
        tmp_path,
        {"blue": 2},
        health_check={"interval": "250ms", "timeout": "250ms", "rise": 2, "fall": 2},
        slow_start={"window": f"{window}s"},
    ) as (proxy, backends):
        load = Load(proxy.port, clients=10).start()
        await backends["blue-1"].ctl(health=503)
        await proxy.wait_state("blue-1", "down", 10)
        await backends["blue-1"].ctl(health=200)
        await proxy.wait_state("blue-1", "up", 10)
        up_at = time.monotonic()
        during = await proxy.backend("blue-1")
        await asyncio.sleep(window + 1.0)
        after = await proxy.backend("blue-1")
        result = await load.stop()

    def share(start: float, end: float) -> float:
        served = [b for t, b in result.timeline if up_at + start <= t < up_at + end]
        return served.count("blue-1") / max(1, len(served))

    early, late, steady = share(0.0, 0.75), share(window - 0.75, window), share(window + 0.2, 99)
    figure(
        "slow start over 3s",
        share_first_750ms=round(early, 3),
        share_last_750ms=round(late, 3),
        share_after=round(steady, 3),
    )
    assert result.failures == 0
    assert during["health_checks"]["slow_start_percent"] is not None
    assert during["effective_weight"] > during["weight"]  # scaled while ramping
    assert after["effective_weight"] == after["weight"]
    assert after["health_checks"]["slow_start_percent"] is None
    assert early < 0.3 < late
    assert 0.4 < steady < 0.6


async def test_reconfigure_applies_settings_and_keeps_pins() -> None:
    """In process: what a config reload calls (``service.health.reconfigure`` and
    ``service.sticky_key.reconfigure``) applies new settings, and pins signed with
    the process's random key stay valid."""
    from support_health import free_port

    from zdproxy.balancing.selector import RouteHints
    from zdproxy.config.schema import Config
    from zdproxy.health.checker import HealthService
    from zdproxy.server import ProxyServer, wire

    def config(**sections: object) -> Config:
        return Config.model_validate(
            {
                "listen": f"127.0.0.1:{free_port()}",
                "admin": {"enabled": False},
                "state": {"path": None},
                "pools": {"blue": {"weight": 100, "backends": [{"address": "127.0.0.1:9"}]}},
                "health_check": {"enabled": False},
                **sections,
            }
        )

    Hints = RouteHints

    server = ProxyServer(config(sticky={"mode": "pool"}))
    wire(server)
    await server.start()
    try:
        service = server.health
        assert isinstance(service, HealthService)
        sticky_key = server.services["default"].sticky_key
        assert sticky_key is not None and sticky_key.source == "generated"
        hints = Hints()
        server.selector.select(hints)
        assert hints.set_cookie is not None
        pin = hints.set_cookie.split(b";")[0].partition(b"=")[2].decode()
        new = config(sticky={"mode": "pool"}, slow_start={"window": "5s"})
        service.reconfigure(new)
        sticky_key.reconfigure(new)
        again = Hints()
        again.affinity = pin
        server.selector.select(again)
        assert again.set_cookie is None  # the pin still verifies
        assert service.slow_start.window == 5.0
    finally:
        await server.shutdown()
