"""The floor: a minimal HTTP/1.1 reverse proxy in Python, a benchmark reference only.

NOT part of zdproxy. It does what every proxy row of the benchmark must do and
nothing more: httptools for framing, the request head rebuilt with an
``X-Forwarded-For`` line, round robin over keep-alive upstream connections, the
response relayed as it arrives. No checks, no limits, no timeouts, no pipelining,
no error handling worth the name: what Python on uvloop costs per request before
any feature. ``python benchmarks/floor_proxy.py PORT BACKEND_PORT...``
"""

from __future__ import annotations

import asyncio
import sys
from typing import cast

import httptools
import uvloop


class Upstream(asyncio.Protocol):
    def __init__(self, pool: list[Upstream]) -> None:
        self.pool = pool
        self.client: Client | None = None
        self.parser = httptools.HttpResponseParser(self)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        assert self.client is not None
        self.client.transport.write(data)
        self.parser.feed_data(data)

    def on_message_complete(self) -> None:
        self.client, client = None, self.client
        assert client is not None
        self.pool.append(self)
        client.upstream = None
        if not client.keep_alive:
            client.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        if self in self.pool:
            self.pool.remove(self)
        if self.client is not None:
            self.client.transport.close()


class Client(asyncio.Protocol):
    def __init__(self, backends: list[tuple[int, list[Upstream]]], turn: list[int]) -> None:
        self.backends, self.turn = backends, turn
        self.parser = httptools.HttpRequestParser(self)
        self.upstream: Upstream | None = None
        self.waiting: list[bytes] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.xff = transport.get_extra_info("peername")[0].encode()

    def data_received(self, data: bytes) -> None:
        self.parser.feed_data(data)

    def on_message_begin(self) -> None:
        self.url, self.headers = b"", [b""]

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        if len(name) != 10 or name.lower() != b"connection":  # hop-by-hop: not forwarded
            self.headers += (name, b": ", value, b"\r\n")

    def on_headers_complete(self) -> None:
        self.keep_alive = self.parser.should_keep_alive()
        self.headers[0] = self.parser.get_method() + b" " + self.url + b" HTTP/1.1\r\n"
        self.headers += (b"X-Forwarded-For: ", self.xff, b"\r\n\r\n")
        self.turn[0] = (self.turn[0] + 1) % len(self.backends)
        port, pool = self.backends[self.turn[0]]
        if pool:
            self._attach(pool.pop(), self.headers)
        else:
            self.waiting = self.headers
            asyncio.get_running_loop().create_task(self._connect(port, pool))

    async def _connect(self, port: int, pool: list[Upstream]) -> None:
        loop = asyncio.get_running_loop()
        _, upstream = await loop.create_connection(lambda: Upstream(pool), "127.0.0.1", port)
        waiting, self.waiting = self.waiting, None
        self._attach(upstream, waiting or [])

    def _attach(self, upstream: Upstream, parts: list[bytes]) -> None:
        self.upstream, upstream.client = upstream, self
        upstream.transport.writelines(parts)

    def on_body(self, body: bytes) -> None:
        if self.waiting is not None:
            self.waiting.append(body)
        elif self.upstream is not None:
            self.upstream.transport.write(body)

    def pause_writing(self) -> None:
        if self.upstream is not None:
            self.upstream.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.upstream is not None:
            self.upstream.transport.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.upstream is not None:
            self.upstream.transport.close()


async def serve(port: int, backend_ports: list[int]) -> None:
    backends: list[tuple[int, list[Upstream]]] = [(p, []) for p in backend_ports]
    turn = [0]
    loop = asyncio.get_running_loop()
    server = await loop.create_server(
        lambda: Client(backends, turn), "127.0.0.1", port, backlog=4096
    )
    await server.serve_forever()


if __name__ == "__main__":
    uvloop.run(serve(int(sys.argv[1]), [int(p) for p in sys.argv[2:]]))
