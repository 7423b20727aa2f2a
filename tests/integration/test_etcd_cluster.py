"""Shared state in etcd, continued: the rollout leader's death is survived at the
same step, the leader's analysis covers every instance's traffic, hot upgrades,
services, affinity, authentication, TLS, compaction, stale views.
"""

from __future__ import annotations

import asyncio
import json
import signal
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from support import Backend, async_wait_for, in_thread
from support_control import AdminClient, AdminProxy
from support_etcd import (
    EtcdServer,
    connected,
    etcd_view,
    instances,
    pool_weights,
    real_pools,
    served_by,
    shared_config,
    small_runtime,
)
from support_upgrade import UpgradingProxy, upgrade_config

from zdproxy.control.etcd import EtcdClient, EtcdCompacted, EtcdError, put_op


async def test_rollout_leader_killed_mid_rollout(tmp_path: Path, etcd: EtcdServer) -> None:
    blue, green = await Backend("blue", "blue").start(), await Backend("green", "green").start()
    procs = instances(real_pools(blue, green), etcd, tmp_path, 3)
    try:
        admins = [AdminClient(p.admin_url) for p in procs]
        for admin in admins:
            await admin.__aenter__()
        for admin in admins:
            await async_wait_for(lambda admin=admin: connected(admin), 10, "connected")

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
            return (await pool_weights(admins[follower]))["green"] == 60

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
            weights = await pool_weights(admins[survivors[0]])
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
        assert await pool_weights(admins[survivors[1]]) == {"blue": 0, "green": 100}
        for admin in admins:
            await admin.__aexit__(None, None, None)
    finally:
        for proc in procs:
            proc.stop()
        await blue.stop()
        await green.stop()


async def test_a_watch_from_a_compacted_revision_says_so(etcd: EtcdServer) -> None:
    """The client's watch from a compacted revision raises ``EtcdCompacted``;
    checked against the real server."""
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


async def test_commands_on_a_stale_view_are_rerun_on_the_current_state(etcd: EtcdServer) -> None:
    """Two instances in one process, neither watching: each sees the other's
    changes only through the compare-and-swap (deterministic staleness)."""
    from zdproxy.config.schema import EtcdConfig
    from zdproxy.control.shared import Cluster

    settings = EtcdConfig(endpoints=(etcd.endpoint,), prefix="/zdstale/")
    clusters = [Cluster(settings), Cluster(settings)]
    runtimes = [small_runtime(), small_runtime()]
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
    cluster.add_service("default", small_runtime(), None)
    try:
        await cluster._full_resync()
        assert cluster.available
        stored = await cluster.client.get("/zdauth/services/default/state")
        assert stored is not None and json.loads(stored.value)["weights"]["blue"] == 100
        # a token etcd no longer knows (they expire when idle) is replaced on the fly
        cluster.client._token = "expired.token"
        assert await cluster.client.get("/zdauth/services/default/state") is not None
    finally:
        await cluster.client.close()
    secret.write_text("wrong\n")
    refused = Cluster(good)
    refused.add_service("default", small_runtime(), None)
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
        cluster.add_service("default", small_runtime(), None)
        try:
            await cluster._full_resync()
            assert cluster.available
            assert "/zdtls/services/default/state" in server.get_prefix("/zdtls/")
        finally:
            await cluster.client.close()
        # without the CA, etcd's certificate is not trusted: no connection
        untrusted = Cluster(EtcdConfig(endpoints=(server.url,), prefix="/zdtls/"))
        untrusted.add_service("default", small_runtime(), None)
        try:
            with pytest.raises(EtcdError, match=r"[Cc]ertificate"):
                await untrusted._full_resync()
        finally:
            await untrusted.client.close()
    finally:
        server.stop()


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
            await async_wait_for(lambda: connected(admin), 15, "connected after etcd started")
            await admin.ok("POST", "/api/v1/flip", {"to": "green"})
            doc = json.loads(etcd.get_prefix("/zdtest/")["/zdtest/services/default/state"])
            assert doc["weights"] == {"blue": 0, "green": 100}
            assert await served_by(session, a.url) == "green"
    finally:
        a.stop()
        await blue.stop()
        await green.stop()


