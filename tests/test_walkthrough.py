"""The README's deployment walkthrough, run as written: its shell block goes
through bash against a real ``zdproxy run`` shaped like ``zdproxy demo`` (pools
blue and green, two backends each, the demo's health-check settings), with this
test's ports in place of the demo's fixed ones. A command that stops working, or
a step that no longer does what the README says, fails here."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import shlex
import signal
import sys
import urllib.request
from pathlib import Path
from typing import Any

from ports import free_port
from support import Backend, in_thread, running

ROOT = Path(__file__).resolve().parent.parent
TOKEN = "walkthrough-token"


def walkthrough() -> str:
    """The README's shell block that holds the rollout walkthrough."""
    blocks = re.findall(r"^```sh\n(.*?)^```", (ROOT / "README.md").read_text(), re.S | re.M)
    found = [block for block in blocks if "zdproxy ctl rollout start" in block]
    assert len(found) == 1, "the README has one walkthrough block"
    return found[0]


def substituted(block: str, replacements: dict[str, str]) -> str:
    for old, new in replacements.items():
        assert old in block, f"the walkthrough no longer mentions {old!r}"
        block = block.replace(old, new)
    return block


def demo_like_config(backends: dict[str, list[Backend]]) -> dict[str, Any]:
    """``zdproxy demo``'s config (zdproxy/demo.py) on this test's ports."""
    return {
        "listen": [f"127.0.0.1:{free_port()}"],
        "admin": {"listen": f"127.0.0.1:{free_port()}", "token_env": "ZDPROXY_ADMIN_TOKEN"},
        "state": {"path": None},
        "pools": {
            pool: {
                "weight": 100 if pool == "blue" else 0,
                "backends": [{"id": b.name, "address": b.address} for b in members],
            }
            for pool, members in backends.items()
        },
        "health_check": {"path": "/healthz", "interval": "1s", "rise": 1, "fall": 2},
        "draining": {"timeout": "5s"},
        "shutdown_timeout": "5s",
    }


def api(admin_port: int, path: str) -> Any:
    request = urllib.request.Request(
        f"http://127.0.0.1:{admin_port}{path}", headers={"Authorization": f"Bearer {TOKEN}"}
    )
    with urllib.request.urlopen(request, timeout=5) as response:
        return json.load(response)


async def test_the_readme_walkthrough_runs_as_written(tmp_path: Path) -> None:
    backends = {
        pool: [await Backend(f"{pool}-{n}", pool).start() for n in (1, 2)]
        for pool in ("blue", "green")
    }
    config = demo_like_config(backends)
    proxy = config["listen"][0]
    admin = config["admin"]["listen"]
    green_3 = free_port()
    script = substituted(
        walkthrough(),
        {
            "http://127.0.0.1:9901": f"http://{admin}",
            "http://127.0.0.1:8080": f"http://{proxy}",
            "<the printed token>": TOKEN,
            "9105": str(green_3),
            "/tmp/green-3": str(tmp_path / "green-3"),
        },
    )
    prelude = (
        f'set -euo pipefail\nzdproxy() {{ {shlex.quote(sys.executable)} -m zdproxy.cli "$@"; }}\n'
    )
    try:
        with running(config, tmp_path, env={"ZDPROXY_ADMIN_TOKEN": TOKEN}):
            log_path = tmp_path / "walkthrough.log"
            with open(log_path, "wb") as log:
                proc = await asyncio.create_subprocess_exec(
                    "bash",
                    "-c",
                    prelude + script,
                    cwd=tmp_path,
                    stdout=log,
                    stderr=asyncio.subprocess.STDOUT,
                    start_new_session=True,  # its own process group: ended whole below
                )
            try:
                await asyncio.wait_for(proc.wait(), timeout=90)
            finally:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)  # the walkthrough's http.server
                await proc.wait()
            text = log_path.read_text(errors="replace")
            assert proc.returncode == 0, text
            admin_port = int(admin.rpartition(":")[2])
            state = await in_thread(api, admin_port, "/api/v1/state")
            events = await in_thread(api, admin_port, "/api/v1/events")
    finally:
        for members in backends.values():
            for backend in members:
                await backend.stop()

    # what the README says each step does
    assert "added green-3" in text and "SUCCEEDED" in text
    assert {name: pool["weight"] for name, pool in state["pools"].items()} == {
        "blue": 0,
        "green": 100,
    }
    assert state["pools"]["blue"]["backends"] == []
    green = {b["id"]: b["state"] for b in state["pools"]["green"]["backends"]}
    assert green == {"green-1": "up", "green-2": "up", "green-3": "up"}
    actions = [(event["action"], event["target"]) for event in events["events"]]
    for step in (
        ("backend.add", "green-3"),
        ("rollout.start", "rollout-1"),
        ("rollout.succeeded", "rollout-1"),
        ("backend.drain", "blue-1"),
        ("backend.drain", "blue-2"),
        ("backend.remove", "blue-1"),
        ("backend.remove", "blue-2"),
    ):
        assert step in actions, step
    # the canary request went through the proxy and was answered by a backend
    assert re.search(r"^(blue|green)-\d$", text, re.M), text
