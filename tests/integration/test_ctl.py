"""``zdproxy ctl`` as a subprocess against a real running proxy: a blue/green
deployment driven by the CLI alone, and its errors."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from support import Backend, async_wait_for, free_port
from support_control import (
    READ_TOKEN,
    AdminClient,
    AdminProxy,
    actl,
    admin_config,
    dummy_pools,
)


@pytest.fixture
async def live(tmp_path: Path) -> AsyncIterator[tuple[AdminProxy, list[Backend]]]:
    backends = [
        await Backend(f"{pool}-{n}", pool).start() for pool in ("blue", "green") for n in (1, 2)
    ]
    pools: dict[str, Any] = {
        pool: {
            "weight": 100 if pool == "blue" else 0,
            "backends": [{"id": b.name, "address": b.address} for b in backends if b.pool == pool],
        }
        for pool in ("blue", "green")
    }
    process = AdminProxy(admin_config(pools, tmp_path / "state.json"), tmp_path).start()
    yield process, backends
    process.stop()
    for backend in backends:
        await backend.stop()


async def pools_seen(proxy: AdminProxy, count: int) -> Counter[str]:
    seen: Counter[str] = Counter()
    async with aiohttp.ClientSession() as session:
        for _ in range(count):
            async with session.get(proxy.url + "/") as response:
                assert response.status == 200
                seen[response.headers["X-Zdproxy-Pool"]] += 1
    return seen


async def ok(proxy: AdminProxy, *args: str) -> str:
    done = await actl(proxy.admin_url, *args)
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""
    return done.stdout


async def test_blue_green_deployment_with_ctl_alone(
    live: tuple[AdminProxy, list[Backend]],
) -> None:
    proxy, backends = live
    status = await ok(proxy, "status")
    lines = status.splitlines()
    assert lines[0].startswith("zdproxy ") and f"(pid {proxy.pid})" in lines[0]
    assert lines[2].split() == ["POOL", "WEIGHT", "USABLE", "BACKENDS"]
    assert lines[3].split() == ["blue", "100%", "yes", "2"]
    assert lines[4].split() == ["green", "0%", "yes", "2"]
    header = next(line for line in lines if line.startswith("BACKEND"))
    assert header.split() == ["BACKEND", "POOL", "ADDRESS", "STATE", "IN-FLIGHT", "WEIGHT", "NOTE"]
    rows = {line.split()[0]: line.split() for line in lines[lines.index(header) + 1 :]}
    assert rows["green-2"][1:6] == ["green", backends[3].address, "up", "0", "1"]

    # canary: 10 % to green
    assert await ok(proxy, "split", "blue=90", "green=10") == "split: blue=90 green=10\n"
    seen = await pools_seen(proxy, 100)
    assert seen["green"] == 10 and seen["blue"] == 90, seen

    # flip
    out = await ok(proxy, "flip", "green")
    assert out == "flip: green takes all new traffic (blue=0 green=100)\n"
    assert await pools_seen(proxy, 20) == {"green": 20}
    assert "(no change)" in await ok(proxy, "flip", "green")

    # retire blue: drain, then remove
    assert await ok(proxy, "drain", "blue-1") in ("blue-1: draining\n", "blue-1: drained\n")

    async def drained() -> bool:
        return "blue-1   blue   " in (out := await ok(proxy, "status")) and " drained " in out

    await async_wait_for(drained, 5, "blue-1 drained")
    assert await ok(proxy, "remove", "blue-2") == "blue-2: removed\n"

    # maintenance on green
    assert await ok(proxy, "disable", "green-1") == "green-1: disabled\n"
    before = len(backends[2].requests)
    assert await pools_seen(proxy, 10) == {"green": 10}
    assert len(backends[2].requests) == before  # green-2 took them all
    assert await ok(proxy, "enable", "green-1") == "green-1: up\n"

    # scale green out and in
    extra = await Backend("green-3", "green").start()
    try:
        out = await ok(proxy, "add", "green", extra.address, "--id", "green-3", "--weight", "2")
        assert out == f"added green-3 ({extra.address}) to pool green: up\n"
        await pools_seen(proxy, 40)
        assert len(extra.requests) == 20
        assert await ok(proxy, "remove", "green-3") == "green-3: removed\n"
    finally:
        await extra.stop()

    events = await ok(proxy, "events")
    table = events.splitlines()
    assert table[0].split() == ["ID", "TIME", "ACTOR", "ACTION", "TARGET", "CHANGE"]
    actions = [line.split()[3] for line in table[1:]]
    assert actions == [
        "split",
        "flip",
        "backend.drain",
        "backend.drained",
        "backend.remove",
        "backend.disable",
        "backend.enable",
        "backend.add",
        "backend.remove",
    ]
    assert "blue=90 green=10 -> blue=0 green=100" in table[2]
    assert (await ok(proxy, "events", "--limit", "1")).count("\n") == 2


async def test_json_output_is_the_raw_answer(live: tuple[AdminProxy, list[Backend]]) -> None:
    proxy, _ = live
    async with AdminClient(proxy.admin_url) as admin:
        api_state = await admin.state()
    state = json.loads(await ok(proxy, "status", "--json"))
    assert state["pools"] == api_state["pools"]
    result = json.loads(await ok(proxy, "split", "blue=50", "green=50", "--json"))
    assert result["weights"] == {"blue": 50, "green": 50} and result["event"]["action"] == "split"
    result = json.loads(await ok(proxy, "flip", "blue", "--json"))
    assert result["weights"] == {"blue": 100, "green": 0}
    result = json.loads(await ok(proxy, "drain", "green-1", "--json"))
    assert result["backend"]["id"] == "green-1"
    events = json.loads(await ok(proxy, "events", "--json"))
    assert [e["action"] for e in events["events"]][:3] == ["split", "flip", "backend.drain"]
    address = f"127.0.0.1:{free_port()}"
    added = json.loads(await ok(proxy, "add", "green", address, "--json"))
    assert added["backend"]["id"] == "green-3"
    removed = json.loads(await ok(proxy, "remove", "green-3", "--json"))
    assert removed["removed"] is True


@pytest.mark.parametrize(
    ("args", "token", "message"),
    [
        (("flip", "purple"), True, "404: no pool named 'purple'"),
        (("split", "blue=90", "green=20"), True, "400: pool weights must sum to 100, got 110"),
        (("drain", "nope"), True, "404: no backend with id 'nope'"),
        (("add", "green", "not-an-address"), True, "400: invalid address"),
        (("status",), None, "401: missing bearer token"),
        (("status",), "wrong-token", "403: invalid token"),
        (("flip", "green"), READ_TOKEN, "403: token 'viewer' is read-only"),
        (("rollout", "status"), True, "404: no rollout yet"),
    ],
)
async def test_errors_exit_1_with_the_api_message(
    tmp_path: Path, args: tuple[str, ...], token: Any, message: str
) -> None:
    process = AdminProxy(admin_config(dummy_pools(), None), tmp_path).start()
    try:
        kwargs: dict[str, Any] = {} if token is True else {"token": token}
        done = await actl(process.admin_url, *args, **kwargs)
        assert done.returncode == 1, done
        assert done.stdout == ""
        assert done.stderr.startswith("zdproxy ctl: ")
        assert message in done.stderr
        if token is None:
            assert "set ZDPROXY_ADMIN_TOKEN" in done.stderr
    finally:
        process.stop()


async def test_conflict_and_force(tmp_path: Path) -> None:
    process = AdminProxy(admin_config(dummy_pools(), None), tmp_path).start()
    try:
        await ok(process, "disable", "green-1")
        await ok(process, "disable", "green-2")
        done = await actl(process.admin_url, "flip", "green")
        assert done.returncode == 1 and "409: pool 'green' has no usable backend" in done.stderr
        assert "blue=0 green=100" in await ok(process, "flip", "green", "--force")
        done = await actl(process.admin_url, "drain", "green-1")
        assert done.returncode == 1 and "409: backend green-1 is disabled" in done.stderr
    finally:
        process.stop()


async def test_unreachable_api_is_exit_1() -> None:
    url = f"http://127.0.0.1:{free_port()}"
    done = await actl(url, "status")
    assert done.returncode == 1
    assert f"cannot reach the admin API at {url}" in done.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ((), "usage: zdproxy ctl"),
        (("flip",), "the following arguments are required: POOL"),
        (("nonsense",), "invalid choice: 'nonsense'"),
        (("status", "--bogus"), "unrecognized arguments: --bogus"),
        (("events", "--limit", "many"), "invalid int value: 'many'"),
        (("add", "green", "127.0.0.1:1", "--weight", "x"), "invalid int value: 'x'"),
        (("split", "blue"), "expected POOL=PERCENT, got 'blue'"),
        (("split", "blue=ten", "green=0"), "expected POOL=PERCENT, got 'blue=ten'"),
        (("split", "=100"), "expected POOL=PERCENT, got '=100'"),
        (("split", "blue=50", "blue=50"), "pool 'blue' given twice"),
        (("rollout", "explode"), "invalid choice: 'explode'"),
    ],
)
async def test_usage_errors_exit_2_without_calling_the_api(
    args: tuple[str, ...], message: str
) -> None:
    # nothing listens at this URL: a usage error must be found before any call
    url = f"http://127.0.0.1:{free_port()}"
    done = await actl(url, *args)
    assert done.returncode == 2, done
    assert done.stdout == ""
    assert message in done.stderr
    assert "cannot reach" not in done.stderr
    done = await actl(url, "status", "--help")
    assert done.returncode == 0 and "--json" in done.stdout
