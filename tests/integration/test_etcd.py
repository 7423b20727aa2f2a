"""Several real ``zdproxy run`` processes sharing their state through a real etcd
(started by the test on loopback): a split made on one is served by the others,
concurrent changes through two instances serialise, the rollout leader's death
is survived at the same step, and an etcd outage costs no request.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import signal
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from ports import free_port
from support import Backend, async_wait_for, in_thread
from support_control import AdminClient, AdminProxy, admin_config, dummy_pools
from support_etcd import EtcdServer
from support_upgrade import UpgradingProxy, upgrade_config

from zdproxy.control.etcd import EtcdClient, EtcdCompacted, EtcdError, put_op


@pytest.fixture
async def etcd(tmp_path: Path) -> AsyncIterator[EtcdServer]:
    server = EtcdServer(tmp_path).start()
    try:
        yield server
    finally:
        server.stop()


def shared_config(pools: dict[str, Any], etcd: EtcdServer, **extra: Any) -> dict[str, Any]:
    config = admin_config(pools, None, **extra)
    config["state"] = {"etcd": {"endpoints": [etcd.endpoint], "prefix": "/zdtest/", "lease_ttl": 2}}
    return config


def real_pools(blue: Backend, green: Backend) -> dict[str, Any]:
    return {
        "blue": {"weight": 100, "backends": [{"id": "blue-1", "address": blue.address}]},
        "green": {"weight": 0, "backends": [{"id": "green-1", "address": green.address}]},
    }


def instances(
    pools: dict[str, Any],
    etcd: EtcdServer,
    tmp_path: Path,
    count: int,
    extra: dict[int, dict[str, Any]] | None = None,
) -> list[AdminProxy]:
    """``extra``: more config keys for instance n."""
    started = []
    for n in range(count):
        workdir = tmp_path / f"zd{n}"
        workdir.mkdir()
        config = shared_config(pools, etcd, **(extra or {}).get(n, {}))
        started.append(AdminProxy(config, workdir).start())
    return started


async def etcd_view(admin: AdminClient) -> dict[str, Any]:
    state = await admin.state()
    view: dict[str, Any] = state["persistence"]["etcd"]
    return view


async def served_by(session: aiohttp.ClientSession, url: str) -> str:
    async with session.get(url + "/") as response:
        assert response.status == 200, response.status
        return response.headers["X-Backend"]


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
            await async_wait_for(lambda: _connected(admin_b), 10, "instance B connected to etcd")
            assert await served_by(session, b.url) == "blue"
            started = time.monotonic()
            answer = await admin_a.ok("PUT", "/api/v1/split", {"blue": 0, "green": 100})
            assert answer["weights"] == {"blue": 0, "green": 100}

            async def b_serves_green() -> bool:
                return await served_by(session, b.url) == "green"

            await async_wait_for(b_serves_green, 10, "B serving green")
            elapsed = time.monotonic() - started
            print(f"\nconvergence: split on A served by B after {elapsed * 1000:.0f} ms")
            # from then on every request to B goes to green
            for _ in range(20):
                assert await served_by(session, b.url) == "green"
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


async def _connected(admin: AdminClient) -> bool:
    return bool((await etcd_view(admin))["connected"])


async def _backend_admin(admin: AdminClient, backend_id: str, wanted: tuple[str, ...]) -> bool:
    backend = await admin.backend(backend_id)
    return backend is not None and backend["admin"] in wanted


async def test_concurrent_conflicting_changes_serialise(tmp_path: Path, etcd: EtcdServer) -> None:
    blue, green = await Backend("blue", "blue").start(), await Backend("green", "green").start()
    a, b = instances(real_pools(blue, green), etcd, tmp_path, 2)
    try:
        async with AdminClient(a.admin_url) as admin_a, AdminClient(b.admin_url) as admin_b:
            for admin in (admin_a, admin_b):
                await async_wait_for(lambda admin=admin: _connected(admin), 10, "connected")
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


async def _weights(admin: AdminClient) -> dict[str, int]:
    return {p: v["weight"] for p, v in (await admin.state())["pools"].items()}


async def test_rollout_leader_killed_mid_rollout(tmp_path: Path, etcd: EtcdServer) -> None:
    blue, green = await Backend("blue", "blue").start(), await Backend("green", "green").start()
    procs = instances(real_pools(blue, green), etcd, tmp_path, 3)
    try:
        admins = [AdminClient(p.admin_url) for p in procs]
        for admin in admins:
            await admin.__aenter__()
        for admin in admins:
            await async_wait_for(lambda admin=admin: _connected(admin), 10, "connected")

        async def leaders() -> list[int]:
            views = [await etcd_view(admin) for admin in admins]
            return [i for i, v in enumerate(views) if v["leader"]]

        async def one_leader() -> bool:
            return len(await leaders()) == 1

        await async_wait_for(one_leader, 10, "one rollout leader")
        (leader,) = await leaders()
        # started through a follower: the leader drives it
        follower = (leader + 1) % 3
        plan = {
            "to": "green",
            "steps": [
                {"weight": 10, "pause": "1s"},
                {"weight": 30, "pause": "1s"},
                {"weight": 60, "pause": "3s"},
                {"weight": 80, "pause": "1s"},
                {"weight": 100, "pause": "500ms"},
            ],
            "analysis": {"enabled": False},
        }
        await admins[follower].ok("POST", "/api/v1/rollouts", plan, status=201)

        async def at_step_3() -> bool:
            return (await _weights(admins[follower]))["green"] == 60

        await async_wait_for(at_step_3, 15, "the rollout at step 3")
        procs[leader].signal(signal.SIGKILL)
        procs[leader].wait(10)
        killed = time.monotonic()
        survivors = [i for i in range(3) if i != leader]
        seen: list[int] = []
        new_leader: int | None = None
        takeover: float | None = None

        async def finished() -> bool:
            nonlocal new_leader, takeover
            weights = await _weights(admins[survivors[0]])
            seen.append(weights["green"])
            if new_leader is None:
                for i in survivors:
                    if (await etcd_view(admins[i]))["leader"]:
                        new_leader, takeover = i, time.monotonic() - killed
            answer = await admins[survivors[1]].ok("GET", "/api/v1/rollouts/current")
            return bool(answer["rollout"]["phase"] == "succeeded")

        await async_wait_for(finished, 30, "the rollout to succeed after the leader died")
        assert new_leader is not None and takeover is not None
        print(f"\nleader takeover after SIGKILL: {takeover * 1000:.0f} ms (lease_ttl 2s)")
        # no traffic jump: the canary's share never went back
        assert seen == sorted(seen), seen
        assert seen[0] >= 60 and seen[-1] == 100
        events = await admins[survivors[0]].events()
        steps = [e["after"]["step"] for e in events if e["action"] == "rollout.step"]
        # every step once, in order (the new leader went on at step 3, never repeated one)
        assert steps == [1, 2, 3, 4, 5], steps
        assert await _weights(admins[survivors[1]]) == {"blue": 0, "green": 100}
        for admin in admins:
            await admin.__aexit__(None, None, None)
    finally:
        for proc in procs:
            proc.stop()
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
                await async_wait_for(lambda admin=admin: _connected(admin), 10, "connected")
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
                assert await _weights(admin) == {"blue": 50, "green": 50}
                assert (await admin.backend("blue-1") or {})["admin"] == "enabled"
                health = await admin.call("GET", "/healthz", token=None)
                assert health.status == 200
            for admin in (admin_a, admin_b):
                await async_wait_for(
                    lambda admin=admin: _not_leading(admin), 10, "no leader without etcd"
                )
            during = served
            await asyncio.sleep(max(0.0, 10.0 - (time.monotonic() - down)))
            assert served > during  # traffic went on while etcd was away
            etcd.start()
            for admin in (admin_a, admin_b):
                await async_wait_for(lambda admin=admin: _connected(admin), 15, "reconnected")

            # no instance can lead while etcd is away; one leads again after it
            async def one_leader() -> bool:
                views = [await etcd_view(admin) for admin in (admin_a, admin_b)]
                return [v["leader"] for v in views].count(True) == 1

            await async_wait_for(one_leader, 15, "one rollout leader after the outage")
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
    return await _weights(admin) == weights


async def test_changes_while_an_instance_was_cut_off_are_picked_up_after_compaction(
    tmp_path: Path, etcd: EtcdServer
) -> None:
    """The client's watch from a compacted revision says so (the instance then
    re-reads everything); checked against the real server."""
    client = EtcdClient([etcd.endpoint])
    try:
        first = await client.put("/zdtest/x", "1")
        await client.put("/zdtest/x", "2")
        await client.txn([], [put_op("/zdtest/x", "3")])
        etcd.compact()
        with pytest.raises(EtcdCompacted):
            async for _ in client.watch("/zdtest/", first):
                pass
        revision, kvs = await client.get_prefix("/zdtest/")
        assert [kv.value for kv in kvs] == [b"3"]
        assert kvs[0].mod_revision == revision
    finally:
        await client.close()


async def test_the_leaders_analysis_covers_the_other_instances_traffic(
    tmp_path: Path, etcd: EtcdServer
) -> None:
    blue, green = await Backend("blue", "blue").start(), await Backend("green", "green").start()
    procs = instances(real_pools(blue, green), etcd, tmp_path, 2)
    try:
        async with (
            AdminClient(procs[0].admin_url) as admin_0,
            AdminClient(procs[1].admin_url) as admin_1,
            aiohttp.ClientSession() as session,
        ):
            admins = [admin_0, admin_1]

            async def a_leader() -> bool:
                return any([(await etcd_view(admin))["leader"] for admin in admins])

            await async_wait_for(a_leader, 10, "a rollout leader")
            leader = 0 if (await etcd_view(admin_0))["leader"] else 1
            follower = 1 - leader
            plan = {
                "to": "green",
                "steps": [{"weight": 50, "pause": "60s"}, {"weight": 100}],
                "analysis": {"interval": "500ms", "min_requests": 1},
            }
            await admins[leader].ok("POST", "/api/v1/rollouts", plan, status=201)
            # traffic to the follower only, alternating pools (forced by the header),
            # ending with the canary: every window with traffic has a canary request
            url = procs[follower].url + "/"
            for _ in range(30):
                for pool in ("blue", "green"):
                    async with session.get(url, headers={"X-Zdproxy-Pool": pool}) as response:
                        assert response.headers["X-Backend"] == pool
            # the leader, which served nothing, judged all of it
            totals: dict[str, int] = {}

            async def judged_all() -> bool:
                status = (await admins[leader].ok("GET", "/api/v1/rollouts/current"))["rollout"]
                passed = [v for v in status["verdicts"] if v["result"] == "pass"]
                totals["canary"] = sum(v["canary"]["requests"] for v in passed)
                totals["baseline"] = sum(v["baseline"]["requests"] for v in passed)
                return totals == {"canary": 30, "baseline": 30}

            await async_wait_for(judged_all, 15, "the leader's verdicts to cover 60 requests")
            assert totals == {"canary": 30, "baseline": 30}
    finally:
        for proc in procs:
            proc.stop()
        await blue.stop()
        await green.stop()


async def test_a_hot_upgrade_keeps_the_shared_state_and_the_lead(
    tmp_path: Path, etcd: EtcdServer
) -> None:
    blue, green = await Backend("blue", "blue").start(), await Backend("green", "green").start()
    config = upgrade_config(real_pools(blue, green), None)
    config["state"] = {"etcd": {"endpoints": [etcd.endpoint], "prefix": "/zdtest/", "lease_ttl": 2}}
    proxy = await in_thread(UpgradingProxy(config, tmp_path).start)
    try:

        def view() -> dict[str, Any]:
            result: dict[str, Any] = proxy.state()["persistence"]["etcd"]
            return result

        await async_wait_for(lambda: view()["leader"] and view()["connected"], 10, "leading")
        status, _ = await in_thread(proxy.api, "PUT", "/api/v1/split", {"blue": 70, "green": 30})
        assert status == 200
        old_instance = view()["instance"]
        old, new = proxy.first_pid, await in_thread(proxy.upgrade)
        assert new != old
        state = await in_thread(proxy.state)
        assert {p: v["weight"] for p, v in state["pools"].items()} == {"blue": 70, "green": 30}
        # the old process revoked its lease on the way out: the new one leads at once
        await async_wait_for(
            lambda: view()["leader"] and view()["instance"] != old_instance, 10, "new leader"
        )
        status, _ = await in_thread(proxy.api, "PUT", "/api/v1/split", {"blue": 40, "green": 60})
        assert status == 200
        doc = json.loads(etcd.get_prefix("/zdtest/")["/zdtest/services/default/state"])
        assert doc["weights"] == {"blue": 40, "green": 60}
        _, events = await in_thread(proxy.api, "GET", "/api/v1/events")
        splits = [e for e in events["events"] if e["action"] == "split"]
        assert [e["after"]["green"] for e in splits] == [30, 60]
        assert [e["instance"] for e in splits] == [old_instance, view()["instance"]]
    finally:
        await in_thread(proxy.stop)
        await blue.stop()
        await green.stop()


async def test_the_leader_trims_old_audit_events_in_etcd(etcd: EtcdServer) -> None:
    from zdproxy.config.schema import Config, EtcdConfig
    from zdproxy.control.runtime import Runtime
    from zdproxy.control.shared import EVENTS_KEPT_RINGS, Cluster

    config = Config.model_validate(
        {
            "listen": ["127.0.0.1:8080"],
            "state": {"path": None},
            "admin": {"events_ring": 2},
            "pools": {"blue": {"weight": 100, "backends": [{"address": "127.0.0.1:9"}]}},
        }
    )
    cluster = Cluster(EtcdConfig(endpoints=(etcd.endpoint,), prefix="/zdtrim/"))
    state = cluster.add_service("default", Runtime(config), None)
    try:
        for n in range(1, 31):
            await cluster.client.put(f"{state.events_prefix}{n:012d}", "{}")
        state.next_event = 31
        await cluster._trim_events()
        left = sorted(etcd.get_prefix(state.events_prefix))
        keep = EVENTS_KEPT_RINGS * 2
        assert left == [f"{state.events_prefix}{n:012d}" for n in range(31 - keep, 31)]
    finally:
        await cluster.client.close()


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


def _runtime() -> Any:
    from zdproxy.config.schema import Config
    from zdproxy.control.runtime import Runtime

    config = Config.model_validate(
        {
            "listen": ["127.0.0.1:8080"],
            "state": {"path": None},
            "health_check": {"enabled": False},
            "pools": {
                "blue": {"weight": 100, "backends": [{"id": "b1", "address": "127.0.0.1:9"}]},
                "green": {"weight": 0, "backends": [{"id": "g1", "address": "127.0.0.1:10"}]},
            },
        }
    )
    return Runtime(config)


async def test_commands_on_a_stale_view_are_rerun_on_the_current_state(etcd: EtcdServer) -> None:
    """Two instances in one process, neither watching: each sees the other's
    changes only through the compare-and-swap (deterministic staleness)."""
    from zdproxy.config.schema import EtcdConfig
    from zdproxy.control.shared import Cluster

    settings = EtcdConfig(endpoints=(etcd.endpoint,), prefix="/zdstale/")
    clusters = [Cluster(settings), Cluster(settings)]
    runtimes = [_runtime(), _runtime()]
    states = [c.add_service("default", r, None) for c, r in zip(clusters, runtimes, strict=True)]
    try:
        for cluster in clusters:
            cluster.running = True
            await cluster._full_resync()
        a, b = states
        ra, rb = runtimes
        await a.mutate(lambda: ra.split({"blue": 30, "green": 70}, "ops-a"), [])
        # B still believes blue=100: its split is rerun after A's, not over it
        await b.mutate(lambda: rb.split({"blue": 40, "green": 60}, "ops-b"), [])
        assert b.conflicts == 1
        events = [json.loads(v) for v in etcd.get_prefix(a.events_prefix).values()]
        assert [(e["before"], e["after"]) for e in events] == [
            ({"blue": 100, "green": 0}, {"blue": 30, "green": 70}),
            ({"blue": 30, "green": 70}, {"blue": 40, "green": 60}),
        ]
        # A adds a backend; B, which has not seen it, drains it: checked, not refused
        await a.mutate(lambda: ra.add_backend("green", "127.0.0.1:11", "g2", actor="ops-a"), [])
        assert "g2" not in rb.backends
        event = await b.mutate(lambda: rb.drain("g2", "ops-b"), [])
        assert event is not None and rb.backends["g2"].admin.value == "draining"
        # and a backend B never had is still 404 once the view is known current
        with pytest.raises(Exception, match="no backend with id 'nope'") as refused:
            await b.mutate(lambda: rb.drain("nope", "ops-b"), [])
        assert getattr(refused.value, "status", None) == 404
        # a no-op on a stale view is checked too: A drains g2 (already draining) after
        # B's change, so A first learns it (no event, no conflict answer)
        assert await a.mutate(lambda: ra.drain("g2", "ops-a"), []) is None
        assert ra.backends["g2"].admin.value == "draining"
        doc = json.loads(etcd.get_prefix(a.state_key)[a.state_key])
        assert doc["weights"] == {"blue": 40, "green": 60}
        assert doc["admin"] == {"g2": "draining"}
    finally:
        for cluster in clusters:
            await cluster.client.close()


async def test_etcd_user_and_password(etcd: EtcdServer, tmp_path: Path) -> None:
    from zdproxy.config.schema import EtcdConfig
    from zdproxy.control.shared import Cluster

    for path, body in (
        ("/v3/auth/user/add", {"name": "root", "password": "s3cret"}),
        ("/v3/auth/user/grant", {"user": "root", "role": "root"}),
        ("/v3/auth/enable", {}),
    ):
        etcd.call(path, body)
    secret = tmp_path / "etcd-password"
    secret.write_text("s3cret\n")
    good = EtcdConfig.model_validate(
        {
            "endpoints": [etcd.endpoint],
            "prefix": "/zdauth/",
            "auth": {"username": "root", "password_file": str(secret)},
        }
    )
    cluster = Cluster(good)
    cluster.add_service("default", _runtime(), None)
    try:
        await cluster._full_resync()
        assert cluster.available
        stored = await cluster.client.get("/zdauth/services/default/state")
        assert stored is not None and json.loads(stored.value)["weights"]["blue"] == 100
    finally:
        await cluster.client.close()
    secret.write_text("wrong\n")
    refused = Cluster(good)
    refused.add_service("default", _runtime(), None)
    try:
        with pytest.raises(EtcdError, match="authentication failed"):
            await refused._full_resync()
    finally:
        await refused.client.close()
    # unreadable credentials: zdproxy refuses to start, saying why
    pools = {"blue": {"weight": 100, "backends": [{"address": "127.0.0.1:9"}]}}
    config = shared_config(pools, etcd)
    config["state"]["etcd"]["auth"] = {"username": "root", "password_env": "ZDTEST_NO_SUCH_VAR"}
    proxy = AdminProxy(config, tmp_path)
    proxy.start(wait=False)
    assert proxy.wait(20) == 1
    assert "the environment variable ZDTEST_NO_SUCH_VAR (password_env) is not set" in proxy.log()
    proxy.stop()


async def test_etcd_over_tls(tmp_path: Path) -> None:
    from support_tls import Pki

    from zdproxy.config.schema import EtcdConfig
    from zdproxy.control.shared import Cluster

    pki = Pki(tmp_path / "pki")
    pair = pki.issue("etcd", "etcd", "localhost", ip="127.0.0.1")
    server = EtcdServer(tmp_path, tls=(pair.cert, pair.key, pki.ca)).start()
    try:
        trusted = EtcdConfig.model_validate(
            {"endpoints": [server.url], "prefix": "/zdtls/", "tls": {"ca": str(pki.ca)}}
        )
        cluster = Cluster(trusted)
        cluster.add_service("default", _runtime(), None)
        try:
            await cluster._full_resync()
            assert cluster.available
            assert "/zdtls/services/default/state" in server.get_prefix("/zdtls/")
        finally:
            await cluster.client.close()
        # without the CA, etcd's certificate is not trusted: no connection
        untrusted = Cluster(EtcdConfig(endpoints=(server.url,), prefix="/zdtls/"))
        untrusted.add_service("default", _runtime(), None)
        try:
            with pytest.raises(EtcdError, match=r"[Cc]ertificate"):
                await untrusted._full_resync()
        finally:
            await untrusted.client.close()
    finally:
        server.stop()


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
            await async_wait_for(lambda: _connected(admin_b), 10, "B connected")
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


async def test_an_instance_started_while_etcd_is_down_serves_and_catches_up(
    tmp_path: Path, etcd: EtcdServer
) -> None:
    blue, green = await Backend("blue", "blue").start(), await Backend("green", "green").start()
    etcd.stop()
    (a,) = instances(real_pools(blue, green), etcd, tmp_path, 1)
    try:
        async with AdminClient(a.admin_url) as admin, aiohttp.ClientSession() as session:
            assert await served_by(session, a.url) == "blue"
            view = await etcd_view(admin)
            assert view["connected"] is False and "unreachable" in view["error"]
            answer = await admin.call("POST", "/api/v1/flip", {"to": "green"})
            assert answer.status == 503, answer
            etcd.start()
            await async_wait_for(lambda: _connected(admin), 15, "connected after etcd started")
            await admin.ok("POST", "/api/v1/flip", {"to": "green"})
            doc = json.loads(etcd.get_prefix("/zdtest/")["/zdtest/services/default/state"])
            assert doc["weights"] == {"blue": 0, "green": 100}
            assert await served_by(session, a.url) == "green"
    finally:
        a.stop()
        await blue.stop()
        await green.stop()
