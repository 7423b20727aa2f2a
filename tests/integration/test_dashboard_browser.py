"""The dashboard in a real browser: Debian's Chromium driven by Playwright, against
a real ``zdproxy run`` with real backends. Every check waits on a condition (the
page polls the API once a second); what the page shows is compared with what
the API says. Screenshots of every test go to ``$ZDPROXY_TEST_ARTIFACTS``.

``ZDPROXY_DOCS_SCREENSHOTS=1`` also writes the screenshots of docs/dashboard.md
(docs/img/) from ``test_rollout_controls_and_screenshots_under_load``.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from playwright.async_api import expect
from support import async_wait_for
from support_browser import (
    REPO,
    Dashboard,
    Load,
    Site,
    chromium,
    running_site,
)
from support_control import READ_TOKEN, TOKEN

#: what the page shows for a figure it has no value for (an en dash)
NO_VALUE = "\u2013"
#: a rate of nothing: no value yet, or zero
NO_RATE = re.compile(rf"^(0\.00|{NO_VALUE})$")

#: the page polls once a second; a figure over a 10 s window moves within a few polls
WAIT_MS = 15_000

#: Chromium reports every non-2xx fetch on the console; the page expects some
#: (403 for a wrong token, 404 before any rollout): not errors of the page
EXPECTED_CONSOLE = re.compile(r"Failed to load resource: the server responded with a status of")


@pytest.fixture
async def site(tmp_path: Path) -> AsyncIterator[Site]:
    async with running_site(tmp_path) as running:
        yield running


@pytest.fixture
async def dashboard(site: Site, request: pytest.FixtureRequest) -> AsyncIterator[Dashboard]:
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
        board = await Dashboard(page, site.proxy.admin_url).open()
        try:
            yield board
        finally:
            await board.screenshot(request.node.name)
        # a script error or a CSP refusal (inline code, a foreign origin) fails the test
        assert problems == []


async def login(board: Dashboard, token: str = TOKEN) -> None:
    await expect(board.page.locator("#login")).to_be_visible()
    await expect(board.page.locator("#main")).to_be_hidden()
    await board.login(token)
    await expect(board.pool("blue").locator(".pool-weight")).to_have_text("100 %", timeout=WAIT_MS)


async def through_proxy(site: Site, path: str, count: int) -> list[int]:
    async with aiohttp.ClientSession() as session:
        statuses = []
        for _ in range(count):
            async with session.get(site.proxy.url + path) as response:
                await response.read()
                statuses.append(response.status)
        return statuses


async def test_login_and_live_figures_under_load(site: Site, dashboard: Dashboard) -> None:
    page = dashboard.page
    await login(dashboard)
    assert await page.evaluate("sessionStorage.getItem('zdproxy-admin-token')") == TOKEN
    assert await page.locator("#token").input_value() == ""  # not left in the form
    # health detail: the last check's result and the progress toward a change
    for backend_id in ("blue-1", "blue-2", "green-1", "green-2"):
        await expect(dashboard.backend(backend_id).locator("td.state")).to_have_text("up")
        health = dashboard.backend(backend_id).locator("td.health")
        await expect(health).to_contain_text("HTTP 200")
        await expect(health).to_contain_text("failures 0/3 to down")
    await expect(page.locator("#whoami")).to_have_text("token: default (write)")
    # one service (default): no service selector, the un-prefixed API
    await expect(page.locator("#service-pick")).to_be_hidden()
    assert not (await page.locator("#meta").inner_text()).startswith("service")
    # no traffic yet
    await expect(dashboard.backend("blue-1").locator("td.requests")).to_have_text("0")
    assert await dashboard.pool_figure("blue", "p99") == NO_VALUE

    load = await Load(site.proxy.url, workers=4).start()
    try:
        rps = dashboard.pool("blue").locator(".figures b.rps")
        await expect(rps).not_to_have_text(NO_RATE, timeout=WAIT_MS)
        await expect(dashboard.pool("blue").locator(".figures b.p99")).to_have_text(
            re.compile(r"^\d+(\.\d+)? m?s$"), timeout=WAIT_MS
        )
        for backend_id in ("blue-1", "blue-2"):
            cell = dashboard.backend(backend_id).locator("td.rps")
            await expect(cell).not_to_have_text(NO_RATE, timeout=WAIT_MS)
        # green takes no traffic at weight 0
        assert await dashboard.backend_cell("green-1", "requests") == "0"
        # the chart drew blue's series from the page's own polls
        line = page.locator('#chart polyline[data-pool="blue"]')
        await expect(line).to_have_attribute(
            "points", re.compile(r"^\S+,\S+( \S+,\S+){2,}$"), timeout=WAIT_MS
        )
        await dashboard.screenshot("live-figures-under-load")
    finally:
        await load.stop()
    assert set(load.statuses) == {200} and load.sent > 0
    # once the load stopped, the page's counters are the API's, backend by backend
    state = await site.state()
    for backend in state["pools"]["blue"]["backends"]:
        cell = dashboard.backend(backend["id"]).locator("td.requests")
        await expect(cell).to_have_text(str(backend["requests"]), timeout=WAIT_MS)
    total = sum(b["requests"] for b in state["pools"]["blue"]["backends"])
    assert total == load.sent
    # errors show up as an error rate, for the pool and the backend that answered them
    assert await through_proxy(site, "/status/500", 6) == [500] * 6
    errors = dashboard.pool("blue").locator(".figures b.errors")
    await expect(errors).not_to_have_text(re.compile(rf"^(0 %|{NO_VALUE})$"), timeout=WAIT_MS)
    for backend_id in ("blue-1", "blue-2"):
        cell = dashboard.backend(backend_id).locator("td.errors")
        await expect(cell).not_to_have_text("0 %", timeout=WAIT_MS)


async def test_split_asks_before_a_large_move(site: Site, dashboard: Dashboard) -> None:
    page = dashboard.page
    await login(dashboard)
    apply = page.locator("#split-apply")
    await expect(apply).to_be_disabled()  # nothing changed yet
    # a sum other than 100 cannot be sent
    await page.fill('#split-inputs input[data-pool="green"]', "30")
    await expect(page.locator("#split-sum")).to_have_text("sum 130 %")
    await expect(apply).to_be_disabled()

    # a small move goes without a question (an unexpected dialog would be dismissed
    # by Playwright, and the split not applied)
    await dashboard.set_split({"blue": 80, "green": 20})
    await async_wait_for(
        lambda: _weights_are(site, {"blue": 80, "green": 20}), 10, "the 80/20 split"
    )
    await expect(dashboard.pool("green").locator(".pool-weight")).to_have_text("20 %")
    assert dashboard.dialogs == []

    # a large one asks (50 points is large); dismissed, nothing changes
    events_before = len((await site.admin.call("GET", "/api/v1/events")).json()["events"])
    dashboard.answer_dialogs(accept=False)
    await dashboard.set_split({"blue": 30, "green": 70})
    await expect(page.locator("#flash")).to_have_text("Split not applied.")
    assert len(dashboard.dialogs) == 1
    assert "50 points" in dashboard.dialogs[0]
    assert "blue 80 % → 30 %, green 20 % → 70 %" in dashboard.dialogs[0]
    # so is a small move that gives a pool everything
    await page.click("#split-reset")
    await expect(page.locator('#split-inputs input[data-pool="blue"]')).to_have_value("80")
    await dashboard.set_split({"blue": 100, "green": 0})
    await async_wait_for(lambda: len(dashboard.dialogs) == 2, 10, "the second question")
    assert "100 % of new traffic to blue" in dashboard.dialogs[1]
    assert await site.weights() == {"blue": 80, "green": 20}
    events = (await site.admin.call("GET", "/api/v1/events")).json()["events"]
    assert len(events) == events_before

    # accepted, it is applied and shows in the page and in the change log
    dashboard.answer_dialogs(accept=True)
    await dashboard.set_split({"blue": 20, "green": 80})
    await async_wait_for(
        lambda: _weights_are(site, {"blue": 20, "green": 80}), 10, "the 20/80 split"
    )
    assert len(dashboard.dialogs) == 3
    assert "60 points" in dashboard.dialogs[2]
    await expect(dashboard.pool("green").locator(".pool-weight")).to_have_text(
        "80 %", timeout=WAIT_MS
    )
    newest = page.locator("#events tbody tr").first
    await expect(newest.locator("td.action")).to_have_text("split", timeout=WAIT_MS)
    await expect(newest.locator("td.change")).to_have_text("blue=80 green=20 → blue=20 green=80")
    await expect(newest.locator("td").nth(1)).to_have_text("default")


async def _weights_are(site: Site, wanted: dict[str, int]) -> bool:
    return await site.weights() == wanted


async def test_flip_needs_confirmation(site: Site, dashboard: Dashboard) -> None:
    await login(dashboard)
    flip_green = dashboard.pool("green").locator("button.flip")
    await expect(dashboard.pool("blue").locator("button.flip")).to_be_disabled()  # at 100 %
    dashboard.answer_dialogs(accept=False)
    await flip_green.click()
    await expect(dashboard.page.locator("#flash")).to_have_text("Flip cancelled.")
    assert "100 % of new traffic to green" in dashboard.dialogs[0]
    assert await site.weights() == {"blue": 100, "green": 0}

    dashboard.answer_dialogs(accept=True)
    await flip_green.click()
    await async_wait_for(lambda: _weights_are(site, {"blue": 0, "green": 100}), 10, "the flip")
    await expect(dashboard.pool("green").locator(".pool-weight")).to_have_text(
        "100 %", timeout=WAIT_MS
    )
    await expect(dashboard.pool("blue").locator(".pool-weight")).to_have_text("0 %")
    await expect(flip_green).to_be_disabled()
    # the split form follows the new weights
    await expect(dashboard.page.locator('#split-inputs input[data-pool="green"]')).to_have_value(
        "100"
    )
    # and traffic follows
    async with aiohttp.ClientSession() as session, session.get(site.proxy.url + "/") as answer:
        assert answer.headers["X-Zdproxy-Pool"] == "green"


async def test_health_detail_follows_a_failing_backend(site: Site, dashboard: Dashboard) -> None:
    await login(dashboard)
    row = dashboard.backend("green-2")
    await expect(row.locator("td.health")).to_contain_text("failures 0/3 to down")
    site.backends["green-2"].health_status = 503
    # the failures count up to fall, then it is down and counts passes toward rise
    await expect(row.locator("td.health")).to_contain_text(
        re.compile(r"failures [12]/3 to down|passes 0/2 to up"), timeout=WAIT_MS
    )
    await expect(row.locator("td.state")).to_have_text("down", timeout=WAIT_MS)
    await expect(row.locator("td.health")).to_contain_text("failed: status 503")
    await expect(row.locator("td.health")).to_contain_text("passes 0/2 to up")
    await expect(row.locator("td.health .health-error")).to_have_count(1)
    assert (await site.admin.backend("green-2") or {})["state"] == "down"
    site.backends["green-2"].health_status = 200
    await expect(row.locator("td.state")).to_have_text("up", timeout=WAIT_MS)
    await expect(row.locator("td.health")).to_contain_text("failures 0/3 to down")
    await expect(row.locator("td.health .health-error")).to_have_count(0)


async def test_drain_shows_draining_then_drained(site: Site, dashboard: Dashboard) -> None:
    await login(dashboard)
    blue_1 = site.backends["blue-1"]
    held: list[asyncio.Task[list[int]]] = []
    # requests that stay in flight until released, until one of them is on blue-1
    while blue_1.held == 0:
        assert len(held) < 20, "no held request reached blue-1"
        held.append(asyncio.create_task(through_proxy(site, "/hold", 1)))
        await async_wait_for(
            lambda: blue_1.held + site.backends["blue-2"].held == len(held), 10, "held"
        )
    row = dashboard.backend("blue-1")
    await expect(row.locator("td.inflight")).to_have_text(str(blue_1.held), timeout=WAIT_MS)

    await row.locator("button.drain").click()
    # held requests keep it draining: the page must show it, not jump ahead
    await expect(row.locator("td.state")).to_have_text("draining", timeout=WAIT_MS)
    assert (await site.admin.backend("blue-1") or {})["state"] == "draining"
    await expect(row.locator("button.drain")).to_be_disabled()
    blue_1.release()
    site.backends["blue-2"].release()
    for task in held:
        assert await task == [200]
    await expect(row.locator("td.state")).to_have_text("drained", timeout=WAIT_MS)
    await expect(row.locator("td.inflight")).to_have_text("0")
    assert (await site.admin.backend("blue-1") or {})["state"] == "drained"
    await expect(dashboard.page.locator("#events tbody tr td.action").first).to_have_text(
        re.compile(r"^backend\.(drain|drained)$")
    )
    # enable: back in rotation
    await row.locator("button.enable").click()
    await expect(row.locator("td.state")).to_have_text("up", timeout=WAIT_MS)
    assert (await site.admin.backend("blue-1") or {})["admin"] == "enabled"


async def test_wrong_token_shows_an_error_and_no_data(site: Site, dashboard: Dashboard) -> None:
    page = dashboard.page
    await expect(page.locator("#login")).to_be_visible()
    await dashboard.login("not-the-token-0123456789")
    error = page.locator("#error")
    await expect(error).to_be_visible(timeout=WAIT_MS)
    await expect(error).to_contain_text("The token was refused (invalid token)")
    await expect(page.locator("#main")).to_be_hidden()
    await expect(page.locator("#login")).to_be_visible()
    assert await page.locator(".pool").count() == 0
    assert await page.locator("#events tbody tr").count() == 0
    assert await page.locator("#meta").inner_text() == ""
    assert await page.evaluate("sessionStorage.getItem('zdproxy-admin-token')") is None


async def test_read_only_token_sees_everything_and_changes_nothing(
    site: Site, dashboard: Dashboard
) -> None:
    page = dashboard.page
    await login(dashboard, READ_TOKEN)
    await expect(page.locator("#notice")).to_contain_text(
        'read-only token "viewer": changes are disabled'
    )
    await expect(page.locator("#whoami")).to_have_text("token: viewer (read)")
    await expect(dashboard.backend("blue-1").locator("td.state")).to_have_text("up")
    for selector in ("button.flip", "button.drain", "button.disable", "#split-apply"):
        buttons = page.locator(selector)
        assert await buttons.count() > 0, selector
        for index in range(await buttons.count()):
            await expect(buttons.nth(index)).to_be_disabled()
    for index in range(await page.locator("#split-inputs input").count()):
        await expect(page.locator("#split-inputs input").nth(index)).to_be_disabled()
    # even a forced call from the page (as a crafted click would make) is refused
    status = await page.evaluate(
        """async () => (await fetch('/api/v1/flip', {method: 'POST',
             headers: {Authorization: 'Bearer ' + sessionStorage.getItem('zdproxy-admin-token'),
                       'Content-Type': 'application/json'},
             body: JSON.stringify({to: 'green'})})).status"""
    )
    assert status == 403
    assert await site.weights() == {"blue": 100, "green": 0}


async def test_rollout_controls_and_screenshots_under_load(
    site: Site, dashboard: Dashboard
) -> None:
    page = dashboard.page
    await login(dashboard)
    await expect(page.locator("#rollout-body")).to_contain_text("No rollout yet")
    plan: dict[str, Any] = {
        "to": "green",
        "steps": [{"weight": 20, "pause": "10m"}, {"weight": 50}, {"weight": 100}],
        "analysis": {"interval": "2s", "min_requests": 20, "max_error_rate": 0.05},
    }
    docs = os.environ.get("ZDPROXY_DOCS_SCREENSHOTS") == "1"
    load = await Load(site.proxy.url, workers=4).start()
    try:
        # the chart shows blue alone first, then the canary step (longer for the docs)
        await _wait_for_chart(page, ("blue",), 20 if docs else 2)
        answer = await site.admin.call("POST", "/api/v1/rollouts", plan)
        assert answer.status == 201, answer
        steps = page.locator("#steps li")
        await expect(steps).to_have_count(3, timeout=WAIT_MS)
        await expect(steps.nth(0)).to_have_text("1. 20 % · hold 10 min")
        await expect(steps.nth(2)).to_have_text("3. 100 % · waits for promote")
        await expect(page.locator("#rollout-body .phase")).to_have_text("progressing")
        await expect(steps.nth(0)).to_have_class("current")
        for pool in ("blue", "green"):
            rps = dashboard.pool(pool).locator(".figures b.rps")
            await expect(rps).not_to_have_text(NO_RATE, timeout=WAIT_MS)
        # a verdict with the figures behind it
        verdict = page.locator("table.verdicts tr").nth(1)
        await expect(verdict).to_contain_text("req, errors", timeout=WAIT_MS)
        await _wait_for_chart(page, ("blue", "green"), 40 if docs else 5)
        await _docs_screenshot(dashboard, "dashboard-under-load.png")
        await page.evaluate("document.getElementById('rollout').scrollIntoView()")
        await _docs_screenshot(dashboard, "dashboard-rollout.png", full=False)

        await page.click("button.rollout-pause")
        await expect(page.locator("#rollout-body .phase")).to_have_text("paused", timeout=WAIT_MS)
        assert (await site.admin.call("GET", "/api/v1/rollouts/current")).json()["rollout"][
            "phase"
        ] == "paused"
        await page.click("button.rollout-resume")
        await expect(page.locator("#rollout-body .phase")).to_have_text("progressing")
        dashboard.answer_dialogs(accept=True)
        await page.click("button.rollout-promote")
        await expect(steps.nth(1)).to_have_class("current", timeout=WAIT_MS)
        await expect(dashboard.pool("green").locator(".pool-weight")).to_have_text("50 %")
        await page.click("button.rollout-abort")
        await expect(page.locator("#rollout-body .phase")).to_have_text("aborted", timeout=WAIT_MS)
        assert await site.weights() == {"blue": 100, "green": 0}
        assert any("Abort the rollout" in d for d in dashboard.dialogs)
        await expect(page.locator("button.rollout-abort")).to_be_disabled()
        actions = page.locator("#events tbody td.action")
        await expect(actions.first).to_have_text(re.compile(r"^rollout\."))
    finally:
        await load.stop()


async def _wait_for_chart(page: Any, pools: tuple[str, ...], points: int) -> None:
    for pool in pools:
        line = page.locator(f'#chart polyline[data-pool="{pool}"]')
        pattern = re.compile(rf"^\S+,\S+( \S+,\S+){{{points - 1},}}$")
        # a point a poll, a poll a second: wait for that many, with room to spare
        timeout = WAIT_MS + points * 1500
        await expect(line).to_have_attribute("points", pattern, timeout=timeout)


async def _docs_screenshot(board: Dashboard, name: str, full: bool = True) -> None:
    path = await board.screenshot(name.removesuffix(".png"))
    if not full:
        await board.page.screenshot(path=str(path))
    if os.environ.get("ZDPROXY_DOCS_SCREENSHOTS") == "1":
        shutil.copyfile(path, REPO / "docs" / "img" / name)
