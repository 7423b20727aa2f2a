"""Retries through a real zdproxy process: what is replayed and what never is.

Each backend's ``/reset`` takes the whole request, counts it, and drops the
connection without answering: a reset mid-exchange, after the request reached
the backend.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from support_health import Client, figure, running

#: health checks and outlier ejection out of the way: retries alone are tested
QUIET = {
    "health_check": {"enabled": False},
    "outlier_detection": {"enabled": False},
    "retries": {"attempts": 2},
}


async def _total(backends: dict, key: str) -> int:  # type: ignore[type-arg]
    return sum([(await b.counts())[key] for b in backends.values()])


async def test_post_is_never_replayed_after_reaching_a_backend(tmp_path: Path) -> None:
    async with running(tmp_path, {"blue": 3}, **QUIET) as (proxy, backends):
        client = Client(proxy.port)
        response = await client.request("POST", "/reset", body=b"order=42")
        posts = await _total(backends, "reset_POST")
        client.close()
    figure("POST reset mid-exchange", status=response.status, posts_received=posts)
    assert response.status == 502
    assert posts == 1


async def test_idempotent_requests_are_retried_on_other_backends(tmp_path: Path) -> None:
    async with running(tmp_path, {"blue": 3}, **QUIET) as (proxy, backends):
        client = Client(proxy.port)
        get = await client.request("GET", "/reset")
        gets = await _total(backends, "reset_GET")
        keyed = await client.request(
            "POST", "/reset", headers={"Idempotency-Key": "k-1"}, body=b"order=43"
        )
        posts = await _total(backends, "reset_POST")
        client.close()
    # 1 + attempts (2) tries, each on another backend, then the client learns
    assert (get.status, gets) == (502, 3)
    assert (keyed.status, posts) == (502, 3)


async def test_post_to_a_dead_backend_is_retried_exactly_once_elsewhere(tmp_path: Path) -> None:
    async with running(tmp_path, {"blue": 2}, **QUIET) as (proxy, backends):
        backends["blue-1"].kill()  # still in rotation: no checks, no ejection
        client = Client(proxy.port)
        statuses = []
        for i in range(20):
            response = await client.request("POST", "/orders", body=b"n=%d" % i)
            statuses.append(response.status)
        posts = (await backends["blue-2"].counts())["POST"]
        client.close()
    figure("POST with one of two backends dead", requests=20, failures=statuses.count(502))
    assert statuses == [200] * 20
    assert posts == 20


async def test_keepalive_race_on_pooled_connections_is_invisible(tmp_path: Path) -> None:
    """Backends restarted under the proxy leave dead pooled connections behind."""
    async with running(tmp_path, {"blue": 2}, **QUIET) as (proxy, backends):
        clients = [Client(proxy.port) for _ in range(10)]
        failures = 0
        total = 0
        for _ in range(3):
            results = await asyncio.gather(*(c.request("GET", "/") for c in clients))
            total += len(results)
            failures += sum(r.status != 200 for r in results)
            for backend in backends.values():
                backend.kill()
                await backend.start()
        results = await asyncio.gather(*(c.request("GET", "/") for c in clients))
        total += len(results)
        failures += sum(r.status != 200 for r in results)
        for c in clients:
            c.close()
    figure("keep-alive race after backend restarts", requests=total, failures=failures)
    assert failures == 0
