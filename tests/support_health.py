"""Helpers for the health, draining, retry, stickiness and outlier tests.

Everything is real: each backend is its own process (so that it can be killed
with SIGKILL, frozen with SIGSTOP and started again on the same port), zdproxy
runs as ``zdproxy run -c FILE``, and clients speak HTTP/1.1 over raw sockets
with no retry of their own (an HTTP client library that retries would hide the
proxy's failures). Waiting is polling a condition with a deadline.

Run as a script, this module is the backend server::

    python support_health.py backend NAME PORT
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httptools
import yaml
from ports import free_port

TOKEN = "health-test-token"
HERE = Path(__file__).resolve()


def port_open(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.2)
        return sock.connect_ex(("127.0.0.1", port)) == 0


async def wait_until(
    condition: Callable[[], Awaitable[bool] | bool], timeout: float, what: str
) -> float:
    """Poll ``condition`` until true; the seconds it took. Fails after ``timeout``."""
    start = time.monotonic()
    deadline = start + timeout
    while True:
        result = condition()
        if not isinstance(result, bool):
            result = await result
        if result:
            return time.monotonic() - start
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what}")
        await asyncio.sleep(0.02)


def figure(name: str, **values: Any) -> None:
    """Print a figure of a scenario (run pytest with -s to see them); with
    ZDPROXY_FIGURES=FILE they are appended to FILE as JSON lines too."""
    line = json.dumps({"scenario": name, **values})
    print(f"\nFIGURE {line}")
    target = os.environ.get("ZDPROXY_FIGURES")
    if target:
        with open(target, "a") as out:
            out.write(line + "\n")


# ---- a raw HTTP/1.1 keep-alive client ---------------------------------------------


@dataclass
class Response:
    status: int
    headers: dict[str, str]
    body: bytes
    set_cookies: list[str] = field(default_factory=list)

    @property
    def backend(self) -> str | None:
        return self.headers.get("x-backend")

    @property
    def pool(self) -> str | None:
        return self.headers.get("x-zdproxy-pool")

    def cookie(self, name: str) -> str | None:
        for header in self.set_cookies:
            key, _, rest = header.partition("=")
            if key.strip() == name:
                return rest.split(";")[0]
        return None


class _Parse:
    def __init__(self) -> None:
        self.headers: list[tuple[str, str]] = []
        self.body = bytearray()
        self.done = False

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name.decode("latin-1").lower(), value.decode("latin-1")))

    def on_body(self, body: bytes) -> None:
        self.body += body

    def on_message_complete(self) -> None:
        self.done = True


class Client:
    """One keep-alive connection at a time; reconnects only between requests
    (after the server closed the connection), never retries a request."""

    def __init__(self, port: int, timeout: float = 30.0) -> None:
        self.port = port
        self.timeout = timeout
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None
        self.connections = 0

    async def request(
        self,
        method: str = "GET",
        path: str = "/",
        headers: dict[str, str] | None = None,
        body: bytes = b"",
    ) -> Response:
        async with asyncio.timeout(self.timeout):
            return await self._request(method, path, headers or {}, body)

    async def _request(
        self, method: str, path: str, headers: dict[str, str], body: bytes
    ) -> Response:
        if self.writer is None or self.writer.is_closing():
            self.reader, self.writer = await asyncio.open_connection("127.0.0.1", self.port)
            self.connections += 1
        assert self.reader is not None
        lines = [f"{method} {path} HTTP/1.1", f"Host: 127.0.0.1:{self.port}"]
        lines += [f"{k}: {v}" for k, v in headers.items()]
        if body or method in ("POST", "PUT"):
            lines.append(f"Content-Length: {len(body)}")
        self.writer.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body)
        parse = _Parse()
        parser = httptools.HttpResponseParser(parse)
        try:
            while not parse.done:
                data = await self.reader.read(65536)
                if not data:
                    raise ConnectionError("connection closed before a complete response")
                parser.feed_data(data)
        except BaseException:
            self.close()
            raise
        if not parser.should_keep_alive():
            self.close()
        cookies = [v for k, v in parse.headers if k == "set-cookie"]
        return Response(parser.get_status_code(), dict(parse.headers), bytes(parse.body), cookies)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


@dataclass
class LoadResult:
    requests: int = 0
    failures: int = 0
    errors: Counter[str] = field(default_factory=Counter)
    by_backend: Counter[str] = field(default_factory=Counter)
    #: (monotonic time, backend) of each success, to see where traffic went when
    timeline: list[tuple[float, str]] = field(default_factory=list)


class Load:
    """``clients`` keep-alive clients sending GETs in a loop until stopped."""

    def __init__(self, port: int, clients: int = 30, path: str = "/") -> None:
        self.port = port
        self.clients = clients
        self.path = path
        self.result = LoadResult()
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []

    def start(self) -> Load:
        self._tasks = [asyncio.create_task(self._client()) for _ in range(self.clients)]
        return self

    async def stop(self) -> LoadResult:
        self._stop.set()
        await asyncio.gather(*self._tasks)
        return self.result

    async def _client(self) -> None:
        client = Client(self.port, timeout=15.0)
        result = self.result
        try:
            while not self._stop.is_set():
                try:
                    response = await client.request("GET", self.path)
                except (OSError, TimeoutError) as exc:
                    result.requests += 1
                    result.failures += 1
                    result.errors[type(exc).__name__] += 1
                    await asyncio.sleep(0.01)
                    continue
                result.requests += 1
                if response.status != 200:
                    result.failures += 1
                    result.errors[str(response.status)] += 1
                else:
                    backend = response.backend or "?"
                    result.by_backend[backend] += 1
                    result.timeline.append((time.monotonic(), backend))
        finally:
            client.close()

    def served_since(self, since: float) -> Counter[str]:
        return Counter(b for t, b in self.result.timeline if t >= since)


# ---- backends as processes -------------------------------------------------------


class BackendProc:
    def __init__(self, name: str, port: int | None = None) -> None:
        self.name = name
        self.port = port or free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def start(self) -> BackendProc:
        self.proc = subprocess.Popen(
            [sys.executable, str(HERE), "backend", self.name, str(self.port)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        await wait_until(self._ready, 15, f"backend {self.name} on port {self.port}")
        return self

    def _ready(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise AssertionError(f"backend {self.name} exited with {self.proc.returncode}")
        return port_open(self.port)

    def kill(self) -> None:
        """SIGKILL: the process is gone at once, its connections reset."""
        if self.proc is not None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()
            self.proc = None

    def freeze(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGSTOP)

    def thaw(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGCONT)

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.send_signal(signal.SIGCONT)
            self.proc.kill()
            self.proc.wait()
            self.proc = None

    async def ctl(self, **settings: Any) -> dict[str, Any]:
        """Change the backend's behaviour (health status, failing mode, delays) and
        read its counters, over its own port (not through the proxy)."""
        query = "&".join(f"{k}={v}" for k, v in settings.items())
        client = Client(self.port, timeout=5.0)
        try:
            response = await client.request("GET", f"/_ctl?{query}")
        finally:
            client.close()
        data: dict[str, Any] = json.loads(response.body)
        return data

    async def counts(self) -> Counter[str]:
        return Counter((await self.ctl())["counts"])


# ---- zdproxy as a process ----------------------------------------------------------


def proxy_config(
    pools: dict[str, list[BackendProc]],
    weights: dict[str, int] | None = None,
    **sections: Any,
) -> dict[str, Any]:
    names = list(pools)
    weights = weights or {name: (100 if i == 0 else 0) for i, name in enumerate(names)}
    config: dict[str, Any] = {
        "listen": [f"127.0.0.1:{free_port()}"],
        "admin": {"listen": f"127.0.0.1:{free_port()}", "token_env": "ZDPROXY_ADMIN_TOKEN"},
        "state": {"path": None},
        "pools": {
            name: {
                "weight": weights.get(name, 0),
                "backends": [{"id": b.name, "address": b.address} for b in members],
            }
            for name, members in pools.items()
        },
        "health_check": {"interval": "250ms", "timeout": "250ms", "rise": 2, "fall": 3},
        "shutdown_timeout": "5s",
    }
    config.update(sections)
    return config


class ProxyProc:
    def __init__(self, config: dict[str, Any], workdir: Path) -> None:
        self.config = config
        self.path = workdir / "zdproxy.yaml"
        self.path.write_text(yaml.safe_dump(config, sort_keys=False))
        self.log_path = workdir / "zdproxy.log"
        self.port = int(config["listen"][0].rpartition(":")[2])
        self.admin_port = int(config["admin"]["listen"].rpartition(":")[2])
        self.proc: subprocess.Popen[bytes] | None = None

    async def start(self) -> ProxyProc:
        env = {**os.environ, "ZDPROXY_ADMIN_TOKEN": TOKEN}
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "zdproxy.cli", "run", "-c", str(self.path)],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=env,
        )
        try:
            await wait_until(self._ready, 20, f"zdproxy on port {self.port}")
        except BaseException:
            self.stop()  # never leak the process or its log file
            raise
        return self

    def _ready(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise AssertionError(f"zdproxy exited early:\n{self.log()}")
        # "serving" is logged once every start hook ran (health's first verdicts in)
        return " serving (pid " in self.log() and port_open(self.port)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self) -> int | None:
        code = None
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.send_signal(signal.SIGTERM)
                try:
                    code = self.proc.wait(15)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait()
            else:
                code = self.proc.returncode
            self.proc = None
            self._log.close()
        return code

    async def api(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        client = Client(self.admin_port, timeout=10.0)
        data = b"" if body is None else json.dumps(body).encode()
        headers = {"Authorization": f"Bearer {TOKEN}"}
        if body is not None:
            headers["Content-Type"] = "application/json"
        try:
            response = await client.request(method, path, headers, data)
        finally:
            client.close()
        return response.status, json.loads(response.body) if response.body else None

    async def backends(self) -> dict[str, dict[str, Any]]:
        status, state = await self.api("GET", "/api/v1/state")
        assert status == 200, state
        return {b["id"]: b for pool in state["pools"].values() for b in pool["backends"]}

    async def backend(self, backend_id: str) -> dict[str, Any]:
        return (await self.backends())[backend_id]

    async def wait_state(
        self, backend_id: str, state: str, timeout: float, key: str = "state"
    ) -> float:
        async def reached() -> bool:
            return (await self.backend(backend_id))[key] == state

        return await wait_until(reached, timeout, f"{backend_id} {key} {state}")

    async def wait_all_up(self, timeout: float = 20.0) -> None:
        async def all_up() -> bool:
            return all(b["state"] == "up" for b in (await self.backends()).values())

        await wait_until(all_up, timeout, "every backend up")


@contextlib.asynccontextmanager
async def running(
    workdir: Path,
    sizes: dict[str, int],
    weights: dict[str, int] | None = None,
    wait_up: bool = True,
    **sections: Any,
) -> AsyncIterator[tuple[ProxyProc, dict[str, BackendProc]]]:
    """Backend processes (``<pool>-<n>``), and zdproxy in front of them."""
    pools = {
        name: [BackendProc(f"{name}-{n}") for n in range(1, size + 1)]
        for name, size in sizes.items()
    }
    backends = {b.name: b for members in pools.values() for b in members}
    proxy = ProxyProc(proxy_config(pools, weights, **sections), workdir)
    try:
        for backend in backends.values():
            await backend.start()
        await proxy.start()
        if wait_up:
            await proxy.wait_all_up()
        yield proxy, backends
    finally:
        code = proxy.stop()
        for backend in backends.values():
            backend.stop()
    assert code == 0, f"zdproxy exited with {code}:\n{proxy.log()}"


# ---- the backend server ----------------------------------------------------------


def _backend_main(name: str, port: int) -> None:
    from aiohttp import WSMsgType, web

    settings: dict[str, float] = {"health": 200, "health_delay": 0.0, "fail": 0, "delay": 0.0}
    counts: Counter[str] = Counter()
    health_peers: set[int] = set()

    def peer_port(request: web.Request) -> int:
        peer = request.transport.get_extra_info("peername") if request.transport else None
        return int(peer[1]) if peer else 0

    async def ctl(request: web.Request) -> web.StreamResponse:
        for key, value in request.query.items():
            settings[key] = float(value)
        counts["health_connections"] = len(health_peers)
        return web.json_response({"settings": settings, "counts": counts})

    async def healthz(request: web.Request) -> web.StreamResponse:
        counts["health"] += 1
        health_peers.add(peer_port(request))
        if settings["health_delay"]:
            await asyncio.sleep(settings["health_delay"])
        return web.Response(status=int(settings["health"]), text="health")

    async def slow(request: web.Request) -> web.StreamResponse:
        counts["slow"] += 1
        await asyncio.sleep(float(request.query.get("s", "1")))
        counts["slow_done"] += 1
        return web.Response(text=f"{name} slow\n", headers={"X-Backend": name})

    async def reset(request: web.Request) -> web.StreamResponse:
        """Takes the request (body included), then drops the connection unanswered."""
        await request.read()
        counts[f"reset_{request.method}"] += 1
        if request.transport is not None:
            request.transport.abort()
        return web.Response(status=500)

    async def websocket(request: web.Request) -> web.StreamResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        counts["ws_open"] += 1
        async for message in ws:
            if message.type == WSMsgType.TEXT:
                await ws.send_str(f"{name}:{message.data}")
        counts["ws_closed"] += 1
        return ws

    async def default(request: web.Request) -> web.StreamResponse:
        await request.read()
        counts[request.method] += 1
        counts["requests"] += 1
        if settings["fail"]:
            return web.Response(status=int(settings["fail"]), text="failing\n")
        if settings["delay"]:
            await asyncio.sleep(settings["delay"])
        return web.Response(text=f"{name}\n", headers={"X-Backend": name})

    app = web.Application()
    app.router.add_get("/_ctl", ctl)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/slow", slow)
    app.router.add_route("*", "/reset", reset)
    app.router.add_get("/ws", websocket)
    app.router.add_route("*", "/{tail:.*}", default)
    web.run_app(app, host="127.0.0.1", port=port, print=None, access_log=None)


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "backend":
        _backend_main(sys.argv[2], int(sys.argv[3]))
    else:
        sys.exit("usage: support_health.py backend NAME PORT")
