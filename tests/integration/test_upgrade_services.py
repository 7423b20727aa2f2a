"""Hot upgrade (SIGUSR2) of a zdproxy with two services (real processes).

Each service's weights, backend admin states and events must reach the new
process, whether the state goes over the hand-over line (no ``state.path``) or
through the state files; traffic of both services under load during the
upgrade must not see one failure.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from support import Backend, async_wait_for, in_thread
from support_upgrade import UpgradingProxy, upgrade_config

pytestmark = pytest.mark.timeout(300)

SERVICES = ("shop", "api")
HOSTS = {"shop": "shop.test", "api": "api.test"}


class ServicesProxy(UpgradingProxy):
    """Several services and none named default: the un-prefixed state API
    answers 400, so the serving pid is read from ``/api/v1/services``."""

    def state(self) -> dict[str, Any]:
        status, body = self.api("GET", "/api/v1/services")
        assert status == 200, body
        return dict(body)

    def service_state(self, name: str) -> dict[str, Any]:
        status, body = self.api("GET", f"/api/v1/services/{name}/state")
        assert status == 200, body
        return dict(body)

    def service_events(self, name: str) -> list[dict[str, Any]]:
        status, body = self.api("GET", f"/api/v1/services/{name}/events?limit=1000")
        assert status == 200, body
        return list(body["events"])


@pytest.fixture
async def backends() -> AsyncIterator[list[Backend]]:
    names = ["shop-blue-1", "shop-green-1", "api-blue-1", "api-blue-2", "api-green-1"]
    started = [await Backend(name).start() for name in names]
    yield started
    for backend in started:
        await backend.stop()


def _config(backends: list[Backend], state_path: Path | None) -> dict[str, Any]:
    def pools(svc: str) -> dict[str, Any]:
        return {
            pool: {
                "weight": 100 if pool == "blue" else 0,
                "backends": [
                    {"address": b.address} for b in backends if b.name.startswith(f"{svc}-{pool}-")
                ],
            }
            for pool in ("blue", "green")
        }

    config = upgrade_config({}, state_path)
    del config["pools"]
    config["services"] = {svc: {"pools": pools(svc)} for svc in SERVICES}
    config["routes"] = [{"match": {"host": HOSTS[svc]}, "service": svc} for svc in SERVICES]
    return config


class ServiceLoad:
    """``clients`` keep-alive clients per service, each request with the
    service's Host; every answer must be a 200 from one of its backends."""

    def __init__(self, url: str, clients: int = 6) -> None:
        self.url = url + "/"
        self.clients = clients
        self.answers: dict[str, dict[str, int]] = {svc: {} for svc in SERVICES}
        self.failures: dict[str, list[str]] = {svc: [] for svc in SERVICES}
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []

    def total(self, svc: str) -> int:
        return sum(self.answers[svc].values()) + len(self.failures[svc])

    async def __aenter__(self) -> ServiceLoad:
        self._tasks = [
            asyncio.create_task(self._client(svc)) for svc in SERVICES for _ in range(self.clients)
        ]
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._stop.set()
        await asyncio.gather(*self._tasks)

    async def _client(self, svc: str) -> None:
        connector = aiohttp.TCPConnector(limit=1)
        timeout = aiohttp.ClientTimeout(total=30)
        async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
            while not self._stop.is_set():
                try:
                    async with session.get(self.url, headers={"Host": HOSTS[svc]}) as response:
                        body = (await response.read()).decode(errors="replace").strip()
                        if response.status != 200 or not body.startswith(f"{svc}-"):
                            self.failures[svc].append(f"{response.status} {body[:80]}")
                            continue
                        self.answers[svc][body] = self.answers[svc].get(body, 0) + 1
                except (aiohttp.ClientError, TimeoutError, OSError) as exc:
                    self.failures[svc].append(f"{type(exc).__name__}: {exc}")

    async def wait_requests(self, count: int) -> None:
        """Until each service answered ``count`` more requests."""
        targets = {svc: self.total(svc) + count for svc in SERVICES}
        await async_wait_for(
            lambda: all(self.total(svc) >= targets[svc] for svc in SERVICES),
            timeout=30,
            what=f"{count} more requests on each service",
        )


def _weights(state: dict[str, Any]) -> dict[str, int]:
    return {name: pool["weight"] for name, pool in state["pools"].items()}


def _admin(state: dict[str, Any]) -> dict[str, str]:
    return {b["id"]: b["admin"] for pool in state["pools"].values() for b in pool["backends"]}


