"""Helpers for the rollout tests: backends whose error rate and latency the test
sets, a keep-alive client load that records every answer, and a blue/green
proxy with the admin API. Real sockets only; waiting polls with a deadline."""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web
from support import Backend, async_wait_for
from support_control import AdminClient, AdminProxy, admin_config


class CanaryBackend(Backend):
    """Answers ``/`` with 200, or 500 with probability ``error_rate`` (seeded),
    after ``delay`` seconds."""

    def __init__(self, name: str, pool: str, seed: int = 0) -> None:
        super().__init__(name, pool)
        self.error_rate = 0.0
        self.rng = random.Random(seed)
        self.served = 0

    async def _index(self, request: web.Request) -> web.StreamResponse:
        await request.read()
        self.served += 1
        if self.delay:
            await asyncio.sleep(self.delay)
        if self.error_rate and self.rng.random() < self.error_rate:
            return web.Response(status=500, text="injected failure\n")
        return web.Response(text=f"{self.name}\n")


@dataclass(slots=True)
class Answer:
    started: float
    ended: float
    status: int
    pool: str


class Load:
    """``workers`` keep-alive clients (one connection each) sending GET / in a
    loop, ``pace`` seconds apart; every answer is kept."""

    def __init__(self, url: str, workers: int = 4, pace: float = 0.0) -> None:
        self.url = url + "/"
        self.workers = workers
        self.pace = pace
        self.answers: list[Answer] = []
        self._stop = False
        self._tasks: list[asyncio.Task[None]] = []

    def start(self) -> Load:
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._worker()) for _ in range(self.workers)]
        return self

    async def stop(self) -> None:
        self._stop = True
        await asyncio.gather(*self._tasks)

    async def _worker(self) -> None:
        connector = aiohttp.TCPConnector(limit=1, force_close=False)
        async with aiohttp.ClientSession(connector=connector) as session:
            while not self._stop:
                started = time.monotonic()
                try:
                    async with session.get(self.url) as response:
                        await response.read()
                        status, pool = response.status, response.headers.get("X-Zdproxy-Pool", "")
                except (aiohttp.ClientError, OSError):
                    status, pool = -1, ""
                self.answers.append(Answer(started, time.monotonic(), status, pool))
                if self.pace:
                    await asyncio.sleep(self.pace)

    def failed(self, since: float = 0.0) -> list[Answer]:
        return [a for a in self.answers if a.status != 200 and a.started >= since]

    def count(self, pool: str, since: float = 0.0) -> int:
        return sum(1 for a in self.answers if a.pool == pool and a.started >= since)


class Deployment:
    """Blue and green pools of real backends behind a real ``zdproxy run``."""

    def __init__(self, proxy: AdminProxy, backends: dict[str, list[CanaryBackend]]) -> None:
        self.proxy = proxy
        self.backends = backends
        self.admin = AdminClient(proxy.admin_url)

    def set(
        self, pool: str, *, error_rate: float | None = None, delay: float | None = None
    ) -> None:
        for backend in self.backends[pool]:
            if error_rate is not None:
                backend.error_rate = error_rate
            if delay is not None:
                backend.delay = delay

    async def start_rollout(self, plan: dict[str, Any]) -> dict[str, Any]:
        answer = await self.admin.call("POST", "/api/v1/rollouts", plan)
        assert answer.status == 201, answer
        rollout: dict[str, Any] = answer.json()["rollout"]
        return rollout

    async def current(self) -> dict[str, Any]:
        answer = await self.admin.call("GET", "/api/v1/rollouts/current")
        assert answer.status == 200, answer
        rollout: dict[str, Any] = answer.json()["rollout"]
        return rollout

    async def wait_phase(self, *phases: str, timeout: float = 60.0) -> dict[str, Any]:
        seen: dict[str, Any] = {}

        async def done() -> bool:
            seen.update(await self.current())
            return seen["phase"] in phases

        await async_wait_for(done, timeout, f"rollout phase in {phases}")
        return seen

    async def weights(self) -> dict[str, int]:
        state = await self.admin.state()
        return {name: pool["weight"] for name, pool in state["pools"].items()}


@contextlib.asynccontextmanager
async def deployment(
    workdir: Path, per_pool: int = 2, state: bool = True, **extra: Any
) -> AsyncIterator[Deployment]:
    backends = {
        pool: [
            await CanaryBackend(f"{pool}-{n}", pool, seed=n).start() for n in range(1, per_pool + 1)
        ]
        for pool in ("blue", "green")
    }
    pools = {
        pool: {
            "weight": 100 if pool == "blue" else 0,
            "backends": [{"id": b.name, "address": b.address} for b in members],
        }
        for pool, members in backends.items()
    }
    config = admin_config(pools, workdir / "state.json" if state else None, **extra)
    proxy = AdminProxy(config, workdir).start()
    deploy = Deployment(proxy, backends)
    try:
        async with deploy.admin:
            yield deploy
    finally:
        proxy.stop()
        for members in backends.values():
            for backend in members:
                await backend.stop()
