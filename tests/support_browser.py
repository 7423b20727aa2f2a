"""Helpers for the dashboard tests: a real Chromium driven by Playwright, a
running site (backends, a real ``zdproxy run`` with its admin API), a load
generator and a backend that holds requests until told to answer.

The browser is Debian's ``chromium`` (``scripts/system-deps`` installs it), run
through Playwright's ``executable_path``: Playwright's own browser download is
never needed. Screenshots go to ``$ZDPROXY_TEST_ARTIFACTS`` (default
``test-artifacts/`` in the repository).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shutil
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web
from playwright.async_api import Browser, Page, async_playwright
from support import Backend, in_thread
from support_control import AdminClient, AdminProxy, admin_config

REPO = Path(__file__).resolve().parent.parent

#: flags for a headless Chromium on a machine without a network: without the
#: background-networking ones it tries to reach Google's services and stalls
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def chromium_path() -> str | None:
    """``$ZDPROXY_CHROMIUM``, else Debian's chromium, else None."""
    wanted = os.environ.get("ZDPROXY_CHROMIUM")
    if wanted:
        return wanted
    for candidate in ("/usr/bin/chromium", shutil.which("chromium") or ""):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    return None


def artifacts_dir() -> Path:
    path = Path(os.environ.get("ZDPROXY_TEST_ARTIFACTS") or REPO / "test-artifacts")
    path.mkdir(parents=True, exist_ok=True)
    return path


def artifact(name: str) -> Path:
    """A screenshot path: test name, made safe for a file name."""
    return artifacts_dir() / (re.sub(r"[^A-Za-z0-9_.-]+", "_", name) + ".png")


@contextlib.asynccontextmanager
async def chromium() -> AsyncIterator[Browser]:
    path = chromium_path()
    assert path is not None, "no chromium: run scripts/system-deps (apt-get install chromium)"
    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(executable_path=path, args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            await browser.close()


class HeldBackend(Backend):
    """A ``support.Backend`` whose ``/hold`` requests wait until ``release()``:
    in-flight requests that stay in flight exactly as long as a test wants."""

    def __init__(self, name: str, pool: str = "") -> None:
        super().__init__(name, pool)
        self.gate = asyncio.Event()
        self.held = 0

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/hold", self._hold)
        app.router.add_get("/status/{code}", self._status)
        app.router.add_route("*", "/{tail:.*}", self._index)
        return app

    async def _hold(self, request: web.Request) -> web.StreamResponse:
        self.held += 1
        try:
            await self.gate.wait()
        finally:
            self.held -= 1
        return web.Response(text=f"{self.name} held\n", headers={"X-Backend": self.name})

    def release(self) -> None:
        self.gate.set()


@dataclass
class Site:
    """Running backends (blue-1, blue-2, green-1, green-2) and the proxy."""

    proxy: AdminProxy
    backends: dict[str, HeldBackend]
    admin: AdminClient

    async def state(self) -> dict[str, Any]:
        return await self.admin.state()

    async def weights(self) -> dict[str, int]:
        pools = (await self.state())["pools"]
        return {name: pool["weight"] for name, pool in pools.items()}


@contextlib.asynccontextmanager
async def running_site(workdir: Path, **extra: Any) -> AsyncIterator[Site]:
    """Two pools of two real backends each, health-checked, behind a real zdproxy."""
    names = [(f"{pool}-{n}", pool) for pool in ("blue", "green") for n in (1, 2)]
    backends = {name: HeldBackend(name, pool) for name, pool in names}
    for backend in backends.values():
        await backend.start()
    pools = {
        pool: {
            "weight": 100 if pool == "blue" else 0,
            "backends": [
                {"id": b.name, "address": b.address} for b in backends.values() if b.pool == pool
            ],
        }
        for pool in ("blue", "green")
    }
    extra.setdefault("health_check", {"interval": "300ms", "timeout": "1s", "rise": 2, "fall": 3})
    config = admin_config(pools, workdir / "state.json", **extra)
    proxy = AdminProxy(config, workdir)
    try:
        # off the loop: the backends answer the first health checks meanwhile
        await in_thread(proxy.start)
        async with AdminClient(proxy.admin_url) as admin:
            yield Site(proxy, backends, admin)
    finally:
        for backend in backends.values():
            backend.release()
        await in_thread(proxy.stop)
        for backend in backends.values():
            await backend.stop()


@dataclass
class Load:
    """Keeps ``workers`` clients sending GETs through the proxy until stopped."""

    url: str
    workers: int = 4
    sent: int = 0
    statuses: dict[int, int] = field(default_factory=dict)
    _tasks: list[asyncio.Task[None]] = field(default_factory=list)
    _session: aiohttp.ClientSession | None = None
    _stopping: bool = False

    async def start(self) -> Load:
        self._session = aiohttp.ClientSession()
        self._tasks = [asyncio.create_task(self._run()) for _ in range(self.workers)]
        return self

    async def _run(self) -> None:
        assert self._session is not None
        while not self._stopping:
            async with self._session.get(self.url + "/load") as response:
                await response.read()
                self.sent += 1
                self.statuses[response.status] = self.statuses.get(response.status, 0) + 1
            await asyncio.sleep(0.01)  # bounded: about 100 requests/s per worker at most

    async def stop(self) -> None:
        """Let each worker finish its request: every request sent is counted."""
        self._stopping = True
        try:
            await asyncio.gather(*self._tasks)
        finally:
            if self._session is not None:
                await self._session.close()


class Dashboard:
    """The dashboard page, as an operator sees it (selectors in one place)."""

    def __init__(self, page: Page, url: str) -> None:
        self.page = page
        self.url = url
        self.dialogs: list[str] = []

    async def open(self) -> Dashboard:
        await self.page.goto(self.url + "/")
        return self

    async def login(self, token: str) -> None:
        await self.page.fill("#token", token)
        await self.page.click("#login button[type=submit]")

    def pool(self, name: str) -> Any:
        return self.page.locator(f'.pool[data-pool="{name}"]')

    def backend(self, backend_id: str) -> Any:
        return self.page.locator(f'tr[data-backend="{backend_id}"]')

    async def pool_figure(self, pool: str, key: str) -> str:
        return str(await self.pool(pool).locator(f".figures b.{key}").inner_text())

    async def backend_cell(self, backend_id: str, key: str) -> str:
        return str(await self.backend(backend_id).locator(f"td.{key}").inner_text())

    def answer_dialogs(self, accept: bool) -> None:
        """Accept (or dismiss) every confirmation from now on, noting its text."""
        self.page.remove_listener("dialog", self._accept)
        self.page.remove_listener("dialog", self._dismiss)
        self.page.on("dialog", self._accept if accept else self._dismiss)

    async def _accept(self, dialog: Any) -> None:
        self.dialogs.append(dialog.message)
        await dialog.accept()

    async def _dismiss(self, dialog: Any) -> None:
        self.dialogs.append(dialog.message)
        await dialog.dismiss()

    async def set_split(self, weights: dict[str, int]) -> None:
        for pool, weight in weights.items():
            await self.page.fill(f'#split-inputs input[data-pool="{pool}"]', str(weight))
        await self.page.click("#split-apply")

    async def screenshot(self, name: str) -> Path:
        path = artifact(name)
        await self.page.screenshot(path=str(path), full_page=True)
        return path
