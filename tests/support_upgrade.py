"""Helpers for the hot upgrade tests: a ``zdproxy run`` whose serving PID
changes, followed through ``GET /api/v1/state``, and keep-alive load clients.

Every process started for a test (the first one, each new process of an
upgrade, a new process that failed) runs ``zdproxy run -c <this test's config
path>``; teardown finds them all by that command line in /proc and ends each
by PID, so no test leaks a process whatever it did.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import yaml
from ports import free_port

TOKEN = "upgrade-test-token-0123456789"
HOST = "127.0.0.1"


def upgrade_config(pools: dict[str, Any], state_path: Path | None, **extra: Any) -> dict[str, Any]:
    config: dict[str, Any] = {
        "listen": [f"{HOST}:{free_port()}"],
        "admin": {"listen": f"{HOST}:{free_port()}", "enabled": True},
        "state": {"path": str(state_path) if state_path is not None else None},
        "pools": pools,
        "health_check": {"enabled": False},
        "shutdown_timeout": "10s",
    }
    config.update(extra)
    return config


def _alive(pid: int) -> bool:
    """Running (a zombie, exited but not yet reaped, is not)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


class UpgradingProxy:
    """``zdproxy run`` as a subprocess that upgrades itself; all its processes
    log to one file (a new process inherits stdout and stderr)."""

    def __init__(
        self, config: dict[str, Any], workdir: Path, env: dict[str, str] | None = None
    ) -> None:
        self.config = config
        self.workdir = workdir
        self.path = workdir / "zdproxy.yaml"
        self.write_config(config)
        self.log_path = workdir / "zdproxy.log"
        self.env = {**os.environ, "ZDPROXY_ADMIN_TOKEN": TOKEN, **(env or {})}
        self.port = int(config["listen"][0].rpartition(":")[2])
        self.admin_port = int(config["admin"]["listen"].rpartition(":")[2])
        self.url = f"http://{HOST}:{self.port}"
        self.admin_url = f"http://{HOST}:{self.admin_port}"
        self.proc: subprocess.Popen[bytes] | None = None
        self._log: Any = None

    def write_config(self, config: dict[str, Any]) -> None:
        self.path.write_text(yaml.safe_dump(config, sort_keys=False))

    def start(self) -> UpgradingProxy:
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - kept for the process lifetime
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "zdproxy.cli", "run", "-c", str(self.path)],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            cwd=self.workdir,
            env=self.env,
        )
        try:
            self.wait_serving(lambda pid: pid == self.first_pid)
        except BaseException:
            self.stop()
            raise
        return self

    @property
    def first_pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    # ---- the admin API, from the test's thread -------------------------------------

    def api(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(
            self.admin_url + path,
            data=data,
            method=method,
            headers={"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"},
        )
        try:
            with urllib.request.urlopen(request, timeout=5) as response:
                return response.status, json.loads(response.read() or b"null")
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read() or b"null")

    def state(self) -> dict[str, Any]:
        status, body = self.api("GET", "/api/v1/state")
        assert status == 200, body
        return dict(body)

    def serving_pid(self) -> int | None:
        try:
            return int(self.state()["pid"])
        except (OSError, AssertionError, KeyError, ValueError):
            return None

    def wait_serving(self, accept: Any, timeout: float = 30.0) -> int:
        """Poll the state API until its pid satisfies ``accept(pid)``."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None and not self.processes():
                raise AssertionError(f"zdproxy exited:\n{self.log()}")
            pid = self.serving_pid()
            if pid is not None and accept(pid):
                return pid
            time.sleep(0.05)
        raise AssertionError(f"timed out waiting for the serving pid:\n{self.log()}")

    # ---- processes -----------------------------------------------------------------

    def processes(self) -> list[int]:
        """PIDs of every live process running this test's config."""
        wanted = str(self.path).encode()
        found = []
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    argv = f.read().split(b"\0")
            except OSError:
                continue
            if wanted in argv and b"run" in argv and _alive(int(entry)):
                found.append(int(entry))
        return sorted(found)

    def reap_first(self) -> None:
        if self.proc is not None:
            self.proc.poll()

    def wait_exited(self, pid: int, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.reap_first()
            if not _alive(pid):
                return
            time.sleep(0.05)
        raise AssertionError(f"pid {pid} did not exit:\n{self.log()}")

    def upgrade(self, timeout: float = 30.0) -> int:
        """SIGUSR2 to the serving process; the new process's pid once it serves."""
        old = self.serving_pid()
        assert old is not None
        os.kill(old, signal.SIGUSR2)
        return self.wait_serving(lambda pid: pid != old, timeout)

    def stop(self) -> None:
        """SIGTERM to every process of this test, then SIGKILL to what is left."""
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for pid in self.processes():
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
            deadline = time.monotonic() + 20
            while self.processes() and time.monotonic() < deadline:
                self.reap_first()
                time.sleep(0.05)
        if self.proc is not None:
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                pass
        if self._log is not None:
            self._log.close()
            self._log = None


# ---- load ----------------------------------------------------------------------


@dataclass
class LoadFigures:
    statuses: Counter[int] = field(default_factory=Counter)
    errors: list[str] = field(default_factory=list)
    #: answers by body (the backend's name)
    backends: Counter[str] = field(default_factory=Counter)

    @property
    def total(self) -> int:
        return sum(self.statuses.values()) + len(self.errors)

    @property
    def non_2xx(self) -> int:
        return sum(n for status, n in self.statuses.items() if not 200 <= status < 300)


class KeepAliveLoad:
    """``clients`` concurrent keep-alive clients (one aiohttp session, a connection
    each; or a new connection per request) sending GET requests back to back
    until the ``async with`` block ends."""

    def __init__(
        self, url: str, clients: int = 20, path: str = "/", new_connections: bool = False
    ) -> None:
        self.url = url + path
        self.clients = clients
        #: a new connection for every request (``Connection: close``)
        self.new_connections = new_connections
        self.figures = LoadFigures()
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> KeepAliveLoad:
        connector = aiohttp.TCPConnector(limit=self.clients, force_close=self.new_connections)
        self._session = aiohttp.ClientSession(
            connector=connector, timeout=aiohttp.ClientTimeout(total=30)
        )
        self._tasks = [asyncio.create_task(self._client()) for _ in range(self.clients)]
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._stop.set()
        await asyncio.gather(*self._tasks)
        assert self._session is not None
        await self._session.close()

    async def _client(self) -> None:
        assert self._session is not None
        while not self._stop.is_set():
            try:
                async with self._session.get(self.url) as response:
                    body = await response.read()
                    self.figures.statuses[response.status] += 1
                    self.figures.backends[body.decode(errors="replace").strip()] += 1
            except (aiohttp.ClientError, TimeoutError, OSError) as exc:
                self.figures.errors.append(f"{type(exc).__name__}: {exc}")

    async def wait_requests(self, count: int, timeout: float = 30.0) -> None:
        """Until ``count`` more requests were answered (the load is flowing)."""
        target = self.figures.total + count
        deadline = time.monotonic() + timeout
        while self.figures.total < target:
            if time.monotonic() > deadline:
                raise AssertionError(f"load stalled at {self.figures.total} requests")
            await asyncio.sleep(0.02)
