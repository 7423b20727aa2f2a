"""The live figures the dashboard shows, as the state API gives them: requests/s,
error rate and p99 per pool and backend, over real traffic through a real proxy;
and the role of the token that asks."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import aiohttp
from support import async_wait_for
from support_browser import Site, running_site
from support_control import READ_TOKEN, AdminClient


async def _send(site: Site, path: str, count: int) -> None:
    async with aiohttp.ClientSession() as session:
        for _ in range(count):
            async with session.get(site.proxy.url + path) as response:
                await response.read()


async def test_state_figures_count_the_traffic(tmp_path: Path) -> None:
    async with running_site(tmp_path) as site:
        state = await site.state()
        assert state["token"] == {"name": "default", "role": "write"}
        blue = state["pools"]["blue"]["traffic"]
        assert blue["requests_total"] == 0 and blue["p99_ms"] is None

        await _send(site, "/ok", 30)
        await _send(site, "/status/500", 10)
        latest: dict[str, Any] = {}

        async def counted() -> bool:
            latest.update(await site.state())
            return bool(latest["pools"]["blue"]["traffic"]["requests"] == 40)

        # read once a second: within a few seconds the window holds all 40
        await async_wait_for(counted, 15, "the figures to count 40 requests")
        blue = latest["pools"]["blue"]["traffic"]
        assert blue["requests_total"] == 40
        assert blue["errors"] == 10 and blue["error_rate"] == 0.25
        assert 0 < blue["requests_per_second"] <= 40 / blue["window_s"] + 1e-3
        assert blue["p99_ms"] is not None and blue["p99_ms"] >= blue["p50_ms"] > 0
        backends = latest["pools"]["blue"]["backends"]
        assert sum(b["traffic"]["requests"] for b in backends) == 40
        assert sum(b["traffic"]["errors"] for b in backends) == 10
        for backend in backends:
            assert backend["traffic"]["requests"] == backend["requests"]
        green = latest["pools"]["green"]["traffic"]
        assert (green["requests"], green["requests_total"], green["p99_ms"]) == (0, 0, None)
        for backend in latest["pools"]["green"]["backends"]:
            assert backend["traffic"]["requests_per_second"] == 0.0

        async with AdminClient(site.proxy.admin_url, READ_TOKEN) as viewer:
            assert (await viewer.state())["token"] == {"name": "viewer", "role": "read"}
