#!/usr/bin/env python3
"""Rollout figures (a benchmark, not a test): ``python benchmarks/rollout_bench.py``.

1. The data-path cost of what analysis needs per request: ``PoolStats.record``
   (cumulative class counts and the log-scale histogram added for analysis)
   against the same method without them, timed with ``timeit``.
2. A bad canary at 10 % weight under keep-alive load through a real
   ``zdproxy run``: how long until traffic is back on the baseline, and the
   share of all requests of the rollout window that the canary hurt.

Everything on loopback; the machine is shared, so read ratios and orders of
magnitude, not the last digit.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import socket
import subprocess
import sys
import tempfile
import time
import timeit
from bisect import bisect_left
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

import aiohttp  # noqa: E402
import yaml  # noqa: E402
from aiohttp import web  # noqa: E402

from zdproxy.balancing.stats import LATENCY_BUCKETS, PoolStats, WindowBucket  # noqa: E402

TOKEN = "bench-token-0123456789abcdef"


class StatsBefore:
    """``PoolStats.record`` as it was before rollout analysis (for comparison)."""

    __slots__ = ("_ring", "count", "histogram", "latency_sum", "window_seconds")

    def __init__(self, window_seconds: int = 300) -> None:
        self.window_seconds = window_seconds
        self._ring = [WindowBucket() for _ in range(window_seconds)]
        self.histogram = [0] * (len(LATENCY_BUCKETS) + 1)
        self.latency_sum = 0.0
        self.count = 0

    def record(self, status: int, seconds: float, now: float) -> None:
        index = bisect_left(LATENCY_BUCKETS, seconds)
        self.histogram[index] += 1
        self.latency_sum += seconds
        self.count += 1
        second = int(now)
        bucket = self._ring[second % self.window_seconds]
        if bucket.second != second:
            bucket.reset(second)
        bucket.classes[status // 100 if 100 <= status < 600 else 0] += 1
        bucket.latency[index] += 1


def record_cost(rounds: int) -> dict[str, float]:
    rng = random.Random(1)
    latencies = [rng.lognormvariate(-6, 1) for _ in range(1024)]
    results: dict[str, float] = {}
    number = 200_000
    for name, stats in (("before", StatsBefore()), ("now", PoolStats())):
        record = stats.record

        def run(record: Any = record) -> None:
            for i in range(number):
                record(200, latencies[i & 1023], 1000.5)

        results[name] = min(timeit.repeat(run, number=1, repeat=rounds)) / number * 1e9
    loop_only = min(
        timeit.repeat(lambda: [latencies[i & 1023] for i in range(number)], number=1, repeat=rounds)
    )
    results["loop"] = loop_only / number * 1e9
    return results


# ---- a bad canary through a real process --------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


async def backend(name: str, error_rate: float, seed: int) -> tuple[web.AppRunner, int]:
    rng = random.Random(seed)

    async def index(request: web.Request) -> web.Response:
        if error_rate and rng.random() < error_rate:
            return web.Response(status=500, text="bad canary\n")
        return web.Response(text=f"{name}\n")

    app = web.Application()
    app.router.add_get("/", index)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    return runner, port


async def wait_port(port: int, timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.close()
            return
        except OSError:
            await asyncio.sleep(0.05)
    raise RuntimeError(f"nothing listens on {port}")


async def bad_canary(error_rate: float, weight: int, interval: str, workers: int) -> dict[str, Any]:
    runners = []
    pools: dict[str, Any] = {}
    for pool, rate in (("blue", 0.0), ("green", error_rate)):
        members = []
        for n in (1, 2):
            runner, port = await backend(f"{pool}-{n}", rate, n)
            runners.append(runner)
            members.append({"id": f"{pool}-{n}", "address": f"127.0.0.1:{port}"})
        pools[pool] = {"weight": 100 if pool == "blue" else 0, "backends": members}
    port, admin_port = free_port(), free_port()
    config = {
        "listen": [f"127.0.0.1:{port}"],
        "admin": {"listen": f"127.0.0.1:{admin_port}", "token_env": "ZDPROXY_ADMIN_TOKEN"},
        "state": {"path": None},
        "health_check": {"enabled": False},
        "pools": pools,
    }
    workdir = tempfile.mkdtemp(prefix="zdproxy-rollout-bench-")
    path = os.path.join(workdir, "zdproxy.yaml")
    with open(path, "w") as f:
        yaml.safe_dump(config, f)
    env = {**os.environ, "ZDPROXY_ADMIN_TOKEN": TOKEN, "PYTHONPATH": str(HERE.parent)}
    with open(os.path.join(workdir, "zdproxy.log"), "wb") as log_file:
        proc = subprocess.Popen(
            [sys.executable, "-m", "zdproxy.cli", "run", "-c", path],
            stdout=log_file,
            stderr=subprocess.STDOUT,
            env=env,
        )
    answers: list[tuple[float, int, str]] = []
    stop = False

    async def client() -> None:
        connector = aiohttp.TCPConnector(limit=1)
        async with aiohttp.ClientSession(connector=connector) as session:
            while not stop:
                async with session.get(f"http://127.0.0.1:{port}/") as response:
                    await response.read()
                    pool = response.headers.get("X-Zdproxy-Pool", "")
                    answers.append((time.monotonic(), response.status, pool))

    headers = {"Authorization": f"Bearer {TOKEN}"}
    admin = f"http://127.0.0.1:{admin_port}/api/v1"
    try:
        await wait_port(port)
        await wait_port(admin_port)
        tasks = [asyncio.create_task(client()) for _ in range(workers)]
        await asyncio.sleep(1.0)
        plan = {
            "to": "green",
            "steps": [{"weight": weight, "pause": "60s"}, {"weight": 100}],
            "analysis": {"interval": interval, "min_requests": 50, "max_error_rate": 0.01},
        }
        async with aiohttp.ClientSession(headers=headers) as api:
            started = time.monotonic()
            async with api.post(f"{admin}/rollouts", json=plan) as response:
                assert response.status == 201, await response.text()
            while True:
                async with api.get(f"{admin}/rollouts/current") as response:
                    rollout = (await response.json())["rollout"]
                if not rollout["active"] and "rollback_seconds" in rollout["kpis"]:
                    break
                await asyncio.sleep(0.05)
            seen = time.monotonic()
            await asyncio.sleep(1.0)
            stop = True
            await asyncio.gather(*tasks)
            async with api.get(f"{admin}/rollouts") as response:
                kpis = (await response.json())["rollouts"][0]["kpis"]
    finally:
        proc.terminate()
        proc.wait(20)
        for runner in runners:
            await runner.cleanup()
    window = [a for a in answers if started <= a[0] <= seen]
    hurt = [a for a in window if a[1] != 200]
    last_green = max((a[0] for a in answers if a[2] == "green"), default=started)
    return {
        "phase": rollout["phase"],
        "reason": rollout["reason"],
        "kpis": kpis,
        "requests_in_window": len(window),
        "hurt": len(hurt),
        "hurt_share": len(hurt) / len(window) if window else 0.0,
        "client_seconds_to_last_green_answer": round(last_green - started, 3),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--error-rate", type=float, default=1.0, help="the canary's (default 1.0)")
    parser.add_argument("--weight", type=int, default=10)
    parser.add_argument("--interval", default="1s")
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    cost = record_cost(args.rounds)
    print(
        f"PoolStats.record: {cost['now'] - cost['loop']:.0f} ns/request now, "
        f"{cost['before'] - cost['loop']:.0f} ns before analysis "
        f"(loop overhead {cost['loop']:.0f} ns subtracted)"
    )
    for run in range(args.runs):
        result = asyncio.run(bad_canary(args.error_rate, args.weight, args.interval, args.workers))
        print(json.dumps({"run": run + 1, **result}, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
