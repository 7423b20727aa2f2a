"""A scripted raw backend for the upstream-hardening suite.

:class:`ScriptedBackend` is a raw asyncio server in a thread of its own. It reads
request heads (and Content-Length bodies) itself and hands each request to the
test's handler, an async function that writes exact bytes through a
:class:`Link` and returns whether to read the next request on that connection.
It numbers connections and records, thread-safely, every request head it
received (``seen``) and which connections the peer closed, so a test can count
exactly how many times a request reached the backend and on which connection.

Waiting is polling with a deadline (``support_hostile.wait_for``), never a bare
sleep; the handler may wait on a ``threading.Event`` the test sets.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from support_hostile import HOST, wait_for


@dataclass(frozen=True)
class Seen:
    """A request head as the backend received it."""

    conn_id: int
    index: int
    method: bytes
    target: bytes
    body: bytes


class Link:
    """One backend connection, as the handler sees it."""

    def __init__(
        self,
        conn_id: int,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        backend: ScriptedBackend,
    ) -> None:
        self.conn_id = conn_id
        self.reader = reader
        self.writer = writer
        self.backend = backend

    async def send(self, data: bytes) -> None:
        """Write ``data`` in one call (one segment on loopback, so the proxy reads
        it in one piece) and wait until it left the buffer."""
        self.writer.write(data)
        await self.writer.drain()

    async def wait(self, event: threading.Event, timeout: float = 10.0) -> None:
        """Wait until the test sets ``event``; a close by the proxy meanwhile is
        recorded at once (the test may be waiting for it before it signals)."""
        deadline = time.monotonic() + timeout
        while not event.is_set():
            if self.reader.at_eof():
                self.backend.mark_closed(self.conn_id)
            if time.monotonic() > deadline:
                raise TimeoutError("the test never gave the signal")
            await asyncio.sleep(0.005)

    async def linger(self) -> bool:
        """Read (and drop) until the peer closes; never answer again."""
        with contextlib.suppress(ConnectionError, OSError):
            while await self.reader.read(65536):
                pass
        return False

    async def stream(self, piece: bytes, limit: int = 64 << 20) -> bool:
        """Write ``piece`` again and again until the peer goes away (or ``limit``
        bytes, a safety net for a broken proxy); then stop serving."""
        sent = 0
        try:
            while sent < limit:
                self.writer.write(piece)
                await self.writer.drain()
                sent += len(piece)
        except (ConnectionError, OSError):
            pass
        return False

    def close(self) -> bool:
        """Close the connection (FIN); stop serving it."""
        self.writer.close()
        return False

    def reset(self) -> None:
        sock = self.writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.writer.transport.abort()


Handler = Callable[[Seen, Link], Awaitable[bool]]


class ScriptedBackend:
    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.port = 0
        self.seen: list[Seen] = []
        #: connections the peer (the proxy) closed, by id
        self.closed: set[int] = set()
        self.conns = 0
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._tasks: set[asyncio.Task[None]] = set()

    def __enter__(self) -> ScriptedBackend:
        self._thread = threading.Thread(target=self._run, name="scripted-backend", daemon=True)
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("scripted backend did not start")
        return self

    def __exit__(self, *exc: object) -> None:
        if self._loop is not None and self._thread is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)

    def _run(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        server = loop.run_until_complete(asyncio.start_server(self._serve, HOST, 0))
        self.port = server.sockets[0].getsockname()[1]
        self._ready.set()
        loop.run_forever()
        server.close()
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            loop.run_until_complete(asyncio.gather(*self._tasks, return_exceptions=True))
        loop.close()

    # -- queries (thread-safe)

    def requests(self, target: bytes | None = None) -> list[Seen]:
        with self._lock:
            return [s for s in self.seen if target is None or s.target == target]

    def mark_closed(self, conn_id: int) -> None:
        with self._lock:
            self.closed.add(conn_id)

    def wait_closed(self, conn_id: int, timeout: float = 5.0) -> None:
        def closed() -> bool:
            with self._lock:
                return conn_id in self.closed

        wait_for(closed, timeout, f"the proxy to close backend connection {conn_id}")

    # -- serving

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        with self._lock:
            self.conns += 1
            conn_id = self.conns
        link = Link(conn_id, reader, writer, self)
        index = 0
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except (asyncio.IncompleteReadError, ConnectionError, OSError):
                    break
                method, target, length = _parse(head)
                # a target starting with /early is answered before its body is read
                early = target.startswith(b"/early")
                body = await reader.readexactly(length) if length and not early else b""
                index += 1
                seen = Seen(conn_id, index, method, target, body)
                with self._lock:
                    self.seen.append(seen)
                if not await self.handler(seen, link):
                    await link.linger()
                    break
        except (ConnectionError, OSError, asyncio.IncompleteReadError):
            pass
        finally:
            self.mark_closed(conn_id)
            self._tasks.discard(task)
            with contextlib.suppress(Exception):
                writer.close()


def _parse(head: bytes) -> tuple[bytes, bytes, int]:
    line, *fields = head[:-4].split(b"\r\n")
    method, target, _version = line.split(b" ")
    length = 0
    for field in fields:
        name, _, value = field.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    return method, target, length


def ok(body: bytes, extra: bytes = b"") -> bytes:
    """A plain 200 with a Content-Length body."""
    return b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n%s\r\n%s" % (len(body), extra, body)


def read_exactly(sock: socket.socket, count: int, timeout: float = 5.0) -> bytes:
    """``count`` bytes from ``sock``, or fewer when it closes first."""
    sock.settimeout(timeout)
    data = b""
    while len(data) < count:
        try:
            piece = sock.recv(count - len(data))
        except ConnectionResetError:
            break
        if not piece:
            break
        data += piece
    return data


def read_to_eof(sock: socket.socket, timeout: float = 5.0) -> tuple[bytes, bool]:
    """Everything until the peer closes: (bytes, closed). ``closed`` is False when
    nothing ended the stream within ``timeout`` (the connection stayed open)."""
    sock.settimeout(timeout)
    data = b""
    while True:
        try:
            piece = sock.recv(65536)
        except ConnectionResetError:
            return data, True
        except TimeoutError:
            return data, False
        if not piece:
            return data, True
        data += piece
