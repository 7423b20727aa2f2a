"""Helpers for the control-plane tests: a real ``zdproxy run`` with its admin API
enabled and tokens configured, and a small async client for that API.

Builds on ``support`` (free ports, backends, the process wrapper); waiting is
polling with a deadline.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import aiohttp
from support import ZdproxyProcess, base_config, free_port, port_open, wait_for

#: the default write token (ZDPROXY_ADMIN_TOKEN), named "default"
TOKEN = "test-admin-token-0123456789abcdef"
#: a named write token
DEPLOY_TOKEN = "test-deploy-token-0123456789abcdef"
#: a named read token
READ_TOKEN = "test-read-token-0123456789abcdef"

TOKEN_ENV = {
    "ZDPROXY_ADMIN_TOKEN": TOKEN,
    "ZDPROXY_TEST_DEPLOY_TOKEN": DEPLOY_TOKEN,
    "ZDPROXY_TEST_READ_TOKEN": READ_TOKEN,
}


def admin_config(
    pools: dict[str, dict[str, Any]],
    state_path: Path | None,
    *,
    admin: dict[str, Any] | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """A config with the admin API on a free loopback port, three tokens (default,
    "deploy" write, "viewer" read) and state at ``state_path`` (None: in memory)."""
    admin_section: dict[str, Any] = {
        "enabled": True,
        "listen": f"127.0.0.1:{free_port()}",
        "token_env": "ZDPROXY_ADMIN_TOKEN",
        "tokens": [
            {"name": "deploy", "role": "write", "env": "ZDPROXY_TEST_DEPLOY_TOKEN"},
            {"name": "viewer", "role": "read", "env": "ZDPROXY_TEST_READ_TOKEN"},
        ],
    }
    admin_section.update(admin or {})
    extra.setdefault("draining", {"timeout": "5s"})
    extra.setdefault("shutdown_timeout", "5s")
    return base_config(
        pools,
        admin=admin_section,
        state={"path": str(state_path) if state_path is not None else None},
        **extra,
    )


def dummy_pools(blue: int = 2, green: int = 2) -> dict[str, dict[str, Any]]:
    """Pools whose backends are never called (admin-only tests): addresses of
    closed ports. With health checks off they are ``up``."""
    return {
        "blue": {
            "weight": 100,
            "backends": [
                {"id": f"blue-{n}", "address": f"127.0.0.1:{free_port()}"}
                for n in range(1, blue + 1)
            ],
        },
        "green": {
            "weight": 0,
            "backends": [
                {"id": f"green-{n}", "address": f"127.0.0.1:{free_port()}"}
                for n in range(1, green + 1)
            ],
        },
    }


class AdminProxy(ZdproxyProcess):
    """``zdproxy run`` with the admin API; ``admin_url`` is its base URL."""

    def __init__(
        self, config: dict[str, Any], workdir: Path, env: dict[str, str] | None = None
    ) -> None:
        super().__init__(config, workdir, env={**TOKEN_ENV, **(env or {})})
        self.admin_port = int(config["admin"]["listen"].rpartition(":")[2])
        self.admin_url = f"http://127.0.0.1:{self.admin_port}"

    def start(self, wait: bool = True) -> AdminProxy:
        super().start(wait)
        if wait:
            wait_for(lambda: port_open(self.admin_port), 15, "the admin port")
        return self


class Answer:
    def __init__(self, status: int, body: bytes, headers: Any) -> None:
        self.status = status
        self.body = body
        self.headers = headers

    def json(self) -> Any:
        return json.loads(self.body)

    @property
    def error(self) -> str:
        data = self.json()
        assert set(data) == {"error"}, data
        assert isinstance(data["error"], str) and data["error"]
        return str(data["error"])

    def __repr__(self) -> str:
        return f"Answer({self.status}, {self.body[:300]!r})"


class AdminClient:
    """The admin API over a real socket, with a token (or none)."""

    def __init__(self, url: str, token: str | None = TOKEN) -> None:
        self.url = url
        self.token = token
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> AdminClient:
        self._session = aiohttp.ClientSession()
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._session is not None
        await self._session.close()

    async def call(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        data: bytes | None = None,
        token: str | bool | None = True,
        headers: dict[str, str] | None = None,
    ) -> Answer:
        """``token=True``: this client's token; a string: that one; None: none."""
        assert self._session is not None
        sent = dict(headers or {})
        use = self.token if token is True else token
        if isinstance(use, str):
            sent["Authorization"] = f"Bearer {use}"
        if body is not None:
            data = json.dumps(body).encode()
            sent.setdefault("Content-Type", "application/json")
        async with self._session.request(method, self.url + path, data=data, headers=sent) as r:
            return Answer(r.status, await r.read(), r.headers)

    async def state(self) -> dict[str, Any]:
        answer = await self.call("GET", "/api/v1/state")
        assert answer.status == 200, answer
        result: dict[str, Any] = answer.json()
        return result

    async def backend(self, backend_id: str) -> dict[str, Any] | None:
        state = await self.state()
        for pool in state["pools"].values():
            for backend in pool["backends"]:
                if backend["id"] == backend_id:
                    result: dict[str, Any] = backend
                    return result
        return None

    async def events(self) -> list[dict[str, Any]]:
        answer = await self.call("GET", "/api/v1/events")
        assert answer.status == 200, answer
        result: list[dict[str, Any]] = answer.json()["events"]
        return result

    async def ok(self, method: str, path: str, body: Any = None, status: int = 200) -> Any:
        answer = await self.call(method, path, body)
        assert answer.status == status, answer
        return answer.json()


def run_ctl(
    admin_url: str, *args: str, token: str | None = TOKEN, timeout: float = 20
) -> subprocess.CompletedProcess[str]:
    """``zdproxy ctl ARGS`` as a user runs it (blocking; use ``actl`` from async tests)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("ZDPROXY_")}
    env["ZDPROXY_ADMIN_URL"] = admin_url
    if token is not None:
        env["ZDPROXY_ADMIN_TOKEN"] = token
    return subprocess.run(
        [sys.executable, "-m", "zdproxy.cli", "ctl", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
    )


async def actl(
    admin_url: str, *args: str, token: str | None = TOKEN
) -> subprocess.CompletedProcess[str]:
    """``run_ctl`` off the event loop, so backends in this loop keep serving."""
    loop = asyncio.get_running_loop()
    return await loop.run_in_executor(None, lambda: run_ctl(admin_url, *args, token=token))