async def test_an_instance_whose_watch_revision_was_compacted_rereads_the_state(
    etcd: EtcdServer, caplog: pytest.LogCaptureFixture
) -> None:
    """B was cut off at an old revision; meanwhile A changed the state several
    times and etcd compacted its history. B's watch cannot resume there: it
    re-reads the whole state and converges."""
    from zdproxy.config.schema import EtcdConfig
    from zdproxy.control.shared import Cluster

    settings = EtcdConfig(endpoints=(etcd.endpoint,), prefix="/zdcompact/")
    writer, reader = Cluster(settings), Cluster(settings)
    ra, rb = small_runtime(), small_runtime()
    a = writer.add_service("default", ra, None)
    reader.add_service("default", rb, None)
    watch = None
    try:
        for cluster in (writer, reader):
            cluster.running = True
        cut_off_at = await writer._full_resync()
        await reader._full_resync()
        for blue in (90, 70, 30):
            await a.mutate(lambda blue=blue: ra.split({"blue": blue, "green": 100 - blue}, "a"), [])
        etcd.compact()
        assert rb.pool_weights == {"blue": 100, "green": 0}
        watch = asyncio.get_running_loop().create_task(reader._watch(cut_off_at))
        await async_wait_for(
            lambda: rb.pool_weights == {"blue": 30, "green": 70}, 10, "B re-read the state"
        )
        assert [e["after"]["blue"] for e in rb.events.list()] == [90, 70, 30]
        assert "revision compacted" in caplog.text and "re-reading the whole state" in caplog.text
        assert reader.available
    finally:
        if watch is not None:
            watch.cancel()
        for cluster in (writer, reader):
            await cluster.client.close()


async def test_a_wiped_or_damaged_prefix_is_rewritten_from_the_running_state(
    etcd: EtcdServer,
) -> None:
    from zdproxy.config.schema import EtcdConfig
    from zdproxy.control.shared import Cluster

    cluster = Cluster(EtcdConfig(endpoints=(etcd.endpoint,), prefix="/zdwipe/"))
    runtime = small_runtime()
    state = cluster.add_service("default", runtime, None)
    try:
        cluster.running = True
        await cluster._full_resync()
        await state.mutate(lambda: runtime.split({"blue": 60, "green": 40}, "ops"), [])
        # someone deletes the whole prefix, and leaves a broken event behind
        await cluster.client.delete_range("/zdwipe/", "/zdwipe0")
        await cluster.client.put(state.events_prefix + "000000000099", "{not json")
        await state.resync()
        doc = json.loads(etcd.get_prefix(state.state_key)[state.state_key])
        assert doc["weights"] == {"blue": 60, "green": 40}
        assert runtime.pool_weights == {"blue": 60, "green": 40}
        # and the next change goes on from there
        await state.mutate(lambda: runtime.split({"blue": 10, "green": 90}, "ops"), [])
        doc = json.loads(etcd.get_prefix(state.state_key)[state.state_key])
        assert doc["weights"] == {"blue": 10, "green": 90}
    finally:
        await cluster.client.close()


async def test_an_instance_whose_watch_died_silently_still_converges(etcd: EtcdServer) -> None:
    from zdproxy.config.schema import EtcdConfig
    from zdproxy.control.shared import Cluster

    settings = EtcdConfig(endpoints=(etcd.endpoint,), prefix="/zdsilent/", lease_ttl=2)
    writer, reader = Cluster(settings), Cluster(settings)
    ra, rb = small_runtime(), small_runtime()
    a = writer.add_service("default", ra, None)
    reader.add_service("default", rb, None)
    try:
        writer.running = True
        await writer._full_resync()
        await reader.start()
        watch = reader._tasks[0]
        watch.cancel()  # the watch stream is gone; nothing says so
        await a.mutate(lambda: ra.split({"blue": 20, "green": 80}, "a"), [])
        await async_wait_for(
            lambda: rb.pool_weights == {"blue": 20, "green": 80}, 10, "B converged without a watch"
        )
    finally:
        await reader.stop()
        await writer.client.close()
