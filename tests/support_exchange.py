"""In-process harness for ``zdproxy.proxy``: the real protocol objects, a fake
transport that records what they write, and a fake loop whose clock the test
advances (uvicorn's test style). No socket, no timer: a timeout takes microseconds.

``Proxy`` builds a ``ProxyContext`` from a config text and plays the sweeper
(``advance``); ``client()`` opens a client connection, ``pooled()`` puts an
idle keep-alive upstream connection in a backend's pool (so a request is sent
at once), and ``connects`` says how the next new upstream connections go.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any, cast

from zdproxy.balancing.failures import Failure
from zdproxy.balancing.model import Backend
from zdproxy.balancing.selector import WeightedSelector
from zdproxy.config.loader import load_config_text
from zdproxy.control.runtime import Runtime
from zdproxy.proxy.context import ProxyContext
from zdproxy.proxy.downstream import ClientConnection
from zdproxy.proxy.exchange import Exchange
from zdproxy.proxy.upstream import UpstreamConnection, UpstreamPools

CONFIG = """\
listen: 127.0.0.1:8080
health_check: {enabled: false}
timeouts: {request_header: 10s, request_body: 20s, upstream_response: 30s, idle: 40s,
           tunnel_idle: 50s, connect: 5s}
pools:
  blue:
    weight: 100
    backends: [{address: 127.0.0.1:9001}, {address: 127.0.0.1:9002}]
"""


class FakeTransport:
    """Records writes and how the protocol ended the connection."""

    def __init__(self, peer: tuple[str, int] = ("192.0.2.7", 40000)) -> None:
        self.peer = peer
        self.written = bytearray()
        self.closed = False  # close() or abort()
        self.aborted = False
        self.eof_written = False
        self.reading = True

    def write(self, data: bytes) -> None:
        assert not self.closed, "write after close"
        self.written += data

    def writelines(self, parts: Any) -> None:
        for part in parts:
            self.write(part)

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.closed = True
        self.aborted = True

    def is_closing(self) -> bool:
        return self.closed

    def can_write_eof(self) -> bool:
        return True

    def write_eof(self) -> None:
        self.eof_written = True

    def pause_reading(self) -> None:
        self.reading = False

    def resume_reading(self) -> None:
        self.reading = True

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self.peer if name == "peername" else default

    def take(self) -> bytes:
        """What was written since the last take."""
        data = bytes(self.written)
        self.written.clear()
        return data


class FakeTask:
    """A task the data path started, for the test to run (``coro``) or drop."""

    def __init__(self, coro: Coroutine[Any, Any, None]) -> None:
        self.coro = coro
        self.callbacks: list[Callable[[Any], object]] = []

    def add_done_callback(self, callback: Callable[[Any], object]) -> None:
        self.callbacks.append(callback)

    def cancel(self) -> None:
        self.coro.close()


class FakeLoop:
    """The loop the data path sees: a clock the test sets, tasks kept for the test
    to run, and ``create_connection`` answered from ``Proxy.connects``."""

    def __init__(self, proxy: Proxy) -> None:
        self.proxy = proxy
        self.clock = 1000.0
        self.tasks: list[FakeTask] = []

    def time(self) -> float:
        return self.clock

    def create_task(self, coro: Coroutine[Any, Any, None]) -> FakeTask:
        task = FakeTask(coro)
        self.tasks.append(task)
        return task

    async def create_connection(
        self, factory: Callable[[], UpstreamConnection], host: str, port: int, **kwargs: Any
    ) -> tuple[FakeTransport, UpstreamConnection]:
        outcome = self.proxy.connects.pop(0)
        if isinstance(outcome, BaseException):
            raise outcome
        protocol = factory()
        transport = FakeTransport((host, port))
        protocol.connection_made(cast(asyncio.BaseTransport, transport))
        self.proxy.opened.append(protocol)
        return transport, protocol


class Recorder:
    """A PassiveObserver that keeps what it is told."""

    def __init__(self) -> None:
        self.failures: list[tuple[str, Failure]] = []

    def failure(self, backend: Backend, kind: Failure, now: float) -> None:
        backend.failures += 1
        self.failures.append((backend.id, kind))

    def success(self, backend: Backend, now: float) -> None:
        backend.failures = 0


class Proxy:
    def __init__(self, config_text: str = CONFIG) -> None:
        config = load_config_text(config_text, "test.yaml")
        self.runtime = Runtime(config.service_config(config.service_names()[0]))
        self.selector = WeightedSelector(self.runtime.snapshot)
        self.pools = UpstreamPools(config.limits.max_idle_upstream_per_backend)
        self.loop = FakeLoop(self)
        self.ctx = ProxyContext(
            config, self.selector, self.pools, cast(asyncio.AbstractEventLoop, self.loop)
        )
        self.ctx.now = self.loop.clock
        self.observer = Recorder()
        self.ctx.observer = self.observer
        #: outcomes of the next ``create_connection`` calls: None connects, an
        #: exception is raised
        self.connects: list[BaseException | None] = []
        #: upstream connections opened through ``create_connection``
        self.opened: list[UpstreamConnection] = []

    def backend(self, backend_id: str) -> Backend:
        return self.runtime.backends[backend_id]

    def client(self) -> tuple[ClientConnection, FakeTransport]:
        conn = ClientConnection(self.ctx)
        transport = FakeTransport()
        conn.connection_made(cast(asyncio.BaseTransport, transport))
        return conn, transport

    def pooled(self, backend_id: str) -> tuple[UpstreamConnection, FakeTransport]:
        """An idle keep-alive connection to the backend, in its pool."""
        upstream = UpstreamConnection(self.pools, self.backend(backend_id))
        transport = FakeTransport()
        upstream.connection_made(cast(asyncio.BaseTransport, transport))
        self.pools.release(upstream, self.loop.clock)
        return upstream, transport

    def advance(self, seconds: float) -> None:
        """Move the clock and run one sweeper pass over the connections."""
        self.loop.clock += seconds
        now = self.ctx.now = self.loop.clock
        for conn in list(self.ctx.connections):
            conn.check_deadline(now)

    async def run_tasks(self) -> None:
        """Run the connects the data path started (they finish at once here)."""
        while self.loop.tasks:
            await self.loop.tasks.pop(0).coro


def current(conn: ClientConnection) -> Exchange:
    """The exchange being answered, or the one being parsed."""
    if conn.queue:
        return conn.queue[0]
    assert conn.parsing is not None
    return conn.parsing
