"""Several real ``zdproxy run`` processes sharing their state through a real etcd
(started by the test on loopback): a split made on one is served by the others,
concurrent changes through two instances serialise, an etcd outage costs no
request, services and affinity pins are shared. More in ``test_etcd_cluster.py``
(a separate module, so that the two run in parallel).
"""

from __future__ import annotations

import asyncio
import itertools
import json
import re
import time
from pathlib import Path

import aiohttp
from ports import free_port
from support import Backend, async_wait_for
from support_control import AdminClient, AdminProxy, actl, dummy_pools
from support_etcd import (
    EtcdServer,
    connected,
    etcd_view,
    instances,
    pool_weights,
    real_pools,
    served_by,
    shared_config,
)


async def test_split_on_one_instance_is_served_by_the_other(
    tmp_path: Path, etcd: EtcdServer
) -> None:
    blue, green = await Backend("blue", "blue").start(), await Backend("green", "green").start()
    # B serves with worker processes: its control process talks to etcd for them
    a, b = instances(real_pools(blue, green), etcd, tmp_path, 2, {1: {"workers": 2}})
    try:
        async with (
            AdminClient(a.admin_url) as admin_a,
            AdminClient(b.admin_url) as admin_b,
            aiohttp.ClientSession() as session,
        ):
            await async_wait_for(lambda: connected(admin_b), 10, "instance B connected to etcd")
            assert await served_by(session, b.url) == "blue"
            started = time.monotonic()
            answer = await admin_a.ok("PUT", "/api/v1/split", {"blue": 0, "green": 100})
            assert answer["weights"] == {"blue": 0, "green": 100}

            async def b_serves_green() -> bool:
                return await served_by(session, b.url) == "green"

            await async_wait_for(b_serves_green, 10, "B serving green")
            elapsed = time.monotonic() - started
            # and every one of B's workers: 20 requests in a row to green (a worker
            # gets the control process's new snapshot a moment after another)
            streak = 0

            async def b_all_green() -> bool:
                nonlocal streak
                streak = streak + 1 if await b_serves_green() else 0
                return streak >= 20

            await async_wait_for(b_all_green, 10, "all of B's workers serving green")
            print(
                f"\nconvergence: split on A served by B after {elapsed * 1000:.0f} ms, "
                f"20 in a row (both workers) after {(time.monotonic() - started) * 1000:.0f} ms"
            )
            state_b = await admin_b.state()
            assert len(state_b["workers"]) == 2
            assert state_b["pools"]["blue"]["weight"] == 0
            assert state_b["pools"]["green"]["weight"] == 100
            # B's audit log holds A's change, with the instance that made it
            events = [e for e in await admin_b.events() if e["action"] == "split"]
            assert len(events) == 1
            assert events[0]["after"] == {"blue": 0, "green": 100}
            assert events[0]["instance"] == (await etcd_view(admin_a))["instance"]
            # a backend drained on B is drained on A; one added on A appears on B
            await admin_b.ok("POST", "/api/v1/backends/blue-1/drain")
            await async_wait_for(
                lambda: _backend_admin(admin_a, "blue-1", ("draining", "drained")),
                10,
                "blue-1 drained on A",
            )
            await admin_a.ok(
                "POST",
                "/api/v1/backends",
                {"pool": "green", "address": blue.address, "id": "green-extra"},
                status=201,
            )
            await async_wait_for(
                lambda: _backend_admin(admin_b, "green-extra", ("enabled",)), 10, "added on B"
            )
            # the state lives in etcd under the prefix
            keys = etcd.get_prefix("/zdtest/")
            doc = json.loads(keys["/zdtest/services/default/state"])
            assert doc["weights"] == {"blue": 0, "green": 100}
            assert [s["id"] for s in doc["added"]] == ["green-extra"]
            # a command that no longer applies (whether B had seen the change or not)
            # is refused with the current state
            await admin_a.ok("DELETE", "/api/v1/backends/green-extra")
            answer = await admin_b.call("DELETE", "/api/v1/backends/green-extra")
            assert answer.status == 404, answer
            current = answer.json()["current"]
            assert "green-extra" not in current["backends"]
            assert current["weights"] == {"blue": 0, "green": 100}
            # and one made on a state B may not have seen yet is checked against etcd
            # before B says 404: a backend added on A is drained through B at once
            await admin_a.ok(
                "POST",
                "/api/v1/backends",
                {"pool": "green", "address": f"127.0.0.1:{free_port()}", "id": "green-late"},
                status=201,
            )
            drained = await admin_b.ok("POST", "/api/v1/backends/green-late/drain")
            assert drained["changed"] is True
            plan = {"to": "blue", "steps": [{"weight": 50, "pause": "1m"}, {"weight": 100}]}
            await admin_a.ok("POST", "/api/v1/rollouts", plan, status=201)
            answer = await admin_b.call("POST", "/api/v1/rollouts", plan)
            assert answer.status == 409, answer
            assert "one rollout at a time" in answer.json()["error"]
            assert answer.json()["current"]["rollout"]["id"] == 1
    finally:
        a.stop()
        b.stop()
        await blue.stop()
        await green.stop()


