"""Helpers for the shadow traffic tests: a raw asyncio backend that records every
request exactly (method, target, headers, body bytes) and answers as told: well,
with an error status, a different body, or not at all (hang, reset)."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

import httptools
from support import free_port


@dataclass
class Seen:
    method: str
    target: str
    headers: list[tuple[str, str]]
    body: bytes

    def header(self, name: str) -> str | None:
        for key, value in self.headers:
            if key.lower() == name.lower():
                return value
        return None


@dataclass
class _Request:
    target: bytes = b""
    headers: list[tuple[str, str]] = field(default_factory=list)
    body: list[bytes] = field(default_factory=list)


class _Conn(asyncio.Protocol):
    def __init__(self, backend: RecordingBackend) -> None:
        self.backend = backend
        self.parser = httptools.HttpRequestParser(self)
        self.request = _Request()
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.backend.connections.add(transport)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.transport is not None:
            self.backend.connections.discard(self.transport)

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            if self.transport is not None:
                self.transport.close()

    def on_message_begin(self) -> None:
        self.request = _Request()

    def on_url(self, url: bytes) -> None:
        self.request.target += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self.request.headers.append((name.decode("latin-1"), value.decode("latin-1")))

    def on_body(self, body: bytes) -> None:
        self.request.body.append(body)

    def on_message_complete(self) -> None:
        request = self.request
        method = self.parser.get_method().decode()
        target = request.target.decode("latin-1")
        seen = Seen(method, target, request.headers, b"".join(request.body))
        self.backend.seen.append(seen)
        self.backend.answer(self, seen)

    def respond(self, status: int, body: bytes) -> None:
        if self.transport is None or self.transport.is_closing():
            return
        head = (
            f"HTTP/1.1 {status} X\r\nContent-Length: {len(body)}\r\n"
            f"X-Backend: {self.backend.name}\r\n\r\n"
        ).encode()
        self.transport.write(head + body)
        if not self.parser.should_keep_alive():
            self.transport.close()


class RecordingBackend:
    """``mode``: ``ok`` (200, body ``NAME path``), ``error`` (500), ``hang`` (never
    answers), ``reset`` (closes the connection at once). ``/status/N`` answers N and
    ``/diff`` a body that depends on the backend's name, ``/flaky`` 503 from a backend
    whose name starts with ``shadow`` (else 200), in mode ``ok``."""

    def __init__(self, name: str, mode: str = "ok") -> None:
        self.name = name
        self.mode = mode
        self.port = free_port()
        self.seen: list[Seen] = []
        self.connections: set[asyncio.Transport] = set()
        self._server: asyncio.Server | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def start(self) -> RecordingBackend:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(lambda: _Conn(self), "127.0.0.1", self.port)
        return self

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            for transport in list(self.connections):
                transport.abort()
            await self._server.wait_closed()
            self._server = None

    def answer(self, conn: _Conn, seen: Seen) -> None:
        if seen.target == "/healthz":
            conn.respond(200, b"ok")
            return
        if self.mode == "hang":
            return
        if self.mode == "reset":
            assert conn.transport is not None
            conn.transport.abort()
            return
        if self.mode == "error":
            conn.respond(500, b"error\n")
            return
        if seen.target.startswith("/status/"):
            conn.respond(int(seen.target.rpartition("/")[2]), b"status\n")
        elif seen.target == "/flaky":
            conn.respond(503 if self.name.startswith("shadow") else 200, b"flaky\n")
        elif seen.target == "/diff":
            conn.respond(200, f"{self.name}\n".encode())
        else:
            conn.respond(200, b"same body " + seen.target.encode() + b"\n")
