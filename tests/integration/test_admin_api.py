"""The admin API of a real ``zdproxy run``: every endpoint's good call, each kind
of bad call, and the auth failures, over real sockets."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import urllib.request
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.core.parameters import ParameterLocation
from support import Backend, async_wait_for, free_port
from support_control import (
    DEPLOY_TOKEN,
    READ_TOKEN,
    TOKEN,
    AdminClient,
    AdminProxy,
    admin_config,
    dummy_pools,
)

MUTATIONS: list[tuple[str, str, Any]] = [
    ("PUT", "/api/v1/split", {"blue": 50, "green": 50}),
    ("POST", "/api/v1/flip", {"to": "green"}),
    ("POST", "/api/v1/backends", {"pool": "green", "address": "127.0.0.1:1"}),
    ("DELETE", "/api/v1/backends/blue-2", None),
    ("POST", "/api/v1/backends/blue-1/drain", None),
    ("POST", "/api/v1/backends/blue-1/disable", None),
    ("POST", "/api/v1/backends/blue-1/enable", None),
]

READS = ["/api/v1/state", "/api/v1/events", "/api/v1/openapi.json", "/metrics"]

#: endpoints of rolling updates and shadow traffic, for the OpenAPI check
ROLLING = [
    ("POST", "/api/v1/pools/{pool}/rolling"),
    ("GET", "/api/v1/pools/{pool}/rolling"),
    ("POST", "/api/v1/pools/{pool}/rolling/next"),
    ("POST", "/api/v1/pools/{pool}/rolling/abort"),
    ("GET", "/api/v1/rolling"),
    ("POST", "/api/v1/rolling/next"),
    ("POST", "/api/v1/rolling/abort"),
    # shadow traffic (tested in test_shadow.py)
    ("GET", "/api/v1/shadow"),
    ("PUT", "/api/v1/shadow"),
    ("DELETE", "/api/v1/shadow"),
]
#: tested in test_rollouts.py; listed here so that the description stays complete
ROLLOUT_OPERATIONS = {
    ("POST", "/api/v1/rollouts"),
    ("GET", "/api/v1/rollouts"),
    ("GET", "/api/v1/rollouts/current"),
    *(("POST", f"/api/v1/rollouts/current/{a}") for a in ("pause", "resume", "promote", "abort")),
}


@pytest.fixture
def proxy(tmp_path: Path) -> Iterator[AdminProxy]:
    config = admin_config(dummy_pools(), tmp_path / "state.json", admin={"max_body_bytes": 1024})
    process = AdminProxy(config, tmp_path).start()
    yield process
    process.stop()


@pytest.fixture
async def admin(proxy: AdminProxy) -> AsyncIterator[AdminClient]:
    async with AdminClient(proxy.admin_url) as client:
        yield client


@pytest.fixture
async def blue_green() -> AsyncIterator[tuple[list[Backend], list[Backend]]]:
    blue = [await Backend(f"blue-{n}", "blue").start() for n in (1, 2)]
    green = [await Backend(f"green-{n}", "green").start() for n in (1, 2)]
    yield blue, green
    for backend in blue + green:
        await backend.stop()


def real_pools(blue: list[Backend], green: list[Backend]) -> dict[str, Any]:
    return {
        "blue": {"weight": 100, "backends": [{"id": b.name, "address": b.address} for b in blue]},
        "green": {"weight": 0, "backends": [{"id": b.name, "address": b.address} for b in green]},
    }


@pytest.fixture
async def live(
    blue_green: tuple[list[Backend], list[Backend]], tmp_path: Path
) -> AsyncIterator[tuple[AdminProxy, AdminClient]]:
    """zdproxy in front of real blue and green backends."""
    config = admin_config(real_pools(*blue_green), tmp_path / "state.json")
    process = AdminProxy(config, tmp_path).start()
    async with AdminClient(process.admin_url) as client:
        yield process, client
    process.stop()


async def get_pools(proxy: AdminProxy, count: int, path: str = "/") -> Counter[str]:
    seen: Counter[str] = Counter()
    async with aiohttp.ClientSession() as session:
        for _ in range(count):
            async with session.get(proxy.url + path) as response:
                assert response.status == 200
                await response.read()
                seen[response.headers["X-Zdproxy-Pool"]] += 1
    return seen


# ---- reads ----------------------------------------------------------------------


async def test_healthz_needs_no_token(admin: AdminClient) -> None:
    answer = await admin.call("GET", "/healthz", token=None)
    assert answer.status == 200 and answer.json() == {"status": "ok"}


async def test_state(admin: AdminClient, proxy: AdminProxy) -> None:
    state = await admin.state()
    assert state["pid"] == proxy.pid
    assert re.fullmatch(r"\d+\.\d+\.\d+.*", state["version"])
    assert state["rollout"] is None
    assert state["persistence"]["path"] == str(proxy.workdir / "state.json")
    assert list(state["pools"]) == ["blue", "green"]
    assert state["pools"]["blue"]["weight"] == 100 and state["pools"]["green"]["weight"] == 0
    backend = state["pools"]["blue"]["backends"][0]
    assert backend["id"] == "blue-1"
    assert backend["address"] == proxy.config["pools"]["blue"]["backends"][0]["address"]
    for key, value in {
        "pool": "blue",
        "state": "up",
        "admin": "enabled",
        "health": "up",
        "ejected": False,
        "flags": [],
        "in_flight": 0,
        "weight": 1,
        "effective_weight": 1,
        "removing": False,
        "added": False,
        "drain_started_at": None,
        "requests": 0,
    }.items():
        assert backend[key] == value, key


async def test_openapi_documents_every_endpoint(admin: AdminClient) -> None:
    spec = (await admin.call("GET", "/api/v1/openapi.json")).json()
    assert spec["openapi"].startswith("3.")
    operations = {(m.upper(), p) for p, item in spec["paths"].items() for m in item}
    expected = {(m, p) for m, p, _ in MUTATIONS}
    expected = {(m, re.sub(r"blue-\d", "{id}", p)) for m, p in expected}
    expected |= {("GET", p) for p in READS} | {("GET", "/healthz"), ("GET", "/")}
    expected |= set(ROLLING)
    expected |= ROLLOUT_OPERATIONS
    expected |= {("POST", "/api/v1/reload"), ("POST", "/api/v1/upgrade")}
    # each service's endpoints again under /api/v1/services/{svc}/ (docs/services.md)
    process_wide = (
        "/api/v1/shadow",
        "/api/v1/reload",
        "/api/v1/upgrade",
        "/api/v1/openapi.json",
        "/api/v1/services",
    )
    expected |= {
        (m, "/api/v1/services/{svc}" + p[7:])
        for m, p in expected
        if p.startswith("/api/v1/") and not p.startswith(process_wide)
    }
    expected |= {("GET", "/api/v1/services")}
    assert operations == expected


async def test_dashboard_page_and_assets_need_no_token(admin: AdminClient) -> None:
    page = await admin.call("GET", "/", token=None)
    assert page.status == 200 and page.headers["Content-Type"].startswith("text/html")
    assert b"/static/app.js" in page.body
    script = await admin.call("GET", "/static/app.js", token=None)
    assert script.status == 200 and b"/api/v1/state" in script.body
    missing = await admin.call("GET", "/static/nope.js", token=None)
    assert missing.status == 404 and missing.error


async def test_rollout_endpoints_before_any_rollout(admin: AdminClient) -> None:
    answer = await admin.call("GET", "/api/v1/rollouts/current")
    assert answer.status == 404 and "no rollout yet" in answer.error
    answer = await admin.call("POST", "/api/v1/rollouts/current/pause")
    assert answer.status == 409 and answer.error == "no rollout in progress"
    history = await admin.ok("GET", "/api/v1/rollouts")
    assert history["rollouts"] == [] and history["success_rate"] is None
    assert (await admin.call("GET", "/api/v1/rollouts/current", token=None)).status == 401


async def test_unknown_endpoint_is_a_json_404(admin: AdminClient) -> None:
    answer = await admin.call("GET", "/api/v1/nothing")
    assert answer.status == 404 and "no such endpoint" in answer.error
    assert (await admin.call("GET", "/nothing", token=None)).status == 404


# ---- auth -----------------------------------------------------------------------


async def test_no_token_is_401(admin: AdminClient) -> None:
    for path in READS:
        answer = await admin.call("GET", path, token=None)
        assert answer.status == 401, path
        assert answer.headers["WWW-Authenticate"] == "Bearer"
        assert "missing bearer token" in answer.error
    for method, path, body in MUTATIONS:
        answer = await admin.call(method, path, body, token=None)
        assert answer.status == 401, (method, path)
    bad_scheme = await admin.call(
        "GET", "/api/v1/state", token=None, headers={"Authorization": f"Basic {TOKEN}"}
    )
    assert bad_scheme.status == 401 and "Bearer" in bad_scheme.error
    empty = await admin.call(
        "GET", "/api/v1/state", token=None, headers={"Authorization": "Bearer "}
    )
    assert empty.status == 401


async def test_wrong_token_is_403_and_changes_nothing(admin: AdminClient) -> None:
    before = await admin.state()
    for path in READS:
        answer = await admin.call("GET", path, token=TOKEN + "x")
        assert answer.status == 403 and answer.error == "invalid token"
    for method, path, body in MUTATIONS:
        answer = await admin.call(method, path, body, token=TOKEN[:-1])
        assert answer.status == 403, (method, path)
    assert (await admin.state())["pools"] == before["pools"]
    assert await admin.events() == []


async def test_read_token_reads_but_cannot_mutate(admin: AdminClient) -> None:
    for path in READS:
        assert (await admin.call("GET", path, token=READ_TOKEN)).status == 200, path
    before = await admin.state()
    for method, path, body in MUTATIONS:
        answer = await admin.call(method, path, body, token=READ_TOKEN)
        assert answer.status == 403, (method, path)
        assert "read-only" in answer.error
    assert (await admin.state())["pools"] == before["pools"]
    assert await admin.events() == []


async def test_named_write_token_is_the_actor(admin: AdminClient) -> None:
    answer = await admin.call("POST", "/api/v1/flip", {"to": "green"}, token=DEPLOY_TOKEN)
    assert answer.status == 200
    assert answer.json()["event"]["actor"] == "deploy"
    await admin.ok("POST", "/api/v1/flip", {"to": "blue"})
    assert [e["actor"] for e in await admin.events()] == ["deploy", "default"]


async def test_no_token_configured_on_loopback_refuses_every_call(tmp_path: Path) -> None:
    config = admin_config(dummy_pools(), None, admin={"tokens": []})
    process = AdminProxy(config, tmp_path, env={"ZDPROXY_ADMIN_TOKEN": ""}).start()
    try:
        async with AdminClient(process.admin_url) as admin:
            assert (await admin.call("GET", "/healthz", token=None)).status == 200
            for token in (None, "anything"):
                for method, path, body in [("GET", "/api/v1/state", None), *MUTATIONS]:
                    answer = await admin.call(method, path, body, token=token)
                    assert answer.status == 401, (method, path)
                    assert "no admin token is configured" in answer.error
    finally:
        process.stop()
    assert "no admin token configured" in process.log()


async def test_token_file(tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text("file-token-0123456789abcdef\n")
    config = admin_config(dummy_pools(), None, admin={"tokens": [], "token_file": str(token_file)})
    process = AdminProxy(config, tmp_path).start()
    try:
        async with AdminClient(process.admin_url, "file-token-0123456789abcdef") as admin:
            assert (await admin.call("GET", "/api/v1/state")).status == 200
            # the file wins over the environment variable
            assert (await admin.call("GET", "/api/v1/state", token=TOKEN)).status == 403
    finally:
        process.stop()


@pytest.mark.parametrize(
    ("admin_section", "env", "message"),
    [
        (
            {"listen": "0.0.0.0:{port}", "tokens": []},
            {"ZDPROXY_ADMIN_TOKEN": ""},
            "refusing to start",
        ),
        (
            {"tokens": [{"name": "ci", "env": "ZDPROXY_TEST_UNSET"}]},
            {},
            "ZDPROXY_TEST_UNSET is not set",
        ),
        ({"token_file": "/nonexistent/token"}, {}, "cannot read token file"),
    ],
)
def test_refuses_to_start(
    tmp_path: Path, admin_section: dict[str, Any], env: dict[str, str], message: str
) -> None:
    section = {
        k: v.format(port=free_port()) if isinstance(v, str) else v for k, v in admin_section.items()
    }
    process = AdminProxy(admin_config(dummy_pools(), None, admin=section), tmp_path, env=env)
    process.start(wait=False)
    assert process.wait(20) == 1
    process.stop()
    assert message in process.log()
    assert "Traceback" not in process.log()


# ---- method, size, body checks ------------------------------------------------


async def test_get_on_a_mutation_path_is_405(admin: AdminClient) -> None:
    for method, path, _ in MUTATIONS:
        answer = await admin.call("GET", path)
        assert answer.status == 405, path
        assert method in answer.headers["Allow"]
        assert "not allowed" in answer.error
    answer = await admin.call("POST", "/api/v1/state", {})
    assert answer.status == 405 and answer.error


async def test_body_over_the_cap_is_413_and_changes_nothing(admin: AdminClient) -> None:
    big = {"to": "green", "pad": "x" * 2000}
    answer = await admin.call("POST", "/api/v1/flip", big)
    assert answer.status == 413 and "too large" in answer.error

    async def chunks() -> AsyncIterator[bytes]:
        yield b'{"to": "green", "pad": "'
        for _ in range(10):
            yield b"x" * 200
        yield b'"}'

    assert admin._session is not None
    async with admin._session.post(
        admin.url + "/api/v1/flip",
        data=chunks(),
        headers={"Authorization": f"Bearer {TOKEN}"},
    ) as response:
        assert response.status == 413
        assert "error" in await response.json()
    assert (await admin.state())["pools"]["green"]["weight"] == 0


@pytest.mark.parametrize(
    ("method", "path", "data", "message"),
    [
        ("PUT", "/api/v1/split", b"{nope", "invalid JSON"),
        ("PUT", "/api/v1/split", b"[1, 2]", "expected a JSON object"),
        ("PUT", "/api/v1/split", b"", "expected a JSON object"),
        ("PUT", "/api/v1/split", b'{"blue": 90, "green": 20}', "must sum to 100, got 110"),
        ("PUT", "/api/v1/split", b'{"blue": 90.5, "green": 9.5}', "integer 0-100"),
        ("PUT", "/api/v1/split", b'{"blue": "100"}', "integer 0-100"),
        ("PUT", "/api/v1/split", b'{"blue": 100, "force": "yes"}', "force must be"),
        ("PUT", "/api/v1/split", b'{"blue": NaN, "green": 100}', "integer 0-100"),
        ("POST", "/api/v1/flip", b"{}", 'expected {"to": "POOL"}'),
        ("POST", "/api/v1/flip", b'{"to": 1}', "expected the name of the pool"),
        ("POST", "/api/v1/flip", b'{"to": "green", "now": true}', "unknown key 'now'"),
        ("POST", "/api/v1/flip", b'{"to": "green", "force": 1}', "force must be"),
        ("POST", "/api/v1/backends", b'{"pool": "green"}', "missing key 'address'"),
        ("POST", "/api/v1/backends", b'{"address": "127.0.0.1:1"}', "missing key 'pool'"),
        ("POST", "/api/v1/backends", b'{"pool": "green", "address": "x"}', "host:port"),
        ("POST", "/api/v1/backends", b'{"pool": "green", "address": "h:0"}', "invalid port"),
        (
            "POST",
            "/api/v1/backends",
            b'{"pool": "green", "address": "127.0.0.1:1", "id": "a b"}',
            "invalid backend id",
        ),
        (
            "POST",
            "/api/v1/backends",
            b'{"pool": "green", "address": "127.0.0.1:1", "weight": 5000}',
            "weight must be",
        ),
        (
            "POST",
            "/api/v1/backends",
            b'{"pool": "green", "address": "127.0.0.1:1", "colour": "red"}',
            "unknown key 'colour'",
        ),
        ("POST", "/api/v1/backends/blue-1/drain", b'{"now": true}', "unknown key 'now'"),
        ("DELETE", "/api/v1/backends/blue-1", b"[]", "expected a JSON object"),
    ],
)
async def test_invalid_bodies_are_400_and_change_nothing(
    admin: AdminClient, method: str, path: str, data: bytes, message: str
) -> None:
    before = await admin.state()
    answer = await admin.call(method, path, data=data)
    assert answer.status == 400, answer
    assert message in answer.error
    after = await admin.state()
    assert after["pools"] == before["pools"] and after["generation"] == before["generation"]
    assert await admin.events() == []


@pytest.mark.parametrize(
    ("method", "path", "body", "message"),
    [
        ("PUT", "/api/v1/split", {"blue": 50, "purple": 50}, "no pool named 'purple'"),
        ("POST", "/api/v1/flip", {"to": "purple"}, "no pool named 'purple'"),
        ("POST", "/api/v1/backends", {"pool": "purple", "address": "127.0.0.1:1"}, "no pool"),
        ("DELETE", "/api/v1/backends/nope", None, "no backend with id 'nope'"),
        ("POST", "/api/v1/backends/nope/drain", None, "no backend"),
        ("POST", "/api/v1/backends/nope/disable", None, "no backend"),
        ("POST", "/api/v1/backends/nope/enable", None, "no backend"),
    ],
)
async def test_unknown_names_are_404(
    admin: AdminClient, method: str, path: str, body: Any, message: str
) -> None:
    answer = await admin.call(method, path, body)
    assert answer.status == 404, answer
    assert message in answer.error
    assert await admin.events() == []


# ---- split and flip --------------------------------------------------------------


async def test_split_and_flip(admin: AdminClient) -> None:
    result = await admin.ok("PUT", "/api/v1/split", {"blue": 90, "green": 10})
    assert result["weights"] == {"blue": 90, "green": 10} and result["changed"] is True
    assert result["event"]["action"] == "split"
    state = await admin.state()
    assert state["pools"]["blue"]["weight"] == 90 and state["pools"]["green"]["weight"] == 10
    result = await admin.ok("PUT", "/api/v1/split", {"green": 100})
    assert result["weights"] == {"blue": 0, "green": 100}
    result = await admin.ok("POST", "/api/v1/flip", {"to": "blue"})
    assert result["weights"] == {"blue": 100, "green": 0}
    again = await admin.ok("POST", "/api/v1/flip", {"to": "blue"})
    assert again["changed"] is False and again["event"] is None
    assert [e["action"] for e in await admin.events()] == ["split", "split", "flip"]


async def test_split_and_flip_to_an_unusable_pool_are_409_unless_forced(
    admin: AdminClient,
) -> None:
    await admin.ok("POST", "/api/v1/backends/green-1/disable")
    await admin.ok("POST", "/api/v1/backends/green-2/drain")
    for method, path, body in [
        ("POST", "/api/v1/flip", {"to": "green"}),
        ("PUT", "/api/v1/split", {"blue": 99, "green": 1}),
    ]:
        answer = await admin.call(method, path, body)
        assert answer.status == 409, answer
        assert "no usable backend" in answer.error and '"force": true' in answer.error
    state = await admin.state()
    assert state["pools"]["green"]["usable"] is False
    assert state["pools"]["green"]["weight"] == 0
    result = await admin.ok("POST", "/api/v1/flip", {"to": "green", "force": True})
    assert result["weights"]["green"] == 100
    assert "forced" in result["event"]["note"]
    result = await admin.ok("PUT", "/api/v1/split", {"blue": 50, "green": 50, "force": True})
    assert result["weights"] == {"blue": 50, "green": 50}


async def test_traffic_follows_split_and_flip(live: tuple[AdminProxy, AdminClient]) -> None:
    proxy, admin = live
    assert await get_pools(proxy, 20) == {"blue": 20}
    await admin.ok("PUT", "/api/v1/split", {"blue": 75, "green": 25})
    seen = await get_pools(proxy, 200)
    assert 30 <= seen["green"] <= 70, seen
    await admin.ok("POST", "/api/v1/flip", {"to": "green"})
    assert await get_pools(proxy, 20) == {"green": 20}


async def test_admin_routes_are_not_served_on_the_data_port(
    live: tuple[AdminProxy, AdminClient], blue_green: tuple[list[Backend], list[Backend]]
) -> None:
    proxy, admin = live
    blue, _ = blue_green
    async with aiohttp.ClientSession() as session:
        for path in ("/api/v1/state", "/metrics", "/api/v1/flip"):
            async with session.request(
                "POST" if path.endswith("flip") else "GET",
                proxy.url + path,
                json={"to": "green"} if path.endswith("flip") else None,
                headers={"Authorization": f"Bearer {TOKEN}"},
            ) as response:
                assert response.status == 200
                assert response.headers["X-Backend"].startswith("blue-")
                assert (await response.text()).startswith("blue-")
        async with session.get(proxy.url + "/healthz") as response:
            assert await response.text() == "health"  # the backend's, not the admin's
    seen = {r["path"] for b in blue for r in b.requests}
    assert seen >= {"/api/v1/state", "/metrics", "/api/v1/flip"}
    assert (await admin.state())["pools"]["blue"]["weight"] == 100


# ---- backends ----------------------------------------------------------------------


async def test_add_backend_takes_traffic(
    live: tuple[AdminProxy, AdminClient], tmp_path: Path
) -> None:
    proxy, admin = live
    extra = await Backend("green-3", "green").start()
    try:
        answer = await admin.call(
            "POST",
            "/api/v1/backends",
            {"pool": "green", "address": extra.address, "id": "green-3", "weight": 2},
        )
        assert answer.status == 201, answer
        backend = answer.json()["backend"]
        assert backend["id"] == "green-3" and backend["state"] == "up" and backend["added"]
        assert backend["weight"] == 2
        await admin.ok("POST", "/api/v1/flip", {"to": "green"})
        await get_pools(proxy, 40)
        assert len(extra.requests) == 20  # weight 2 of 4
        conflict = await admin.call(
            "POST", "/api/v1/backends", {"pool": "green", "address": extra.address}
        )
        assert conflict.status == 409 and "already has backend 'green-3'" in conflict.error
        conflict = await admin.call(
            "POST", "/api/v1/backends", {"pool": "green", "address": "127.0.0.1:1", "id": "blue-1"}
        )
        assert conflict.status == 409 and "already in use" in conflict.error
        default_id = await admin.ok(
            "POST", "/api/v1/backends", {"pool": "blue", "address": "127.0.0.1:1"}, status=201
        )
        assert default_id["backend"]["id"] == "blue-3"
    finally:
        await extra.stop()


async def test_added_backend_waits_for_health_checks(
    blue_green: tuple[list[Backend], list[Backend]], tmp_path: Path
) -> None:
    config = admin_config(
        real_pools(*blue_green),
        None,
        health_check={"enabled": True, "interval": "100ms", "timeout": "1s", "rise": 2},
    )
    process = AdminProxy(config, tmp_path).start()
    extra = await Backend("green-3", "green").start()
    extra.health_status = 503
    try:
        async with AdminClient(process.admin_url) as admin:
            answer = await admin.call(
                "POST", "/api/v1/backends", {"pool": "green", "address": extra.address}
            )
            assert answer.status == 201 and answer.json()["backend"]["state"] == "starting"

            async def state_of(wanted: str) -> bool:
                backend = await admin.backend("green-3")
                return backend is not None and backend["state"] == wanted

            await async_wait_for(lambda: state_of("down"), 10, "green-3 down")
            extra.health_status = 200
            await async_wait_for(lambda: state_of("up"), 10, "green-3 up")
    finally:
        process.stop()
        await extra.stop()


async def test_remove_idle_backend(admin: AdminClient) -> None:
    answer = await admin.call("DELETE", "/api/v1/backends/blue-2")
    assert answer.status == 200, answer
    result = answer.json()
    assert result["removed"] is True and result["backend"]["id"] == "blue-2"
    assert await admin.backend("blue-2") is None
    again = await admin.call("DELETE", "/api/v1/backends/blue-2")
    assert again.status == 404


async def test_remove_busy_backend_drains_first(
    live: tuple[AdminProxy, AdminClient], blue_green: tuple[list[Backend], list[Backend]]
) -> None:
    proxy, admin = live
    async with aiohttp.ClientSession() as session:
        slow = [
            asyncio.create_task(session.get(proxy.url + "/slow/1.0")) for _ in range(2)
        ]  # one on each blue backend

        async def both_busy() -> bool:
            state = await admin.state()
            return all(b["in_flight"] == 1 for b in state["pools"]["blue"]["backends"])

        await async_wait_for(both_busy, 5, "requests in flight")
        answer = await admin.call("DELETE", "/api/v1/backends/blue-1")
        assert answer.status == 202, answer
        backend = answer.json()["backend"]
        assert backend["removing"] is True and backend["state"] == "draining"
        assert backend["in_flight"] == 1
        conflict = await admin.call("DELETE", "/api/v1/backends/blue-1")
        assert conflict.status == 409 and "already being removed" in conflict.error
        busy = await admin.call("POST", "/api/v1/backends/blue-1/enable")
        assert busy.status == 409
        assert await get_pools(proxy, 10) == {"blue": 10}  # blue-2 takes the new ones
        for task in slow:
            response = await task
            assert response.status == 200
            await response.read()
            response.release()

        async def gone() -> bool:
            return await admin.backend("blue-1") is None

        await async_wait_for(gone, 5, "blue-1 removed")
    actions = [(e["actor"], e["action"]) for e in await admin.events()]
    assert actions == [("default", "backend.remove"), ("zdproxy", "backend.removed")]


async def test_drain_disable_enable(
    live: tuple[AdminProxy, AdminClient], blue_green: tuple[list[Backend], list[Backend]]
) -> None:
    proxy, admin = live
    blue, _ = blue_green
    async with aiohttp.ClientSession() as session:
        slow = asyncio.create_task(session.get(proxy.url + "/slow/0.8"))

        async def busy() -> bool:
            return any(b["in_flight"] for b in (await admin.state())["pools"]["blue"]["backends"])

        await async_wait_for(busy, 5, "a request in flight")
        state = await admin.state()
        busy_id = next(b["id"] for b in state["pools"]["blue"]["backends"] if b["in_flight"])
        other = "blue-2" if busy_id == "blue-1" else "blue-1"
        result = await admin.ok("POST", f"/api/v1/backends/{busy_id}/drain")
        assert result["backend"]["state"] == "draining" and result["changed"] is True
        assert result["backend"]["drain_started_at"] is not None
        before = {b.name: len(b.requests) for b in blue}
        assert await get_pools(proxy, 10) == {"blue": 10}
        assert len(next(b for b in blue if b.name == busy_id).requests) == before[busy_id]
        assert (await admin.backend(busy_id) or {})["state"] == "draining"
        response = await slow
        assert response.status == 200
        response.release()

        async def drained() -> bool:
            return (await admin.backend(busy_id) or {}).get("state") == "drained"

        await async_wait_for(drained, 5, "drained")

    result = await admin.ok("POST", f"/api/v1/backends/{other}/disable")
    assert result["backend"]["state"] == "disabled"
    again = await admin.ok("POST", f"/api/v1/backends/{other}/disable")
    assert again["changed"] is False and again["event"] is None
    conflict = await admin.call("POST", f"/api/v1/backends/{other}/drain")
    assert conflict.status == 409 and "enable it before draining" in conflict.error
    # blue has no usable backend now: its 100 % answer 503
    async with aiohttp.ClientSession() as session, session.get(proxy.url + "/") as response:
        assert response.status == 503
    for backend_id in (busy_id, other):
        result = await admin.ok("POST", f"/api/v1/backends/{backend_id}/enable")
        assert result["backend"]["state"] == "up"
    assert await get_pools(proxy, 10) == {"blue": 10}
    actions = [e["action"] for e in await admin.events()]
    assert actions == [
        "backend.drain",
        "backend.drained",
        "backend.disable",
        "backend.enable",
        "backend.enable",
    ]


# ---- audit log --------------------------------------------------------------------


async def test_events_record_every_change(admin: AdminClient, proxy: AdminProxy) -> None:
    await admin.ok("PUT", "/api/v1/split", {"blue": 80, "green": 20})
    await admin.call("POST", "/api/v1/flip", {"to": "green"}, token=DEPLOY_TOKEN)
    await admin.ok("POST", "/api/v1/backends", {"pool": "green", "address": "127.0.0.1:7"}, 201)
    await admin.ok("POST", "/api/v1/backends/blue-1/disable")
    await admin.ok("POST", "/api/v1/backends/blue-1/enable")
    await admin.ok("DELETE", "/api/v1/backends/blue-2")
    await admin.call("POST", "/api/v1/flip", {"to": "nowhere"})  # refused: not recorded
    events = await admin.events()
    assert [(e["id"], e["actor"], e["action"], e["target"]) for e in events] == [
        (1, "default", "split", "blue,green"),
        (2, "deploy", "flip", "green"),
        (3, "default", "backend.add", "green-3"),
        (4, "default", "backend.disable", "blue-1"),
        (5, "default", "backend.enable", "blue-1"),
        (6, "default", "backend.remove", "blue-2"),
    ]
    assert events[0]["before"] == {"blue": 100, "green": 0}
    assert events[0]["after"] == {"blue": 80, "green": 20}
    assert events[1]["before"] == {"blue": 80, "green": 20}
    assert events[1]["after"] == {"blue": 0, "green": 100}
    assert events[2]["before"] is None and events[2]["after"]["address"] == "127.0.0.1:7"
    assert events[3]["before"]["state"] == "up" and events[3]["after"]["state"] == "disabled"
    assert events[5]["after"] is None
    for event in events:
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", event["time"])
    # the same records, appended to the JSON-lines file next to the state
    lines = (proxy.workdir / "state.json.events.jsonl").read_text().splitlines()
    assert [json.loads(line) for line in lines] == events
    # since / limit
    page = (await admin.call("GET", "/api/v1/events?since=2&limit=2")).json()["events"]
    assert [e["id"] for e in page] == [5, 6]
    for query in ("since=-1", "limit=0", "limit=x", "limit=10001", "page=2"):
        answer = await admin.call("GET", f"/api/v1/events?{query}")
        assert answer.status == 400, query


async def test_event_ring_is_bounded(tmp_path: Path) -> None:
    config = admin_config(dummy_pools(), None, admin={"events_ring": 3})
    process = AdminProxy(config, tmp_path).start()
    try:
        async with AdminClient(process.admin_url) as admin:
            for n in range(5):
                await admin.ok("POST", "/api/v1/flip", {"to": "green" if n % 2 == 0 else "blue"})
            assert [e["id"] for e in await admin.events()] == [3, 4, 5]
    finally:
        process.stop()


# ---- metrics ------------------------------------------------------------------------


def samples(text: str) -> dict[str, float]:
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            out[name] = float(value)
    return out


async def test_metrics(live: tuple[AdminProxy, AdminClient]) -> None:
    proxy, admin = live
    await get_pools(proxy, 10)
    async with aiohttp.ClientSession() as session, session.get(proxy.url + "/status/503") as r:
        assert r.status == 503
    answer = await admin.call("GET", "/metrics")
    assert answer.status == 200
    assert answer.headers["Content-Type"].startswith("text/plain")
    text = answer.body.decode()
    values = samples(text)

    def requests(code: str) -> float:
        return sum(
            v
            for k, v in values.items()
            if k.startswith("zdproxy_requests_total{") and f'code="{code}"' in k
        )

    assert requests("200") == 10 and requests("503") == 1
    assert values['zdproxy_request_duration_seconds_count{pool="blue"}'] == 11
    assert values['zdproxy_request_duration_seconds_bucket{le="+Inf",pool="blue"}'] == 11
    assert values['zdproxy_request_duration_seconds_sum{pool="blue"}'] > 0
    assert values['zdproxy_pool_weight{pool="blue"}'] == 100
    assert values['zdproxy_pool_weight{pool="green"}'] == 0
    assert values['zdproxy_backend_up{backend="green-1",pool="green"}'] == 1
    assert values['zdproxy_backend_in_flight{backend="blue-1",pool="blue"}'] == 0
    assert values['zdproxy_connections{side="client"}'] >= 0
    assert values['zdproxy_connections{side="upstream"}'] >= 1  # kept alive to the backends
    for family in (
        "zdproxy_upstream_errors_total",
        "zdproxy_rollouts_total",
        "zdproxy_config_reloads_total",
    ):
        assert f"# TYPE {family} counter" in text
    await admin.ok("POST", "/api/v1/backends/green-1/disable")
    await admin.ok("POST", "/api/v1/flip", {"to": "green"})
    values = samples((await admin.call("GET", "/metrics")).body.decode())
    assert values['zdproxy_pool_weight{pool="green"}'] == 100
    assert values['zdproxy_backend_up{backend="green-1",pool="green"}'] == 0
    assert values['zdproxy_backend_state{backend="green-1",pool="green",state="disabled"}'] == 1


async def test_upstream_errors_metric(tmp_path: Path) -> None:
    pools = dummy_pools(blue=1, green=1)  # nothing listens there: connect refused
    process = AdminProxy(admin_config(pools, None, retries={"attempts": 0}), tmp_path).start()
    try:
        async with aiohttp.ClientSession() as session, session.get(process.url + "/") as response:
            assert response.status == 502
        async with AdminClient(process.admin_url) as admin:
            values = samples((await admin.call("GET", "/metrics")).body.decode())
        key = 'zdproxy_upstream_errors_total{backend="blue-1",kind="connect_refused",pool="blue"}'
        assert values[key] == 1
    finally:
        process.stop()


# ---- the OpenAPI description against the running API (schemathesis) -------------


@pytest.fixture(scope="module")
def fuzzed_proxy(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AdminProxy]:
    workdir = tmp_path_factory.mktemp("schemathesis")
    config = admin_config(dummy_pools(), workdir / "state.json", admin={"max_body_bytes": 4096})
    process = AdminProxy(config, workdir).start()
    yield process
    # still the process the fuzzing started with: nothing replaced it (a hot upgrade
    # would leave the new process running after this fixture ends)
    request = urllib.request.Request(
        process.admin_url + "/api/v1/state", headers={"Authorization": f"Bearer {TOKEN}"}
    )
    with urllib.request.urlopen(request, timeout=10) as answer:
        serving = json.load(answer)["pid"]
    assert process.proc is not None
    if serving != process.proc.pid:
        os.kill(serving, signal.SIGTERM)
    process.stop()
    assert serving == process.proc.pid, "the fuzzed API replaced its process"


@pytest.fixture(scope="module")
def admin_schema(fuzzed_proxy: AdminProxy) -> Any:
    return schemathesis.openapi.from_url(
        fuzzed_proxy.admin_url + "/api/v1/openapi.json",
        headers={"Authorization": f"Bearer {TOKEN}"},
    )


# A hot upgrade replaces the process under test (tests/integration/test_upgrade.py
# covers it) and leaves the new one running after the fixture ends that one. The
# filter goes on the lazy schema: one set on the fixture's schema is not applied.
schema = schemathesis.pytest.from_fixture("admin_schema").exclude(path="/api/v1/upgrade")


@schema.parametrize()
@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
def test_api_conforms_to_its_openapi_description(case: Any) -> None:
    """No 5xx, every status documented, every answer matching its schema, schema-invalid
    input refused. (Schema-valid input may still be refused with 400: weights must sum
    to 100, pools and addresses must exist and parse, which a schema cannot say.)"""
    case.call_and_validate(
        headers=_auth_for(case),
        excluded_checks=[schemathesis.checks.positive_data_acceptance],
    )


def _auth_for(case: Any) -> dict[str, str]:
    """The token, unless the case negates its headers: a case that drops Authorization
    (with a negated query besides, schemathesis does not strip an explicit header
    itself) must reach the API without ours, or the request is valid after all and
    the 200 it gets is reported as "invalid data accepted"."""
    header = case.meta.components.get(ParameterLocation.HEADER) if case.meta else None
    if header is not None and header.mode.is_negative:
        return {}
    return {"Authorization": f"Bearer {TOKEN}"}