async def _backend_admin(admin: AdminClient, backend_id: str, wanted: tuple[str, ...]) -> bool:
    backend = await admin.backend(backend_id)
    return backend is not None and backend["admin"] in wanted


async def test_concurrent_conflicting_changes_serialise(tmp_path: Path, etcd: EtcdServer) -> None:
    blue, green = await Backend("blue", "blue").start(), await Backend("green", "green").start()
    a, b = instances(real_pools(blue, green), etcd, tmp_path, 2)
    try:
        async with AdminClient(a.admin_url) as admin_a, AdminClient(b.admin_url) as admin_b:
            for admin in (admin_a, admin_b):
                await async_wait_for(lambda admin=admin: connected(admin), 10, "connected")
            # 50 splits, each a different weight, half through A and half through B, all
            # at once: each reads the weights it replaces, so a lost update shows
            wanted = {n: {"blue": n, "green": 100 - n} for n in range(1, 51)}
            answers = await asyncio.gather(
                *(
                    (admin_a if n % 2 else admin_b).call("PUT", "/api/v1/split", body)
                    for n, body in wanted.items()
                )
            )
            assert [x.status for x in answers] == [200] * 50, answers
            events = await admin_a.events()
            splits = [e for e in events if e["action"] == "split"]
            assert len(splits) == 50
            ids = [e["id"] for e in splits]
            assert ids == sorted(ids) and len(set(ids)) == 50
            # one serial order: each change's "before" is the previous one's "after"
            assert splits[0]["before"] == {"blue": 100, "green": 0}
            for previous, event in itertools.pairwise(splits):
                assert event["before"] == previous["after"], (previous, event)
            assert sorted(e["after"]["blue"] for e in splits) == list(range(1, 51))
            # both instances made some of them, and both end at the last one's weights
            assert {e["instance"] for e in splits} == {
                (await etcd_view(admin_a))["instance"],
                (await etcd_view(admin_b))["instance"],
            }
            final = splits[-1]["after"]

            async def both_final() -> bool:
                weights = [
                    {p: v["weight"] for p, v in (await admin.state())["pools"].items()}
                    for admin in (admin_a, admin_b)
                ]
                return weights == [final, final]

            await async_wait_for(both_final, 10, "both instances at the last change")
            assert (await admin_b.events())[-50:] == splits[-50:]
            # and etcd holds each of them under its own key
            stored = etcd.get_prefix("/zdtest/services/default/events/")
            stored_splits = [json.loads(v) for v in stored.values()]
            assert sorted(e["id"] for e in stored_splits if e["action"] == "split") == ids
            conflicts = (await etcd_view(admin_a))["conflicts"] + (await etcd_view(admin_b))[
                "conflicts"
            ]
            print(f"\n50 concurrent splits: {conflicts} compare-and-swap conflicts retried")
    finally:
        a.stop()
        b.stop()
        await blue.stop()
        await green.stop()


