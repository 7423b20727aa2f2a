"""Runtime state across real restarts of ``zdproxy run``, and what wins when the
config file and the saved state disagree."""

from __future__ import annotations

import copy
import json
import signal
from pathlib import Path
from typing import Any

from support import async_wait_for, free_port
from support_control import AdminClient, AdminProxy, admin_config, dummy_pools


async def restart(process: AdminProxy, config: dict[str, Any] | None = None) -> AdminProxy:
    assert process.stop() == 0
    fresh = AdminProxy(config or process.config, process.workdir)
    return fresh.start()


def by_id(state: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {b["id"]: b for pool in state["pools"].values() for b in pool["backends"]}


async def test_state_survives_a_restart(tmp_path: Path) -> None:
    state_path = tmp_path / "state.json"
    process = AdminProxy(admin_config(dummy_pools(), state_path), tmp_path).start()
    added_address = f"127.0.0.1:{free_port()}"
    try:
        async with AdminClient(process.admin_url) as admin:
            await admin.ok("POST", "/api/v1/flip", {"to": "green"})
            await admin.ok("POST", "/api/v1/backends/blue-1/disable")
            await admin.ok("POST", "/api/v1/backends/green-2/drain")
            await admin.ok(
                "POST",
                "/api/v1/backends",
                {"pool": "green", "address": added_address, "id": "green-3", "weight": 5},
                status=201,
            )
            await admin.ok("DELETE", "/api/v1/backends/blue-2")

            async def drained() -> bool:
                return (await admin.backend("green-2") or {}).get("state") == "drained"

            await async_wait_for(drained, 5, "green-2 drained")
            events_before = await admin.events()
        first_pid = process.pid
        process = await restart(process)
        async with AdminClient(process.admin_url) as admin:
            state = await admin.state()
            assert state["pid"] != first_pid
            assert {name: pool["weight"] for name, pool in state["pools"].items()} == {
                "blue": 0,
                "green": 100,
            }
            backends = by_id(state)
            assert set(backends) == {"blue-1", "green-1", "green-2", "green-3"}
            assert backends["blue-1"]["state"] == "disabled"
            assert backends["green-1"]["state"] == "up"
            assert backends["green-2"]["state"] == "drained"
            assert backends["green-3"]["address"] == added_address
            assert backends["green-3"]["weight"] == 5 and backends["green-3"]["added"]
            # the audit log carries on where it was
            assert await admin.events() == events_before
            result = await admin.ok("POST", "/api/v1/backends/blue-1/enable")
            assert result["event"]["id"] == events_before[-1]["id"] + 1
    finally:
        process.stop()
    assert "restored state" in process.log()


async def test_a_drain_in_progress_resumes_after_a_restart(tmp_path: Path) -> None:
    config = admin_config(dummy_pools(), tmp_path / "state.json", draining={"timeout": "30s"})
    process = AdminProxy(config, tmp_path).start()
    try:
        async with AdminClient(process.admin_url) as admin:
            await admin.ok("POST", "/api/v1/backends/green-2/drain")

            async def drained() -> bool:
                return (await admin.backend("green-2") or {}).get("state") == "drained"

            await async_wait_for(drained, 5, "green-2 drained")

        def saved() -> dict[str, Any]:
            state: dict[str, Any] = json.loads((tmp_path / "state.json").read_text())
            return state

        # zdproxy's own changes are written in the background, soon after
        await async_wait_for(lambda: saved()["admin"] == {"green-2": "drained"}, 5, "saved")
        state = saved()
        state["admin"]["green-2"] = "draining"  # as if it had stopped mid-drain
        (tmp_path / "state.json").write_text(json.dumps(state))
        process = await restart(process)
        async with AdminClient(process.admin_url) as admin:
            await async_wait_for(drained, 5, "green-2 drained after the restart")
    finally:
        process.stop()


async def test_an_acknowledged_change_survives_a_crash(tmp_path: Path) -> None:
    process = AdminProxy(admin_config(dummy_pools(), tmp_path / "state.json"), tmp_path).start()
    try:
        async with AdminClient(process.admin_url) as admin:
            await admin.ok("POST", "/api/v1/flip", {"to": "green"})
        process.signal(signal.SIGKILL)  # right after the answer: no clean shutdown
        process.wait(10)
        process.stop()
        process = AdminProxy(process.config, tmp_path).start()
        async with AdminClient(process.admin_url) as admin:
            assert (await admin.state())["pools"]["green"]["weight"] == 100
    finally:
        process.stop()
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    assert leftovers == []


async def test_a_backend_deleted_from_the_config_stays_gone(tmp_path: Path) -> None:
    config = admin_config(dummy_pools(), tmp_path / "state.json")
    process = AdminProxy(config, tmp_path).start()
    try:
        async with AdminClient(process.admin_url) as admin:
            await admin.ok("POST", "/api/v1/backends/blue-2/drain")
            await admin.ok("PUT", "/api/v1/split", {"blue": 60, "green": 40})
        edited = copy.deepcopy(config)
        del edited["pools"]["blue"]["backends"][1]
        edited["admin"]["listen"] = f"127.0.0.1:{free_port()}"
        process = await restart(process, edited)
        async with AdminClient(process.admin_url) as admin:
            state = await admin.state()
            assert set(by_id(state)) == {"blue-1", "green-1", "green-2"}
            # the pools and their config weights did not change: the saved split stays
            assert state["pools"]["blue"]["weight"] == 60

            def forgotten() -> bool:  # rewritten after the merge, in the background
                return json.loads((tmp_path / "state.json").read_text())["admin"] == {}

            await async_wait_for(forgotten, 5, "blue-2 forgotten in the state file")
    finally:
        process.stop()


async def test_edited_config_weights_win(tmp_path: Path) -> None:
    config = admin_config(dummy_pools(), tmp_path / "state.json")
    process = AdminProxy(config, tmp_path).start()
    try:
        async with AdminClient(process.admin_url) as admin:
            await admin.ok("POST", "/api/v1/flip", {"to": "green"})
            await admin.ok("POST", "/api/v1/backends/blue-1/disable")
        edited = copy.deepcopy(config)
        edited["pools"]["blue"]["weight"] = 50
        edited["pools"]["green"]["weight"] = 50
        process = await restart(process, edited)
        async with AdminClient(process.admin_url) as admin:
            state = await admin.state()
            assert state["pools"]["blue"]["weight"] == 50
            assert state["pools"]["green"]["weight"] == 50
            assert by_id(state)["blue-1"]["state"] == "disabled"  # the rest is restored
            await admin.ok("POST", "/api/v1/flip", {"to": "green"})
        # the state now remembers the new config weights: the saved flip wins again
        process = await restart(process, edited)
        async with AdminClient(process.admin_url) as admin:
            assert (await admin.state())["pools"]["green"]["weight"] == 100
        # a new pool in the config: the config's weights win
        grown = copy.deepcopy(edited)
        grown["pools"]["red"] = {
            "weight": 0,
            "backends": [{"id": "red-1", "address": f"127.0.0.1:{free_port()}"}],
        }
        process = await restart(process, grown)
        async with AdminClient(process.admin_url) as admin:
            state = await admin.state()
            weights = {name: pool["weight"] for name, pool in state["pools"].items()}
            assert weights == {"blue": 50, "green": 50, "red": 0}
    finally:
        process.stop()


async def test_config_defining_an_added_backend_wins(tmp_path: Path) -> None:
    config = admin_config(dummy_pools(), tmp_path / "state.json")
    process = AdminProxy(config, tmp_path).start()
    try:
        async with AdminClient(process.admin_url) as admin:
            await admin.ok(
                "POST",
                "/api/v1/backends",
                {"pool": "green", "address": f"127.0.0.1:{free_port()}", "id": "green-3"},
                status=201,
            )
        edited = copy.deepcopy(config)
        address = f"127.0.0.1:{free_port()}"
        edited["pools"]["green"]["backends"].append({"id": "green-3", "address": address})
        process = await restart(process, edited)
        async with AdminClient(process.admin_url) as admin:
            backend = await admin.backend("green-3")
            assert backend is not None
            assert backend["address"] == address and backend["added"] is False
    finally:
        process.stop()


async def test_a_corrupt_state_file_is_set_aside(tmp_path: Path) -> None:
    state_path = tmp_path / "state.json"
    state_path.write_text('{"format": 1, "weights": ')
    process = AdminProxy(admin_config(dummy_pools(), state_path), tmp_path).start()
    try:
        async with AdminClient(process.admin_url) as admin:
            state = await admin.state()
            assert state["pools"]["blue"]["weight"] == 100  # from the config
            aside = list(tmp_path.glob("state.json.corrupt-*"))
            assert len(aside) == 1
            assert aside[0].read_text() == '{"format": 1, "weights": '
            assert not state_path.exists()
            await admin.ok("POST", "/api/v1/flip", {"to": "green"})
            assert json.loads(state_path.read_text())["weights"]["green"] == 100
            assert state["persistence"]["last_error"] is None
    finally:
        process.stop()
    log = process.log()
    assert "is corrupt" in log and "moved to" in log and str(aside[0]) in log


async def test_state_path_null_keeps_nothing_on_disk(tmp_path: Path) -> None:
    process = AdminProxy(admin_config(dummy_pools(), None), tmp_path).start()
    try:
        async with AdminClient(process.admin_url) as admin:
            await admin.ok("POST", "/api/v1/flip", {"to": "green"})
            assert len(await admin.events()) == 1
            assert (await admin.state())["persistence"]["path"] is None
        process = await restart(process)
        async with AdminClient(process.admin_url) as admin:
            assert (await admin.state())["pools"]["blue"]["weight"] == 100
            assert await admin.events() == []
    finally:
        process.stop()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["zdproxy.log", "zdproxy.yaml"]
