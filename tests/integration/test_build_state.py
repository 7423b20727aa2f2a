"""A running zdproxy says which build it runs (compiled with mypyc, or pure) in
``GET /api/v1/state``, the same build its tests import (scripts/test installs one
at a time; tests/unit/test_build.py checks the import side)."""

from __future__ import annotations

from pathlib import Path

from support_control import AdminClient, AdminProxy, admin_config

from zdproxy.buildinfo import build


async def test_state_names_the_build_running(tmp_path: Path) -> None:
    pools = {"blue": {"weight": 100, "backends": [{"id": "b1", "address": "127.0.0.1:9"}]}}
    proxy = AdminProxy(admin_config(pools, None), tmp_path).start()
    try:
        async with AdminClient(proxy.admin_url) as admin:
            state = (await admin.call("GET", "/api/v1/state")).json()
    finally:
        proxy.stop()
    assert state["build"] == build()
    assert state["version"] == "0.1.0"