async def test_etcd_outage_under_load(tmp_path: Path, etcd: EtcdServer) -> None:
    blue, green = await Backend("blue", "blue").start(), await Backend("green", "green").start()
    a, b = instances(real_pools(blue, green), etcd, tmp_path, 2)
    failures: list[str] = []
    served = 0
    stop = asyncio.Event()

    async def load(url: str) -> None:
        nonlocal served
        async with aiohttp.ClientSession() as session:
            while not stop.is_set():
                try:
                    async with session.get(url + "/") as response:
                        await response.read()
                        if response.status != 200:
                            failures.append(f"{url}: {response.status}")
                        served += 1
                except aiohttp.ClientError as exc:
                    failures.append(f"{url}: {exc!r}")
                await asyncio.sleep(0.005)

    try:
        async with AdminClient(a.admin_url) as admin_a, AdminClient(b.admin_url) as admin_b:
            for admin in (admin_a, admin_b):
                await async_wait_for(lambda admin=admin: connected(admin), 10, "connected")
            await admin_a.ok("PUT", "/api/v1/split", {"blue": 50, "green": 50})
            await async_wait_for(
                lambda: _has_weights(admin_b, {"blue": 50, "green": 50}), 10, "B at 50/50"
            )
            loaders = [asyncio.create_task(load(p.url)) for p in (a, b, a, b)]
            etcd.stop()
            down = time.monotonic()
            for admin in (admin_a, admin_b):
                await async_wait_for(
                    lambda admin=admin: _disconnected(admin), 10, "etcd seen as down"
                )
                answer = await admin.call("PUT", "/api/v1/split", {"blue": 100, "green": 0})
                assert answer.status == 503, answer
                assert "etcd is unreachable" in answer.error
                answer = await admin.call("POST", "/api/v1/backends/blue-1/drain")
                assert answer.status == 503, answer
                # nothing changed
                assert await pool_weights(admin) == {"blue": 50, "green": 50}
                assert (await admin.backend("blue-1") or {})["admin"] == "enabled"
                health = await admin.call("GET", "/healthz", token=None)
                assert health.status == 200
                metrics = (await admin.call("GET", "/metrics")).body.decode()
                assert "\nzdproxy_etcd_connected 0.0\n" in metrics
            for admin in (admin_a, admin_b):
                await async_wait_for(
                    lambda admin=admin: _not_leading(admin), 10, "no leader without etcd"
                )
            # the CLI says so too (inside the 10 s: it costs no time)
            status = await actl(a.admin_url, "status")
            assert status.returncode == 0 and "etcd: UNREACHABLE" in status.stdout, status
            split = await actl(a.admin_url, "split", "blue=100", "green=0")
            assert split.returncode != 0 and "etcd is unreachable" in split.stderr, split
            during = served
            await asyncio.sleep(max(0.0, 10.0 - (time.monotonic() - down)))
            assert served > during  # traffic went on while etcd was away
            etcd.start()
            for admin in (admin_a, admin_b):
                await async_wait_for(lambda admin=admin: connected(admin), 15, "reconnected")

            # no instance can lead while etcd is away; one leads again after it
            async def one_leader() -> bool:
                views = [await etcd_view(admin) for admin in (admin_a, admin_b)]
                return [v["leader"] for v in views].count(True) == 1

            await async_wait_for(one_leader, 15, "one rollout leader after the outage")
            metrics = (await admin_a.call("GET", "/metrics")).body.decode()
            assert "\nzdproxy_etcd_connected 1.0\n" in metrics
            status = await actl(a.admin_url, "status")
            assert "etcd: connected" in status.stdout, status
            # the 50/50 split at least (and the first state, when A wrote it)
            commits = re.search(r'zdproxy_etcd_commits_total\{service="default"\} (\S+)', metrics)
            assert commits is not None and float(commits.group(1)) >= 1
            await admin_b.ok("PUT", "/api/v1/split", {"blue": 20, "green": 80})
            await async_wait_for(
                lambda: _has_weights(admin_a, {"blue": 20, "green": 80}), 10, "A converged"
            )
            stop.set()
            await asyncio.gather(*loaders)
            assert failures == []
            assert served > 100
            print(f"\netcd outage of 10 s: {served} requests served, 0 failed")
    finally:
        stop.set()
        a.stop()
        b.stop()
        await blue.stop()
        await green.stop()