def _backend_id(state: dict[str, Any], address: str) -> str:
    [found] = [
        b["id"]
        for pool in state["pools"].values()
        for b in pool["backends"]
        if b["address"] == address
    ]
    return str(found)


def _changes(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The operator's changes (the process's own upgrade events left out)."""
    return [e for e in events if not e["action"].startswith("process.")]


@pytest.mark.parametrize("saved", [False, True], ids=["handover-line", "state-path"])
async def test_two_services_keep_weights_admin_states_and_events_across_an_upgrade(
    backends: list[Backend], tmp_path: Path, saved: bool
) -> None:
    state_path = tmp_path / "state.json" if saved else None
    proxy = await in_thread(ServicesProxy(_config(backends, state_path), tmp_path).start)
    api = proxy.api
    try:
        # each service its own split; one backend of the second service drained
        splits = {"shop": {"blue": 70, "green": 30}, "api": {"blue": 40, "green": 60}}
        for svc, split in splits.items():
            status, body = await in_thread(api, "PUT", f"/api/v1/services/{svc}/split", split)
            assert status == 200, body
        api_state = await in_thread(proxy.service_state, "api")
        drained = _backend_id(api_state, backends[2].address)
        status, body = await in_thread(
            api, "POST", f"/api/v1/services/api/backends/{drained}/drain"
        )
        assert status == 200, body
        await async_wait_for(
            lambda: _admin(proxy.service_state("api"))[drained] == "drained",
            what="the api backend drained",
        )
        before = {svc: await in_thread(proxy.service_state, svc) for svc in SERVICES}
        events_before = {svc: await in_thread(proxy.service_events, svc) for svc in SERVICES}
        assert {svc: _weights(before[svc]) for svc in SERVICES} == splits
        assert _admin(before["api"])[drained] == "drained"
        assert set(_admin(before["shop"]).values()) == {"enabled"}
        for svc in SERVICES:
            actions = [e["action"] for e in _changes(events_before[svc])]
            assert "split" in " ".join(actions), (svc, actions)

        async with ServiceLoad(proxy.url) as load:
            await load.wait_requests(100)
            old = proxy.first_pid
            new = await in_thread(proxy.upgrade)
            await in_thread(proxy.wait_exited, old)
            await load.wait_requests(100)
        for svc in SERVICES:
            assert load.failures[svc] == [], (svc, load.failures[svc][:5])
        # the drained backend got nothing; every other backend of a weighted pool served
        assert set(load.answers["shop"]) == {"shop-blue-1", "shop-green-1"}
        assert set(load.answers["api"]) == {"api-blue-2", "api-green-1"}
        assert new != old and await in_thread(proxy.processes) == [new]

        after = {svc: await in_thread(proxy.service_state, svc) for svc in SERVICES}
        for svc in SERVICES:
            assert after[svc]["pid"] == new
            assert _weights(after[svc]) == splits[svc], svc
            assert _admin(after[svc]) == _admin(before[svc]), svc
            events = await in_thread(proxy.service_events, svc)
            # every change made before is there, same ids, same content
            assert _changes(events)[: len(_changes(events_before[svc]))] == _changes(
                events_before[svc]
            ), svc
            ids = [e["id"] for e in events]
            assert ids == sorted(set(ids)), (svc, ids)

        # a change in the new process continues each service's ids
        later = {"shop": {"blue": 20, "green": 80}, "api": {"blue": 50, "green": 50}}
        for svc in SERVICES:
            last = max(e["id"] for e in await in_thread(proxy.service_events, svc))
            status, body = await in_thread(api, "PUT", f"/api/v1/services/{svc}/split", later[svc])
            assert status == 200, body
            newest = (await in_thread(proxy.service_events, svc))[-1]
            assert newest["id"] > last and newest["action"] == "split", newest
            assert newest["before"] == splits[svc] and newest["after"] == later[svc], newest
        for svc in SERVICES:
            assert _weights(await in_thread(proxy.service_state, svc)) == later[svc], svc
    finally:
        await in_thread(proxy.stop)


def _backend(state: dict[str, Any], backend_id: str) -> dict[str, Any]:
    [found] = [b for p in state["pools"].values() for b in p["backends"] if b["id"] == backend_id]
    return dict(found)


async def test_health_verdicts_and_ejections_of_the_second_service_survive(
    tmp_path: Path,
) -> None:
    """Both in the service that is not the first: api-green-1 found down (it
    answers again just before the upgrade, so only the handed verdict keeps it
    down: ``rise`` is 5), and one api-blue backend ejected for 5 minutes."""
    names = ["shop-blue-1", "shop-green-1", "api-blue-1", "api-blue-2", "api-green-1"]
    backends = {name: await Backend(name).start() for name in names}
    config = _config(list(backends.values()), None)
    config["health_check"] = {"enabled": True, "interval": "1s", "rise": 5, "fall": 1}
    config["outlier_detection"] = {
        "consecutive_5xx": 3,
        "base_ejection_time": "5m",
        "max_ejection_percent": 50,
    }
    backends["api-green-1"].health_status = 500
    proxy = await in_thread(ServicesProxy(config, tmp_path).start)
    try:
        await async_wait_for(
            lambda: _backend(proxy.service_state("api"), "api-green-1")["health"] == "down",
            what="api-green-1 down",
        )
        async with aiohttp.ClientSession() as session:

            async def ejected() -> bool:
                headers = {"Host": HOSTS["api"]}
                async with session.get(proxy.url + "/status/500", headers=headers) as response:
                    await response.read()
                state = await in_thread(proxy.service_state, "api")
                return any(b["ejected"] for b in state["pools"]["blue"]["backends"])

            await async_wait_for(ejected, what="an ejection in api")
        before = await in_thread(proxy.service_state, "api")
        [out] = [b["id"] for b in before["pools"]["blue"]["backends"] if b["ejected"]]
        until = _backend(before, out)["health_checks"]["ejected_until"]
        backends["api-green-1"].health_status = 200

        old = proxy.first_pid
        new = await in_thread(proxy.upgrade)
        assert new != old
        after = await in_thread(proxy.service_state, "api")
        assert _backend(after, "api-green-1")["health"] == "down"
        assert [b["id"] for b in after["pools"]["blue"]["backends"] if b["ejected"]] == [out]
        checks = _backend(after, out)["health_checks"]
        assert checks["ejections_total"] == 1
        assert abs(checks["ejected_until"] - until) < 5  # the same end, not a fresh 5 min
        shop = await in_thread(proxy.service_state, "shop")
        assert {b["id"]: b["health"] for p in shop["pools"].values() for b in p["backends"]} == {
            "shop-blue-1": "up",
            "shop-green-1": "up",
        }
        assert not any(b["ejected"] for p in shop["pools"].values() for b in p["backends"])
        # api-green-1 rises on the new process's own checks
        await async_wait_for(
            lambda: _backend(proxy.service_state("api"), "api-green-1")["health"] == "up",
            30,
            "api-green-1 up",
        )
    finally:
        await in_thread(proxy.stop)
        for backend in backends.values():
            await backend.stop()


@pytest.mark.parametrize("saved", [False, True], ids=["handover-line", "state-path"])
async def test_a_rollout_of_the_second_service_goes_on_in_the_new_process(
    backends: list[Backend], tmp_path: Path, saved: bool
) -> None:
    state_path = tmp_path / "state.json" if saved else None
    proxy = await in_thread(ServicesProxy(_config(backends, state_path), tmp_path).start)
    api = proxy.api
    try:
        body = {
            "to": "green",
            "steps": [{"weight": 20, "pause": "10m"}, {"weight": 100}],
            "analysis": {"interval": "300ms", "min_requests": 1000000},
        }
        status, started = await in_thread(api, "POST", "/api/v1/services/api/rollouts", body)
        assert status in (200, 201), started
        current = "/api/v1/services/api/rollouts/current"
        _, before = await in_thread(api, "GET", current)
        new = await in_thread(proxy.upgrade)
        assert new != proxy.first_pid
        _, after = await in_thread(api, "GET", current)
        keys = ("id", "to", "phase", "step", "step_weight")
        assert {k: after["rollout"][k] for k in keys} == {k: before["rollout"][k] for k in keys}
        assert after["rollout"]["step_weight"] == 20
        assert _weights(await in_thread(proxy.service_state, "api")) == {"blue": 80, "green": 20}
        # the other service has no rollout and kept its weights
        status, _ = await in_thread(api, "GET", "/api/v1/services/shop/rollouts/current")
        assert status == 404
        assert _weights(await in_thread(proxy.service_state, "shop")) == {"blue": 100, "green": 0}
        # driven by the new process: abort sends api back to blue
        status, _ = await in_thread(api, "POST", current + "/abort", {})
        assert status == 200
        assert _weights(await in_thread(proxy.service_state, "api")) == {"blue": 100, "green": 0}
    finally:
        await in_thread(proxy.stop)
