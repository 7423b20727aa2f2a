"""Several services behind one listener, routed by host and path (real processes).

Two services with their own blue/green pools: a flip of one under load moves only
its traffic, with 0 failed requests on both; unknown hosts get 404 with the cause;
strip_prefix forwards the exact target; per-service API, ctl, events, metrics and
saved state.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from support import Backend, araw_request, async_wait_for
from support_control import AdminClient, AdminProxy, actl, admin_config
from support_reload import rewrite

CLIENTS_PER_SERVICE = 8
SETTLED = 300


@dataclass
class Load:
    #: (sent at, backend that answered), in completion order
    done: list[tuple[float, str]] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    stop: bool = False

    def since(self, moment: float) -> list[str]:
        return [backend for sent, backend in self.done if sent > moment]


async def client(url: str, host: str, load: Load) -> None:
    loop = asyncio.get_running_loop()
    connector = aiohttp.TCPConnector(limit=1)
    async with aiohttp.ClientSession(connector=connector) as session:
        while not load.stop:
            sent = loop.time()
            try:
                async with session.get(url, headers={"Host": host}) as response:
                    await response.read()
                    if response.status != 200:
                        load.failures.append(f"status {response.status}")
                        continue
                    load.done.append((sent, response.headers["X-Backend"]))
            except (aiohttp.ClientError, KeyError) as exc:
                load.failures.append(repr(exc))


def service(backends: list[Backend], name: str, live: str = "blue") -> dict[str, Any]:
    return {
        "pools": {
            pool: {
                "weight": 100 if pool == live else 0,
                "backends": [
                    {"address": b.address} for b in backends if b.name.startswith(f"{name}-{pool}")
                ],
            }
            for pool in ("blue", "green")
        }
    }


def services_config(backends: list[Backend], state: Path | None, **extra: Any) -> dict[str, Any]:
    config = admin_config({}, state, **extra)
    del config["pools"]
    config["services"] = {"shop": service(backends, "shop"), "api": service(backends, "api")}
    config.setdefault(
        "routes",
        [
            {"match": {"host": "shop.test"}, "service": "shop"},
            {"match": {"host": "*.api.test"}, "service": "api"},
            {
                "match": {"host": "www.test", "path_prefix": "/api/"},
                "service": "api",
                "strip_prefix": True,
            },
        ],
    )
    return config


@pytest.fixture
async def backends() -> AsyncIterator[list[Backend]]:
    started = [
        await Backend(f"{svc}-{pool}-1", pool).start()
        for svc in ("shop", "api")
        for pool in ("blue", "green")
    ]
    for backend in started:
        backend.delay = 0.002  # requests in flight when the flip lands
    yield started
    for backend in started:
        await backend.stop()


async def test_flip_of_one_service_under_load_moves_only_its_traffic(
    backends: list[Backend], tmp_path: Path
) -> None:
    process = AdminProxy(services_config(backends, tmp_path / "state.json"), tmp_path).start()
    loop = asyncio.get_running_loop()
    shop, api = Load(), Load()
    tasks = [
        loop.create_task(client(process.url + "/", host, load))
        for host, load in (("shop.test", shop), ("v2.eu.api.test:8080", api))
        for _ in range(CLIENTS_PER_SERVICE)
    ]
    try:
        async with AdminClient(process.admin_url) as admin:
            await async_wait_for(lambda: len(shop.done) > 200 and len(api.done) > 200)
            for target in ("green", "blue", "green"):
                answer = await admin.ok(
                    "POST", "/api/v1/services/shop/flip", {"to": target, "force": True}
                )
                assert answer["weights"] == {
                    "blue": 100 if target == "blue" else 0,
                    "green": 100 if target == "green" else 0,
                }
                flipped_at = loop.time()
                await async_wait_for(lambda at=flipped_at: len(shop.since(at)) >= SETTLED)
                assert set(shop.since(flipped_at)) == {f"shop-{target}-1"}
            await async_wait_for(lambda: len(api.since(flipped_at)) >= SETTLED)
            api_state = await admin.ok("GET", "/api/v1/services/api/state")
            shop_events = (await admin.ok("GET", "/api/v1/services/shop/events"))["events"]
            api_events = (await admin.ok("GET", "/api/v1/services/api/events"))["events"]
    finally:
        shop.stop = api.stop = True
        await asyncio.gather(*tasks)
        process.stop()
    assert shop.failures == [] and api.failures == []
    # the api service never moved: every answer from its blue pool
    assert {backend for _, backend in api.done} == {"api-blue-1"}
    assert api_state["service"] == "api"
    assert {n: p["weight"] for n, p in api_state["pools"].items()} == {"blue": 100, "green": 0}
    assert [(e["action"], e["service"], e["after"]) for e in shop_events] == [
        ("flip", "shop", {"blue": 0, "green": 100}),
        ("flip", "shop", {"blue": 100, "green": 0}),
        ("flip", "shop", {"blue": 0, "green": 100}),
    ]
    assert api_events == []
    # saved state: a file per service beside state.path; a restart restores each
    saved = json.loads((tmp_path / "state.shop.json").read_text())
    assert saved["weights"] == {"blue": 0, "green": 100}
    assert not (tmp_path / "state.json").exists()  # no service named default
    restarted = AdminProxy(process.config, tmp_path).start()
    try:
        async with AdminClient(restarted.admin_url) as admin:
            listed = await admin.ok("GET", "/api/v1/services")
            shop_events = (await admin.ok("GET", "/api/v1/services/shop/events"))["events"]
    finally:
        restarted.stop()
    assert [(s["name"], s["weights"]) for s in listed["services"]] == [
        ("shop", {"blue": 0, "green": 100}),
        ("api", {"blue": 100, "green": 0}),
    ]
    assert [e["action"] for e in shop_events] == ["flip", "flip", "flip"]


async def test_unknown_host_no_route_and_strip_prefix(
    backends: list[Backend], tmp_path: Path
) -> None:
    received: list[bytes] = []

    async def raw_backend(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        received.append(head)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(raw_backend, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    config = services_config(backends, None)
    config["services"]["api"]["pools"]["blue"]["backends"] = [{"address": f"127.0.0.1:{port}"}]
    process = AdminProxy(config, tmp_path).start()
    try:
        answer = await araw_request(
            process.port, b"GET /x HTTP/1.1\r\nHost: nope.test\r\nX-Request-Id: r1\r\n\r\n"
        )
        body = b"404 Not Found: no route for this request\n"
        assert answer == (
            b"HTTP/1.1 404 Not Found\r\nContent-Type: text/plain; charset=utf-8\r\n"
            b"Content-Length: %d\r\nX-Zdproxy-Error: no-route\r\nX-Request-Id: r1\r\n"
            b"Connection: close\r\n\r\n" % len(body) + body
        )
        # the api's prefix on www.test only; another path on that host has no route
        answer = await araw_request(
            process.port,
            b"GET /shop/ HTTP/1.1\r\nHost: www.test\r\nConnection: close\r\n\r\n",
        )
        assert answer.startswith(b"HTTP/1.1 404 Not Found\r\n"), answer
        for target, forwarded in (
            (b"/api/users?x=1&y=/api/", b"/users?x=1&y=/api/"),
            (b"/api/", b"/"),
            (b"/api/?q", b"/?q"),
        ):
            answer = await araw_request(
                process.port,
                b"GET %s HTTP/1.1\r\nHost: WWW.test:80\r\nConnection: close\r\n\r\n" % target,
            )
            assert answer.endswith(b"\r\n\r\nok"), answer
            assert received[-1].startswith(b"GET %s HTTP/1.1\r\nHost: WWW.test:80\r\n" % forwarded)
    finally:
        process.stop()
        server.close()
        await server.wait_closed()
    assert len(received) == 3


async def test_per_service_api_ctl_and_metrics(backends: list[Backend], tmp_path: Path) -> None:
    process = AdminProxy(services_config(backends, None), tmp_path).start()
    try:
        async with AdminClient(process.admin_url) as admin:
            listed = await admin.ok("GET", "/api/v1/services")
            assert listed["default"] is None
            assert [(s["name"], s["weights"]) for s in listed["services"]] == [
                ("shop", {"blue": 100, "green": 0}),
                ("api", {"blue": 100, "green": 0}),
            ]
            # no service named default: the un-prefixed paths say what to use instead
            for method, path in (("GET", "/api/v1/state"), ("PUT", "/api/v1/split")):
                answer = await admin.call(method, path, {"blue": 0, "green": 100})
                assert answer.status == 400, answer
                assert "several services and none named default" in answer.error
                assert f"/api/v1/services/SERVICE{path[7:]}" in answer.error
            answer = await admin.call("GET", "/api/v1/services/nope/state")
            assert answer.status == 404
            assert answer.error == "no service named 'nope' (services: shop, api)"
            # backend ids are the service's; another service's id is unknown here
            state = await admin.ok("GET", "/api/v1/services/shop/state")
            ids = sorted(b["id"] for p in state["pools"].values() for b in p["backends"])
            assert ids == ["shop-blue-1", "shop-green-1"]
            answer = await admin.call("POST", "/api/v1/services/shop/backends/api-blue-1/drain")
            assert answer.status == 404, answer
            # an id another service uses is refused
            answer = await admin.call(
                "POST",
                "/api/v1/services/shop/backends",
                {"pool": "green", "address": "127.0.0.1:1", "id": "api-green-1"},
            )
            assert answer.status == 409, answer

        result = await actl(process.admin_url, "--service", "api", "split", "blue=60", "green=40")
        assert result.returncode == 0, result.stderr
        result = await actl(process.admin_url, "status")
        assert result.returncode == 1
        assert "400: several services and none named default" in result.stderr
        result = await actl(process.admin_url, "--service", "api", "--json", "status")
        assert result.returncode == 0, result.stderr
        status = json.loads(result.stdout)
        assert {n: p["weight"] for n, p in status["pools"].items()} == {"blue": 60, "green": 40}
        result = await actl(process.admin_url, "services")
        assert result.returncode == 0, result.stderr
        rows = [line.split() for line in result.stdout.splitlines()]
        assert rows == [
            ["SERVICE", "WEIGHTS", "BACKENDS"],
            ["shop", "blue=100", "green=0", "2"],
            ["api", "blue=60", "green=40", "2"],
        ]
        async with AdminClient(process.admin_url) as admin:
            metrics = (await admin.call("GET", "/metrics")).body.decode()
            shop_state = await admin.ok("GET", "/api/v1/services/shop/state")
        assert 'zdproxy_pool_weight{pool="blue",service="api"} 60.0' in metrics
        assert 'zdproxy_pool_weight{pool="blue",service="shop"} 100.0' in metrics
        assert 'zdproxy_rollout_step{service="api"} 0.0' in metrics
        assert 'zdproxy_rollout_rollback_seconds_count{service="shop"} 0.0' in metrics
        assert 'zdproxy_backend_up{backend="shop-blue-1",pool="blue",service="shop"} 1.0' in metrics
        assert {n: p["weight"] for n, p in shop_state["pools"].items()} == {"blue": 100, "green": 0}
    finally:
        process.stop()


async def test_default_service_takes_unrouted_requests(
    backends: list[Backend], tmp_path: Path
) -> None:
    config = services_config(backends, None, default_service="api")
    config["pools"] = service(backends, "shop", live="green")["pools"]  # the service default
    config["routes"] = [{"match": {"path_exact": "/only"}, "service": "shop"}]
    process = AdminProxy(config, tmp_path).start()
    try:
        async with aiohttp.ClientSession() as session:
            async with session.get(process.url + "/only?x") as response:
                assert response.headers["X-Backend"] == "shop-blue-1"
            async with session.get(process.url + "/other") as response:
                assert response.headers["X-Backend"] == "api-blue-1"
        async with AdminClient(process.admin_url) as admin:
            # un-prefixed paths act on the service "default" (the top-level pools)
            state = await admin.ok("GET", "/api/v1/state")
            assert state["service"] == "default"
            assert {n: p["weight"] for n, p in state["pools"].items()} == {"blue": 0, "green": 100}
    finally:
        process.stop()


async def test_reload_swaps_routes_and_applies_each_service(
    backends: list[Backend], tmp_path: Path
) -> None:
    config = services_config(backends, None)
    process = AdminProxy(config, tmp_path).start()
    try:
        async with aiohttp.ClientSession() as session, AdminClient(process.admin_url) as admin:

            async def served_by(host: str, path: str = "/") -> str:
                async with session.get(process.url + path, headers={"Host": host}) as response:
                    await response.read()
                    return response.headers.get("X-Backend") or str(response.status)

            assert await served_by("shop.test") == "shop-blue-1"
            assert await served_by("new.test") == "404"
            # routes changed, the api's file weights changed, the shop's not
            config["routes"] = [
                {"match": {"host": "new.test"}, "service": "shop"},
                *config["routes"][1:],
            ]
            config["services"]["api"]["pools"]["blue"]["weight"] = 0
            config["services"]["api"]["pools"]["green"]["weight"] = 100
            rewrite(process.path, config)
            answer = await admin.ok("POST", "/api/v1/reload")
            assert "routes changed" in answer["changes"], answer
            assert await served_by("new.test") == "shop-blue-1"
            assert await served_by("shop.test") == "404"
            assert await served_by("x.api.test") == "api-green-1"
            shop = await admin.ok("GET", "/api/v1/services/shop/state")
            assert {n: p["weight"] for n, p in shop["pools"].items()} == {"blue": 100, "green": 0}
            # a new service needs a restart: refused whole, the running config stays
            config["services"]["extra"] = service(backends, "shop")
            config["routes"][0]["service"] = "extra"
            rewrite(process.path, config)
            answer = await admin.call("POST", "/api/v1/reload")
            assert answer.status == 400, answer
            assert "adding, removing or reordering services needs a restart" in str(
                answer.json()["problems"]
            )
            assert await served_by("new.test") == "shop-blue-1"
    finally:
        process.stop()


async def test_a_service_overrides_top_level_settings(
    backends: list[Backend], tmp_path: Path
) -> None:
    """The api's backends fail /healthz; the api checks /alive instead (its own
    health_check.path), so it serves while the top-level path would take it out."""
    for backend in backends:
        if backend.name.startswith("api-"):
            backend.health_status = 503
    config = services_config(
        backends, None, health_check={"enabled": True, "interval": "200ms", "rise": 1}
    )
    config["services"]["api"]["health_check"] = {"path": "/alive"}
    config["services"]["shop"]["health_check"] = {"fall": 1}
    process = AdminProxy(config, tmp_path).start()
    try:
        async with AdminClient(process.admin_url) as admin:

            async def states(svc: str) -> dict[str, str]:
                state = await admin.ok("GET", f"/api/v1/services/{svc}/state")
                return {b["id"]: b["state"] for p in state["pools"].values() for b in p["backends"]}

            async def all_up() -> bool:
                merged = {**await states("api"), **await states("shop")}
                return set(merged.values()) == {"up"}

            await async_wait_for(all_up, 15, "every backend up")
            async with (
                aiohttp.ClientSession() as session,
                session.get(process.url + "/", headers={"Host": "x.api.test"}) as r,
            ):
                assert (r.status, r.headers["X-Backend"]) == (200, "api-blue-1")
            # the shop checks /healthz (inherited), with fall 1 (its own)
            shop_blue = next(b for b in backends if b.name == "shop-blue-1")
            shop_blue.health_status = 503

            async def shop_blue_down() -> bool:
                return (await states("shop"))["shop-blue-1"] == "down"

            await async_wait_for(shop_blue_down, 15, "shop-blue-1 down")
            assert set((await states("api")).values()) == {"up"}
    finally:
        process.stop()