async def _not_leading(admin: AdminClient) -> bool:
    return not (await etcd_view(admin))["leader"]


async def _disconnected(admin: AdminClient) -> bool:
    return not (await etcd_view(admin))["connected"]


async def _has_weights(admin: AdminClient, weights: dict[str, int]) -> bool:
    return await pool_weights(admin) == weights


async def test_each_service_has_its_own_shared_state(tmp_path: Path, etcd: EtcdServer) -> None:
    services = {}
    for name in ("shop", "api"):
        pools = dummy_pools(1, 1)
        for pool in pools.values():
            for backend in pool["backends"]:
                backend["id"] = f"{name}-{backend['id']}"
        services[name] = {"pools": pools}
    procs = []
    for n in range(2):
        # the same services on both instances, each on its own ports
        config = shared_config({}, etcd)
        del config["pools"]
        config["services"] = services
        config["default_service"] = "shop"
        workdir = tmp_path / f"svc{n}"
        workdir.mkdir()
        procs.append(AdminProxy(config, workdir).start())
    try:
        async with (
            AdminClient(procs[0].admin_url) as admin_a,
            AdminClient(procs[1].admin_url) as admin_b,
        ):
            await async_wait_for(lambda: _svc_connected(admin_b), 10, "B connected to etcd")
            await admin_a.ok("POST", "/api/v1/services/shop/flip", {"to": "green"})

            async def shop_flipped() -> bool:
                state = await admin_b.ok("GET", "/api/v1/services/shop/state")
                return bool(state["pools"]["green"]["weight"] == 100)

            await async_wait_for(shop_flipped, 10, "shop flipped on B")
            api = await admin_b.ok("GET", "/api/v1/services/api/state")
            assert api["pools"]["blue"]["weight"] == 100
            shop_events = (await admin_b.ok("GET", "/api/v1/services/shop/events"))["events"]
            api_events = (await admin_b.ok("GET", "/api/v1/services/api/events"))["events"]
            assert [(e["action"], e["service"]) for e in shop_events] == [("flip", "shop")]
            assert api_events == []
            keys = etcd.get_prefix("/zdtest/services/")
            assert json.loads(keys["/zdtest/services/shop/state"])["weights"]["green"] == 100
            assert json.loads(keys["/zdtest/services/api/state"])["weights"]["green"] == 0
    finally:
        for proc in procs:
            proc.stop()


async def _svc_connected(admin: AdminClient) -> bool:
    state = await admin.ok("GET", "/api/v1/services/api/state")
    return bool(state["persistence"]["etcd"]["connected"])


async def test_an_affinity_pin_made_by_one_instance_holds_on_the_others(
    tmp_path: Path, etcd: EtcdServer
) -> None:
    blue, green = await Backend("blue", "blue").start(), await Backend("green", "green").start()
    pools = real_pools(blue, green)
    pools["blue"]["weight"], pools["green"]["weight"] = 50, 50
    procs = []
    for n in range(2):
        workdir = tmp_path / f"zd{n}"
        workdir.mkdir()
        # a generated signing key (no secret configured): the first instance's is shared
        config = shared_config(pools, etcd, sticky={"mode": "pool"})
        procs.append(AdminProxy(config, workdir).start())
    try:
        async with (
            AdminClient(procs[1].admin_url) as admin_b,
            aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar()) as session,
        ):
            await async_wait_for(lambda: connected(admin_b), 10, "B connected")
            pins: dict[str, str] = {}
            while len(pins) < 2:  # a pin to each pool, made by A
                async with session.get(procs[0].url + "/") as response:
                    pins.setdefault(
                        response.headers["X-Backend"], response.cookies["zd_affinity"].value
                    )
            for pool, cookie in pins.items():
                for _ in range(10):
                    async with session.get(
                        procs[1].url + "/", headers={"Cookie": f"zd_affinity={cookie}"}
                    ) as response:
                        assert response.headers["X-Backend"] == pool
    finally:
        for proc in procs:
            proc.stop()
        await blue.stop()
        await green.stop()
