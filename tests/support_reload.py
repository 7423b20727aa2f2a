"""Helpers for the reload tests: a raw asyncio backend that counts the
connections the proxy opens to it, and the config file rewritten in place."""

from __future__ import annotations

import asyncio
import re
from pathlib import Path
from typing import Any

import yaml
from ports import free_port


class CountingBackend:
    """HTTP/1.1 keep-alive backend on loopback. ``proxied`` counts the connections
    that carried a request other than ``/healthz`` (the proxy's, not the health
    checker's); ``log`` is the order of health checks and requests; ``/hold``
    waits until ``release()``."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.port = free_port()
        self.proxied = 0
        #: of those, how many ended
        self.closed = 0
        self.requests = 0
        self.log: list[str] = []
        self.held = 0
        self._release = asyncio.Event()
        self._server: asyncio.Server | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def start(self) -> CountingBackend:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", self.port)
        return self

    async def stop(self) -> None:
        self.release()
        if self._server is not None:
            self._server.close()
            self._server = None

    def release(self) -> None:
        self._release.set()

    def hold_again(self) -> None:
        """``/hold`` waits again (after a ``release``)."""
        self._release = asyncio.Event()
        self.held = 0

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        counted = False
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                path = head.split(b" ", 2)[1].decode()
                length = re.search(rb"(?i)\r\ncontent-length:\s*(\d+)", head)
                if length:
                    await reader.readexactly(int(length.group(1)))
                if path == "/healthz":
                    self.log.append("health")
                else:
                    self.log.append("request")
                    self.requests += 1
                    if not counted:
                        counted = True
                        self.proxied += 1
                if path == "/hold":
                    self.held += 1
                    await self._release.wait()
                body = f"{self.name}\n".encode()
                writer.write(
                    b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nX-Backend: %s\r\n\r\n%s"
                    % (len(body), self.name.encode(), body)
                )
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.LimitOverrunError):
            pass
        finally:
            if counted:
                self.closed += 1
            writer.close()


def rewrite(path: Path, config: dict[str, Any]) -> None:
    """The config file replaced whole, as an editor or a deploy tool saves it."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(yaml.safe_dump(config, sort_keys=False))
    tmp.replace(path)


def metric(text: str, name: str, **labels: str) -> float:
    """One sample of the Prometheus text ``text`` (0 when absent)."""
    wanted = ",".join(f'{k}="{v}"' for k, v in labels.items())
    for line in text.splitlines():
        key, _, value = line.rpartition(" ")
        if key == (f"{name}{{{wanted}}}" if wanted else name):
            return float(value)
    return 0.0
