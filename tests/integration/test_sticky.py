"""Stickiness through a real zdproxy process: version (pool) pins that do not
make a canary drift, backend pins that fall back without an error, hashing."""

from __future__ import annotations

import base64
from collections import Counter
from pathlib import Path

from support_health import Client, figure, running

COOKIE = "zd_affinity"


async def _new_clients(client: Client, n: int) -> list[tuple[str, str]]:
    """``n`` requests without a cookie: (pool, pin) of each."""
    out = []
    for _ in range(n):
        response = await client.request()
        assert response.status == 200
        pin = response.cookie(COOKIE)
        assert pin is not None and response.pool is not None
        out.append((response.pool, pin))
    return out


async def _with_pin(client: Client, pin: str) -> tuple[str | None, str | None]:
    response = await client.request(headers={"Cookie": f"other=1; {COOKIE}={pin}"})
    assert response.status == 200
    return response.pool, response.cookie(COOKIE)


async def test_sticky_pools_keep_clients_and_the_split(tmp_path: Path) -> None:
    async with running(
        tmp_path,
        {"blue": 2, "green": 2},
        weights={"blue": 90, "green": 10},
        sticky={"mode": "pool"},
    ) as (proxy, _):
        client = Client(proxy.port)
        first = await _new_clients(client, 1000)
        share = Counter(pool for pool, _ in first)["green"] / 10
        # pinned clients come back many times, new ones keep arriving in between
        pinned = first[:200]
        moved = 0
        later = Counter()
        for _ in range(5):
            for pool, pin in pinned:
                got, new_pin = await _with_pin(client, pin)
                moved += got != pool or new_pin is not None
            later.update(pool for pool, _ in await _new_clients(client, 100))
        # the canary grows: its clients stay, new clients follow the new weights
        status, _ = await proxy.api("PUT", "/api/v1/split", {"blue": 50, "green": 50})
        assert status == 200
        kept_on_growth = sum([(await _with_pin(client, pin))[0] == pool for pool, pin in pinned])
        grown = Counter(pool for pool, _ in await _new_clients(client, 100))
        # the canary is pulled: its clients move at once, with a new pin
        status, _ = await proxy.api("PUT", "/api/v1/split", {"blue": 100, "green": 0})
        assert status == 200
        green_pins = [pin for pool, pin in pinned if pool == "green"]
        after_pull = [await _with_pin(client, pin) for pin in green_pins]
        client.close()
    figure(
        "sticky pool at a 90/10 split",
        new_clients=1000,
        canary_share_percent=share,
        pinned_requests=5 * len(pinned),
        pinned_moved=moved,
        later_new_clients_canary_percent=later["green"] / sum(later.values()) * 100,
    )
    assert 8.0 <= share <= 12.0
    assert moved == 0
    assert later["green"] == 50  # exactly 10 % of 500 more new clients
    assert kept_on_growth == len(pinned)
    assert grown["green"] == 50
    assert green_pins and all(pool == "blue" and pin for pool, pin in after_pull)


async def test_forged_and_tampered_pins_are_ignored(tmp_path: Path) -> None:
    async with running(
        tmp_path,
        {"blue": 1, "green": 1},
        weights={"blue": 50, "green": 50},
        sticky={"mode": "pool"},
    ) as (proxy, _):
        client = Client(proxy.port)
        (pool, pin), *_ = await _new_clients(client, 1)
        _payload, _, mac = pin.partition(".")
        other = "green" if pool == "blue" else "blue"
        forged_payload = base64.urlsafe_b64encode(f"{other}\x1f\x1f1".encode()).rstrip(b"=")
        for value in ("garbage", f"{forged_payload.decode()}.{mac}", pin[:-3], "a.b.c", "é"):
            got, new_pin = await _with_pin(client, value)
            assert got in ("blue", "green")
            assert new_pin is not None  # treated as a new client
        client.close()


async def test_backend_pin_falls_back_and_re_pins_when_its_backend_dies(tmp_path: Path) -> None:
    async with running(
        tmp_path,
        {"blue": 3},
        sticky={"mode": "backend"},
        outlier_detection={"enabled": False},
        health_check={"interval": "5s", "timeout": "1s", "rise": 1, "fall": 3},
    ) as (proxy, backends):
        client = Client(proxy.port)
        first = await client.request()
        pin = first.cookie(COOKIE)
        victim = first.backend
        assert pin and victim
        for _ in range(5):
            again = await client.request(headers={"Cookie": f"{COOKIE}={pin}"})
            assert again.backend == victim and again.cookie(COOKIE) is None
        backends[victim].kill()  # still "up": the checks are 5 s apart
        assert (await proxy.backend(victim))["state"] == "up"
        fallback = await client.request(headers={"Cookie": f"{COOKIE}={pin}"})
        new_pin = fallback.cookie(COOKIE)
        statuses = []
        served = Counter()
        for _ in range(10):
            response = await client.request(headers={"Cookie": f"{COOKIE}={new_pin}"})
            statuses.append(response.status)
            served[response.backend] += 1
        client.close()
    figure("sticky backend dies (SIGKILL)", requests=11, failures=sum(s != 200 for s in statuses))
    assert fallback.status == 200 and fallback.backend != victim
    assert new_pin is not None and new_pin != pin
    assert statuses == [200] * 10
    assert served == {fallback.backend: 10}


async def test_hash_affinity_on_a_header(tmp_path: Path) -> None:
    async with running(
        tmp_path, {"blue": 3}, sticky={"mode": "hash", "hash_on": "header:X-User"}
    ) as (proxy, _):
        client = Client(proxy.port)
        owners: dict[str, set[str | None]] = {}
        for _ in range(5):
            for user in range(30):
                response = await client.request(headers={"X-User": f"user-{user}"})
                owners.setdefault(f"user-{user}", set()).add(response.backend)
        client.close()
    assert all(len(b) == 1 for b in owners.values())
    assert len({next(iter(b)) for b in owners.values()}) == 3
