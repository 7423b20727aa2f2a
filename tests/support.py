"""Shared test helpers: free ports, real backends, a real ``zdproxy run`` process.

Nothing here mocks the network: backends are aiohttp or raw asyncio servers on
loopback, zdproxy runs as a subprocess exactly as a user runs it, and waiting
is done by polling a condition with a deadline.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import yaml
from aiohttp import web
from ports import free_port


def wait_for(condition: Callable[[], bool], timeout: float = 10.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.02)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


async def async_wait_for(
    condition: Callable[[], bool | Awaitable[bool]], timeout: float = 10.0, what: str = "condition"
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = condition()
        if isinstance(result, Awaitable):
            result = await result
        if result:
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def port_open(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.2)
        return sock.connect_ex((host, port)) == 0


class Backend:
    """An aiohttp application server on loopback that records what it saw."""

    def __init__(self, name: str, pool: str = "", port: int | None = None) -> None:
        self.name = name
        self.pool = pool
        self.port = port or free_port()
        self.requests: list[dict[str, Any]] = []
        self.delay = 0.0
        self.health_status = 200
        self._runner: web.AppRunner | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def app(self) -> web.Application:
        app = web.Application(client_max_size=2**40)
        app.router.add_get("/healthz", self._healthz)
        app.router.add_route("*", "/echo", self._echo)
        app.router.add_get("/status/{code}", self._status)
        app.router.add_get("/slow/{seconds}", self._slow)
        app.router.add_route("*", "/{tail:.*}", self._index)
        return app

    async def start(self) -> Backend:
        self._runner = web.AppRunner(self.app(), access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()
        return self

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    def _record(self, request: web.Request, body_len: int) -> None:
        self.requests.append(
            {
                "method": request.method,
                "path": request.path_qs,
                "headers": dict(request.headers),
                "raw_headers": list(request.raw_headers),
                "body_len": body_len,
                "version": request.version,
            }
        )

    async def _healthz(self, request: web.Request) -> web.StreamResponse:
        return web.Response(status=self.health_status, text="health")

    async def _index(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        self._record(request, len(body))
        if self.delay:
            await asyncio.sleep(self.delay)
        return web.Response(text=f"{self.name}\n", headers={"X-Backend": self.name})

    async def _echo(self, request: web.Request) -> web.StreamResponse:
        """Streams the request body back (chunked), so nothing is buffered whole."""
        response = web.StreamResponse(headers={"X-Backend": self.name})
        await response.prepare(request)
        total = 0
        async for chunk in request.content.iter_any():
            total += len(chunk)
            await response.write(chunk)
        self._record(request, total)
        await response.write_eof()
        return response

    async def _status(self, request: web.Request) -> web.StreamResponse:
        self._record(request, 0)
        code = int(request.match_info["code"])
        if code in (204, 304):
            return web.Response(status=code, headers={"X-Backend": self.name})
        return web.Response(status=code, text="status\n", headers={"X-Backend": self.name})

    async def _slow(self, request: web.Request) -> web.StreamResponse:
        self._record(request, 0)
        await asyncio.sleep(float(request.match_info["seconds"]))
        return web.Response(text=f"{self.name} slow\n", headers={"X-Backend": self.name})


def base_config(
    pools: dict[str, dict[str, Any]], port: int | None = None, **extra: Any
) -> dict[str, Any]:
    config: dict[str, Any] = {
        "listen": [f"127.0.0.1:{port or free_port()}"],
        "admin": {"listen": f"127.0.0.1:{free_port()}", "enabled": False},
        "state": {"path": None},
        "pools": pools,
        "health_check": {"enabled": False},
        "shutdown_timeout": "10s",
    }
    for key, value in extra.items():
        config[key] = value
    return config


class ZdproxyProcess:
    """``zdproxy run -c FILE`` as a subprocess, stopped by PID."""

    def __init__(self, config: dict[str, Any], workdir: Path, env: dict[str, str] | None = None):
        self.config = config
        self.workdir = workdir
        self.path = workdir / "zdproxy.yaml"
        self.path.write_text(yaml.safe_dump(config, sort_keys=False))
        self.log_path = workdir / "zdproxy.log"
        self.env = {**os.environ, **(env or {})}
        self.proc: subprocess.Popen[bytes] | None = None
        _host, _, port = config["listen"][0].rpartition(":")
        self.port = int(port)
        self.url = f"http://127.0.0.1:{self.port}"

    def start(self, wait: bool = True) -> ZdproxyProcess:
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - kept for the process lifetime
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "zdproxy.cli", "run", "-c", str(self.path)],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            cwd=self.workdir,
            env=self.env,
        )
        if wait:
            try:
                wait_for(self._ready, 15, f"zdproxy on port {self.port}")
            except BaseException:
                # a failed start must not leak the process or its log file (an
                # unclosed file warns, and warnings are errors in an unrelated test)
                self.stop()
                raise
        return self

    def _ready(self) -> bool:
        """The data port and, when enabled, the admin port accept connections (the
        data listener is bound first thing at start, so it alone says little)."""
        if self.proc is not None and self.proc.poll() is not None:
            raise AssertionError(f"zdproxy exited early:\n{self.log()}")
        admin = self.config.get("admin") or {}
        if admin.get("enabled", True) and "listen" in admin:
            admin_port = int(str(admin["listen"]).rpartition(":")[2])
            if not port_open(admin_port):
                return False
        return all(port_open(port) for port in self.listen_ports())

    def listen_ports(self) -> list[int]:
        """Every data listener's port (entries are addresses or ``{address: ...}``):
        listeners are bound one after another, so the first says nothing of a TLS one."""
        entries = self.config["listen"]
        addresses = [e["address"] if isinstance(e, dict) else e for e in entries]
        return [int(str(address).rpartition(":")[2]) for address in addresses]

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, sig)

    def wait(self, timeout: float = 30) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout)

    def stop(self) -> int | None:
        if self.proc is None:
            return None
        try:
            if self.proc.poll() is not None:
                return self.proc.returncode
            self.proc.send_signal(signal.SIGTERM)
            try:
                return self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                return self.proc.wait(5)
        finally:
            self._log.close()

    def rss_kib(self) -> int:
        with open(f"/proc/{self.pid}/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
        raise AssertionError("no VmRSS")


@contextlib.contextmanager
def running(config: dict[str, Any], workdir: Path, **kwargs: Any) -> Iterator[ZdproxyProcess]:
    proc = ZdproxyProcess(config, workdir, **kwargs).start()
    try:
        yield proc
    finally:
        proc.stop()


def raw_request(port: int, data: bytes, timeout: float = 5.0, read_all: bool = True) -> bytes:
    """Send raw bytes, read until the server closes (or ``timeout``)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(data)
        chunks = []
        try:
            while True:
                chunk = sock.recv(65536)
                if not chunk:
                    break
                chunks.append(chunk)
                if not read_all:
                    break
        except TimeoutError:
            pass
        return b"".join(chunks)


async def araw_request(port: int, data: bytes, timeout: float = 5.0) -> bytes:
    """``raw_request`` off the event loop, for tests whose backends share the loop."""
    loop = asyncio.get_running_loop()
    return await loop.run_in_executor(None, raw_request, port, data, timeout)


async def in_thread(func: Callable[..., Any], *args: Any) -> Any:
    """Run blocking socket code off the loop so in-process backends keep serving."""
    return await asyncio.get_running_loop().run_in_executor(None, func, *args)
