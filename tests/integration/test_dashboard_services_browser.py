"""The dashboard with several services, in a real browser (Debian's Chromium
driven by Playwright) against a real ``zdproxy run`` with real backends.

With more than one service (or none named ``default``) the page shows a service
selector and every call goes to ``/api/v1/services/{name}/...``: a split, flip
or drain made in the page for one service must change that service only, which
is checked through the API.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from playwright.async_api import expect
from support import async_wait_for, in_thread
from support_browser import Dashboard, HeldBackend, chromium
from support_control import TOKEN, AdminClient, AdminProxy, admin_config

WAIT_MS = 15_000
#: non-2xx fetches the page expects (404 before any rollout) are not page errors
EXPECTED_CONSOLE = re.compile(r"Failed to load resource: the server responded with a status of")

pytestmark = pytest.mark.timeout(180)


def _pools(backends: dict[str, HeldBackend], prefix: str) -> dict[str, Any]:
    return {
        pool: {
            "weight": 100 if pool == "blue" else 0,
            "backends": [
                {"id": name, "address": b.address}
                for name, b in backends.items()
                if name.startswith(f"{prefix}{pool}-")
            ],
        }
        for pool in ("blue", "green")
    }


@contextlib.asynccontextmanager
async def services_site(
    workdir: Path, with_default: bool
) -> AsyncIterator[tuple[AdminProxy, AdminClient]]:
    """``with_default``: top-level pools (the service default, ids blue-1...)
    beside the service api (api-blue-1...); else the services shop and api."""
    first = "" if with_default else "shop-"
    names = [f"{svc}{pool}-1" for svc in (first, "api-") for pool in ("blue", "green")]
    backends = {name: HeldBackend(name) for name in names}
    for backend in backends.values():
        await backend.start()
    config = admin_config(
        _pools(backends, first) if with_default else {},
        workdir / "state.json",
        health_check={"enabled": False},
    )
    services = {"api": {"pools": _pools(backends, "api-")}}
    if with_default:
        routes = [{"match": {"host": "api.test"}, "service": "api"}]
        config["default_service"] = "default"
    else:
        del config["pools"]
        services = {"shop": {"pools": _pools(backends, "shop-")}, **services}
        routes = [
            {"match": {"host": "api.test"}, "service": "api"},
            {"match": {"host": "shop.test"}, "service": "shop"},
        ]
    config["services"] = services
    config["routes"] = routes
    proxy = AdminProxy(config, workdir)
    try:
        await in_thread(proxy.start)
        async with AdminClient(proxy.admin_url) as admin:
            yield proxy, admin
    finally:
        for backend in backends.values():
            backend.release()
        await in_thread(proxy.stop)
        for backend in backends.values():
            await backend.stop()


@contextlib.asynccontextmanager
async def open_dashboard(url: str, shot: str) -> AsyncIterator[Dashboard]:
    async with chromium() as browser:
        page = await browser.new_page(viewport={"width": 1280, "height": 1000})
        problems: list[str] = []
        page.on("pageerror", lambda exc: problems.append(f"page error: {exc}"))
        page.on(
            "console",
            lambda msg: (
                problems.append(f"console: {msg.text}")
                if msg.type == "error" and not EXPECTED_CONSOLE.search(msg.text)
                else None
            ),
        )
        board = await Dashboard(page, url).open()
        try:
            yield board
        finally:
            await board.screenshot(shot)
        assert problems == []


async def weights(admin: AdminClient, service: str) -> dict[str, int]:
    response = await admin.call("GET", f"/api/v1/services/{service}/state")
    assert response.status == 200, response.json()
    return {name: pool["weight"] for name, pool in response.json()["pools"].items()}


async def admin_state(admin: AdminClient, service: str, backend_id: str) -> str:
    response = await admin.call("GET", f"/api/v1/services/{service}/state")
    [found] = [
        b["admin"]
        for pool in response.json()["pools"].values()
        for b in pool["backends"]
        if b["id"] == backend_id
    ]
    return str(found)


async def test_selected_service_gets_the_split_flip_and_drain(tmp_path: Path) -> None:
    async with (
        services_site(tmp_path, with_default=True) as (proxy, admin),
        open_dashboard(proxy.admin_url, "services-select-split-flip") as board,
    ):
        page = board.page
        await board.login(TOKEN)
        picker = page.locator("#service")
        # several services: the selector shows, on default first
        await expect(page.locator("#service-pick")).to_be_visible(timeout=WAIT_MS)
        assert await picker.locator("option").all_inner_texts() == ["default", "api"]
        await expect(picker).to_have_value("default")
        await expect(board.backend("blue-1")).to_be_visible(timeout=WAIT_MS)

        await picker.select_option("api")
        await expect(board.backend("api-blue-1")).to_be_visible(timeout=WAIT_MS)
        await expect(board.backend("blue-1")).to_have_count(0)
        await expect(page.locator("#meta")).to_contain_text("service api")
        assert await page.evaluate("sessionStorage.getItem('zdproxy-service')") == "api"

        # a large split asks first; accepted, it changes api only
        board.answer_dialogs(accept=True)
        await board.set_split({"blue": 30, "green": 70})
        await async_wait_for(
            lambda: _is(weights(admin, "api"), {"blue": 30, "green": 70}), 10, "api at 30/70"
        )
        assert len(board.dialogs) == 1 and "70 points" in board.dialogs[0]
        assert await weights(admin, "default") == {"blue": 100, "green": 0}
        await expect(board.pool("green").locator(".pool-weight")).to_have_text(
            "70 %", timeout=WAIT_MS
        )
        newest = page.locator("#events tbody tr").first
        await expect(newest.locator("td.action")).to_have_text("split", timeout=WAIT_MS)

        # a flip, dismissed, changes nothing; accepted, it flips api only
        board.answer_dialogs(accept=False)
        await board.pool("green").locator("button.flip").click()
        await expect(page.locator("#flash")).to_have_text("Flip cancelled.")
        assert await weights(admin, "api") == {"blue": 30, "green": 70}
        board.answer_dialogs(accept=True)
        await board.pool("green").locator("button.flip").click()
        await async_wait_for(
            lambda: _is(weights(admin, "api"), {"blue": 0, "green": 100}), 10, "api flipped"
        )
        assert len(board.dialogs) == 3 and "100 % of new traffic to green" in board.dialogs[2]
        assert await weights(admin, "default") == {"blue": 100, "green": 0}

        # a backend action goes to the selected service's backend
        await board.backend("api-blue-1").locator("button.drain").click()
        await async_wait_for(
            lambda: _in(admin_state(admin, "api", "api-blue-1"), {"draining", "drained"}),
            10,
            "api-blue-1 draining",
        )
        assert await admin_state(admin, "default", "blue-1") == "enabled"
        await expect(page.locator("#error")).to_be_hidden()

        # the choice stays for this tab: after a reload the page shows api again
        await page.reload()
        await expect(board.backend("api-blue-1")).to_be_visible(timeout=WAIT_MS)
        await expect(page.locator("#service")).to_have_value("api")
        # back to default: its cards, its unchanged split
        await page.locator("#service").select_option("default")
        await expect(board.backend("blue-1")).to_be_visible(timeout=WAIT_MS)
        await expect(board.pool("blue").locator(".pool-weight")).to_have_text("100 %")
        await expect(page.locator("#meta")).to_contain_text("service default")


async def test_no_default_service_loads_the_first_and_switches(tmp_path: Path) -> None:
    async with (
        services_site(tmp_path, with_default=False) as (proxy, admin),
        open_dashboard(proxy.admin_url, "services-no-default") as board,
    ):
        # the un-prefixed state API refuses here: the page must not use it
        unprefixed = await admin.call("GET", "/api/v1/state")
        assert unprefixed.status == 400
        page = board.page
        await board.login(TOKEN)
        await expect(board.backend("shop-blue-1")).to_be_visible(timeout=WAIT_MS)
        await expect(page.locator("#service")).to_have_value("shop")
        assert await page.locator("#service option").all_inner_texts() == ["shop", "api"]
        await expect(board.pool("blue").locator(".pool-weight")).to_have_text("100 %")
        await page.locator("#service").select_option("api")
        await expect(board.backend("api-blue-1")).to_be_visible(timeout=WAIT_MS)
        await expect(board.backend("shop-blue-1")).to_have_count(0)
        # the rollout shown and its controls are the selected service's
        body = {
            "to": "green",
            "steps": [{"weight": 20, "pause": "10m"}, {"weight": 100}],
            # no verdict within the test: only the operator pauses it
            "analysis": {"interval": "10m"},
        }
        started = await admin.call("POST", "/api/v1/services/api/rollouts", body)
        assert started.status == 201, started.json()
        current = "/api/v1/services/api/rollouts/current"
        assert await _phase(admin, current) == "progressing"
        pause = page.locator("#rollout-body button.rollout-pause")
        await expect(pause).to_be_enabled(timeout=WAIT_MS)
        await pause.click()
        await async_wait_for(
            lambda: _is(_phase(admin, current), "paused"), 10, "api's rollout paused"
        )
        await expect(page.locator("#rollout-body .phase")).to_have_text("paused", timeout=WAIT_MS)
        events = (await admin.call("GET", "/api/v1/services/api/events")).json()["events"]
        assert [e["actor"] for e in events if e["action"] == "rollout.pause"] == ["default"]
        assert (await admin.call("GET", "/api/v1/services/shop/rollouts/current")).status == 404
        # a few polls go by without an error banner
        updated = await page.locator("#updated").inner_text()
        await expect(page.locator("#updated")).not_to_have_text(updated, timeout=WAIT_MS)
        await expect(page.locator("#error")).to_be_hidden()
        await expect(page.locator("#main")).to_be_visible()


async def _phase(admin: AdminClient, path: str) -> str:
    return str((await admin.call("GET", path)).json()["rollout"]["phase"])


async def _is(value: Any, wanted: Any) -> bool:
    return bool(await value == wanted)


async def _in(value: Any, wanted: set[str]) -> bool:
    return bool(await value in wanted)
