"""Shadow traffic through a real ``zdproxy run``: a live pool and a shadow pool of
raw recording backends, keep-alive clients, and the shadow pool misbehaving in
every way it can (errors, hangs, resets, refused connections)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from support import async_wait_for, free_port
from support_control import READ_TOKEN, AdminClient, AdminProxy, actl, admin_config
from support_shadow import RecordingBackend

from zdproxy.config.loader import ConfigError, load_config_text

HEADER = "X-Zdproxy-Shadow"


def pools(live: RecordingBackend, shadow_address: str) -> dict[str, Any]:
    return {
        "live": {"weight": 100, "backends": [{"id": "live-1", "address": live.address}]},
        "shadow": {"weight": 0, "backends": [{"id": "shadow-1", "address": shadow_address}]},
    }


@pytest.fixture
async def live() -> AsyncIterator[RecordingBackend]:
    backend = await RecordingBackend("live").start()
    yield backend
    await backend.stop()


def start(tmp_path: Path, live: RecordingBackend, shadow_address: str, **shadow: Any) -> AdminProxy:
    extra: dict[str, Any] = {}
    if shadow:
        extra["shadow"] = {"pool": "shadow", **shadow}
    config = admin_config(pools(live, shadow_address), tmp_path / "state.json", **extra)
    return AdminProxy(config, tmp_path).start()


async def send(url: str, targets: list[str], clients: int = 10) -> list[tuple[int, bytes]]:
    """GET every target over ``clients`` keep-alive connections; (status, body) in order."""
    answers: list[tuple[int, bytes]] = [(0, b"")] * len(targets)

    async def client(offset: int) -> None:
        connector = aiohttp.TCPConnector(limit=1)
        async with aiohttp.ClientSession(connector=connector) as session:
            for i in range(offset, len(targets), clients):
                try:
                    async with session.get(url + targets[i]) as response:
                        answers[i] = (response.status, await response.read())
                except aiohttp.ClientError as exc:
                    answers[i] = (-1, repr(exc).encode())

    await asyncio.gather(*(client(n) for n in range(clients)))
    return answers


async def shadow_view(admin: AdminClient) -> dict[str, Any]:
    result: dict[str, Any] = await admin.ok("GET", "/api/v1/shadow")
    return result


async def settled(admin: AdminClient, counted: int) -> dict[str, Any]:
    """The figures once ``counted`` copies have a result and none is in flight."""

    async def done() -> bool:
        figures = (await shadow_view(admin))["figures"]
        total = sum(figures["results"].values())
        return bool(total >= counted and figures["in_flight"] == 0)

    await async_wait_for(done, 20, f"{counted} shadow results")
    figures: dict[str, Any] = (await shadow_view(admin))["figures"]
    return figures


async def test_twenty_percent_of_requests_are_copied_with_the_header(
    tmp_path: Path, live: RecordingBackend
) -> None:
    shadow = await RecordingBackend("shadow-1").start()
    proxy = start(tmp_path, live, shadow.address, percent=20)
    try:
        async with AdminClient(proxy.admin_url) as admin:
            targets = [f"/item/{n}?q={n}" for n in range(1000)]
            answers = await send(proxy.url, targets)
            figures = await settled(admin, 200)
            metrics = (await admin.call("GET", "/metrics")).body.decode()
            state = await admin.state()
    finally:
        proxy.stop()
        await shadow.stop()
    assert answers == [(200, b"same body " + t.encode() + b"\n") for t in targets]
    assert len(live.seen) == 1000
    assert all(s.header(HEADER) is None for s in live.seen)
    copies = shadow.seen
    assert 180 <= len(copies) <= 220, len(copies)
    # the accumulator is exact: 1 in 5
    assert len(copies) == 200
    assert all(c.header(HEADER) == "1" for c in copies)
    assert all(c.header("Connection") == "close" for c in copies)
    live_by_target = {s.target: s for s in live.seen}
    for copy in copies:
        original = live_by_target[copy.target]
        assert copy.method == original.method == "GET"
        assert copy.header("X-Forwarded-For") == original.header("X-Forwarded-For")
        assert copy.header("Host") == original.header("Host")
    assert figures["sent"] == 200
    assert figures["results"]["match"] == 200
    assert figures["compared"] == 200 and figures["mismatch_rate"] == 0
    assert figures["latency_ratio"] is not None and figures["latency_ratio"] > 0
    assert 'zdproxy_shadow_requests_total{result="match"} 200.0' in metrics
    assert "zdproxy_shadow_sent_total 200.0" in metrics
    assert 'zdproxy_shadow_latency_seconds_total{side="live"}' in metrics
    assert state["shadow"]["active"] is True
    assert state["shadow"]["settings"]["pool"] == "shadow"
    assert state["shadow"]["figures"]["sent"] == 200


@pytest.mark.parametrize(
    ("mode", "result"),
    [("error", "status_mismatch"), ("hang", "timeout"), ("reset", "error"), ("refuse", "error")],
)
async def test_a_failing_shadow_pool_never_reaches_a_client(
    tmp_path: Path, live: RecordingBackend, mode: str, result: str
) -> None:
    shadow = RecordingBackend("shadow-1", mode if mode != "refuse" else "ok")
    if mode != "refuse":
        await shadow.start()
    address = shadow.address if mode != "refuse" else f"127.0.0.1:{free_port()}"
    proxy = start(tmp_path, live, address, percent=50, timeout="300ms", max_concurrent=1000)
    try:
        async with AdminClient(proxy.admin_url) as admin:
            targets = [f"/n/{n}" for n in range(300)]
            answers = await send(proxy.url, targets)
            figures = await settled(admin, 150)
    finally:
        proxy.stop()
        await shadow.stop()
    # every live answer is whole and right, whatever the shadow pool did
    assert answers == [(200, b"same body " + t.encode() + b"\n") for t in targets]
    assert len(live.seen) == 300
    assert figures["results"][result] == 150, figures
    assert sum(figures["results"].values()) == 150
    if mode != "refuse":
        assert len(shadow.seen) == 150
        assert all(c.header(HEADER) == "1" for c in shadow.seen)


async def test_copies_beyond_the_concurrency_cap_are_dropped(
    tmp_path: Path, live: RecordingBackend
) -> None:
    shadow = await RecordingBackend("shadow-1", "hang").start()
    proxy = start(tmp_path, live, shadow.address, percent=100, timeout="2s", max_concurrent=3)
    try:
        async with AdminClient(proxy.admin_url) as admin:
            targets = [f"/n/{n}" for n in range(40)]
            answers = await send(proxy.url, targets, clients=4)
            figures = await settled(admin, 40)
    finally:
        proxy.stop()
        await shadow.stop()
    assert [status for status, _ in answers] == [200] * 40
    results = figures["results"]
    # at most 3 in flight at once: the rest dropped, none queued
    assert results["dropped"] + results["timeout"] == 40
    assert 3 <= results["timeout"] < 40 and results["dropped"] > 0
    assert len(shadow.seen) == results["timeout"]


async def test_bodies_are_copied_exactly_up_to_the_bound(
    tmp_path: Path, live: RecordingBackend
) -> None:
    shadow = await RecordingBackend("shadow-1").start()
    proxy = start(tmp_path, live, shadow.address, percent=100, max_body_bytes=1000)
    bodies = {
        "/empty": b"",
        "/small": b"hello\x00\xff world",
        "/exact": bytes(range(256)) * 3 + b"x" * 232,  # 1000 bytes
        "/over": b"y" * 1001,
    }
    chunked = {
        "/chunked-small": [b"a" * 300, b"b" * 300, b"c" * 300],
        "/chunked-over": [b"d" * 600, b"e" * 600],
    }
    try:
        async with (
            AdminClient(proxy.admin_url) as admin,
            aiohttp.ClientSession() as session,
        ):
            for target, body in bodies.items():
                async with session.post(proxy.url + target, data=body) as response:
                    assert response.status == 200, target

            for target, chunks in chunked.items():

                async def stream(chunks: list[bytes] = chunks) -> AsyncIterator[bytes]:
                    for chunk in chunks:
                        yield chunk

                async with session.post(proxy.url + target, data=stream()) as response:
                    assert response.status == 200, target
            figures = await settled(admin, 6)
    finally:
        proxy.stop()
        await shadow.stop()
    live_bodies = {s.target: s.body for s in live.seen}
    assert live_bodies == {**bodies, **{t: b"".join(c) for t, c in chunked.items()}}
    copied = {s.target: s.body for s in shadow.seen}
    assert copied == {
        "/empty": b"",
        "/small": bodies["/small"],
        "/exact": bodies["/exact"],
        "/chunked-small": b"a" * 300 + b"b" * 300 + b"c" * 300,
    }
    framing = {s.target: s.header("Transfer-Encoding") for s in shadow.seen}
    assert framing["/chunked-small"] == "chunked" and framing["/exact"] is None
    assert figures["results"]["too_large"] == 2
    assert figures["results"]["match"] == 4


async def test_divergence_is_counted(tmp_path: Path, live: RecordingBackend) -> None:
    shadow = await RecordingBackend("shadow-1").start()
    proxy = start(tmp_path, live, shadow.address, percent=100, compare_body=True)
    try:
        async with AdminClient(proxy.admin_url) as admin:
            targets = ["/same"] * 7 + ["/diff"] * 5 + ["/flaky"] * 3 + ["/status/404"] * 2
            answers = await send(proxy.url, targets, clients=3)
            figures = await settled(admin, len(targets))
            status = await actl(proxy.admin_url, "shadow", "status")
    finally:
        proxy.stop()
        await shadow.stop()
    assert [a[0] for a in answers] == [200] * 15 + [404] * 2
    results = figures["results"]
    assert results["match"] == 9  # /same and /status/404
    assert results["body_mismatch"] == 5
    assert results["status_mismatch"] == 3
    assert figures["mismatch_rate"] == round(8 / 17, 6)
    assert status.returncode == 0, status.stderr
    assert status.stdout.startswith(
        "shadow: 100% of requests copied to pool shadow (bodies up to 65536 bytes, "
        "body hash compared)\n"
    )
    assert "body_mismatch=5" in status.stdout and "status_mismatch=3" in status.stdout


async def test_api_and_ctl_set_and_clear_it(tmp_path: Path, live: RecordingBackend) -> None:
    shadow = await RecordingBackend("shadow-1").start()
    proxy = start(tmp_path, live, shadow.address)
    try:
        async with AdminClient(proxy.admin_url) as admin:
            view = await shadow_view(admin)
            assert view["active"] is False and view["settings"]["pool"] is None
            await send(proxy.url, ["/a"] * 20)
            assert shadow.seen == []

            for body, status, message in [
                ({"pool": "shadow"}, 400, "missing key 'percent'"),
                ({"pool": "nope", "percent": 5}, 404, "no pool named 'nope'"),
                ({"pool": "shadow", "percent": 101}, 400, "percent: "),
                ({"pool": "shadow", "percent": "5"}, 400, "percent must be a number"),
                ({"pool": "shadow", "percent": 5, "timout": "1s"}, 400, "unknown key 'timout'"),
                ({"pool": "shadow", "percent": 5, "max_body_bytes": -1}, 400, "max_body_bytes"),
            ]:
                answer = await admin.call("PUT", "/api/v1/shadow", body)
                assert answer.status == status and message in answer.error, answer
            answer = await admin.call(
                "PUT", "/api/v1/shadow", {"pool": "shadow", "percent": 5}, token=READ_TOKEN
            )
            assert answer.status == 403

            # a client cannot mark a live request as a copy
            async with aiohttp.ClientSession() as session:
                headers = {HEADER: "1"}
                async with session.get(proxy.url + "/forged", headers=headers) as response:
                    assert response.status == 200
            forged = [s for s in live.seen if s.target == "/forged"]
            assert len(forged) == 1 and forged[0].header(HEADER) is None

            done = await actl(proxy.admin_url, "shadow", "set", "shadow", "50%")
            assert done.returncode == 0, done.stderr
            assert done.stdout.startswith("shadow: 50% of requests copied to pool shadow")
            await send(proxy.url, ["/b"] * 20)
            await settled(admin, 10)
            assert len(shadow.seen) == 10

            done = await actl(proxy.admin_url, "shadow", "set", "nope", "5")
            assert done.returncode == 1 and "404: no pool named 'nope'" in done.stderr
            done = await actl(proxy.admin_url, "shadow", "set", "shadow")
            assert done.returncode == 2
            done = await actl(proxy.admin_url, "shadow", "set", "shadow", "lots")
            assert done.returncode == 1 and "expected a percent" in done.stderr

            cleared = await admin.ok("DELETE", "/api/v1/shadow")
            assert cleared["changed"] is True and cleared["active"] is False
            assert cleared["event"]["action"] == "shadow.clear"
            again = await admin.ok("DELETE", "/api/v1/shadow")
            assert again["changed"] is False and again["event"] is None
            await send(proxy.url, ["/c"] * 20)
            assert len(shadow.seen) == 10
            actions = [e["action"] for e in await admin.events()]
            assert actions[-2:] == ["shadow.set", "shadow.clear"]
            done = await actl(proxy.admin_url, "--json", "shadow", "status")
            assert json.loads(done.stdout)["active"] is False

            # set again: it survives a restart
            await admin.ok("PUT", "/api/v1/shadow", {"pool": "shadow", "percent": 25})
    finally:
        proxy.stop()
    proxy = AdminProxy(proxy.config, tmp_path).start()
    try:
        async with AdminClient(proxy.admin_url) as admin:
            view = await shadow_view(admin)
            assert view["active"] is True and view["settings"]["percent"] == 25
    finally:
        proxy.stop()
        await shadow.stop()


def test_config_names_an_unknown_shadow_pool_at_its_line() -> None:
    text = (
        "listen: 127.0.0.1:8080\n"
        "pools:\n"
        "  live: {weight: 100, backends: [{address: 127.0.0.1:9001}]}\n"
        "shadow:\n"
        "  pool: green\n"
        "  percent: 120\n"
    )
    with pytest.raises(ConfigError) as info:
        load_config_text(text, "z.yaml")
    lines = str(info.value).splitlines()
    assert any(line.startswith("z.yaml:5: shadow.pool: no pool named 'green'") for line in lines)
    assert any(line.startswith("z.yaml:6: shadow.percent:") for line in lines)
    config = load_config_text(text.replace("green", "live").replace("120", "12.5"), "z.yaml")
    assert config.shadow.pool == "live" and config.shadow.percent == 12.5
    assert config.shadow.header == HEADER and config.shadow.max_body_bytes == 65536
