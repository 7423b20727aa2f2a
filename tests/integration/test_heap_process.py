"""A real ``zdproxy run`` freezes what start-up built (``zdproxy.heap``), in the
control process and in each worker, and settles again after a config reload."""

from __future__ import annotations

import re
import signal
from pathlib import Path
from typing import Any

from support import Backend, araw_request, async_wait_for, base_config, running

SETTLED = re.compile(r"heap settled: (\d+) objects frozen")


def _settled(log: str) -> list[int]:
    return [int(n) for n in SETTLED.findall(log)]


def _config(backend: Backend, **extra: Any) -> dict[str, Any]:
    pools = {"blue": {"weight": 100, "backends": [{"address": backend.address}]}}
    return base_config(pools, log={"level": "debug"}, **extra)


async def test_start_and_reload_settle_the_heap(tmp_path: Path) -> None:
    backend = await Backend("b1").start()
    try:
        with running(_config(backend), tmp_path) as proxy:
            await async_wait_for(lambda: len(_settled(proxy.log())) == 1, what="settled at start")
            # modules, config and app: far more than a few thousand objects
            assert _settled(proxy.log())[0] > 20_000
            answer = await araw_request(proxy.port, b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
            assert answer.startswith(b"HTTP/1.1 200 ")
            proxy.signal(signal.SIGHUP)
            await async_wait_for(
                lambda: len(_settled(proxy.log())) == 2, what="settled after the reload"
            )
            assert "config reload by sighup" in proxy.log()
    finally:
        await backend.stop()


async def test_each_worker_settles_its_heap(tmp_path: Path) -> None:
    backend = await Backend("b1").start()
    try:
        with running(_config(backend, workers=2), tmp_path) as proxy:
            # the control process and two workers
            await async_wait_for(
                lambda: len(_settled(proxy.log())) == 3, what="three processes settled"
            )
            assert min(_settled(proxy.log())) > 20_000
            # a reload: the control process and each worker again
            proxy.signal(signal.SIGHUP)
            await async_wait_for(
                lambda: len(_settled(proxy.log())) == 6, what="three processes settled again"
            )
    finally:
        await backend.stop()
