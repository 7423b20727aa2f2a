"""Memory per idle keep-alive client connection.

An asyncio client opens N connections to the proxy, sends one GET / on each
and reads the answer, then leaves them idle. The proxy's RSS (all its
processes) is read before and after; the difference divided by the number of
connections still open is the cost of one idle keep-alive connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import time
from collections.abc import Callable
from dataclasses import dataclass

from .system import rss_kib

REQUEST = b"GET / HTTP/1.1\r\nHost: bench\r\nUser-Agent: zdproxy-bench-idle\r\n\r\n"


@dataclass
class IdleResult:
    wanted: int
    opened: int
    held: int
    rss_before_kib: int
    rss_after_kib: int
    seconds_to_open: float
    first_error: str | None

    @property
    def kib_per_connection(self) -> float | None:
        if self.held <= 0:
            return None
        return (self.rss_after_kib - self.rss_before_kib) / self.held

    def as_dict(self) -> dict[str, object]:
        kib = self.kib_per_connection
        return {
            "wanted": self.wanted,
            "opened": self.opened,
            "held": self.held,
            "rss_before_kib": self.rss_before_kib,
            "rss_after_kib": self.rss_after_kib,
            "kib_per_connection": None if kib is None else round(kib, 2),
            "seconds_to_open": round(self.seconds_to_open, 2),
            "first_error": self.first_error,
        }


async def _read_response(reader: asyncio.StreamReader) -> None:
    head = await reader.readuntil(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n"):
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value.strip())
    if length:
        await reader.readexactly(length)


async def _hold_idle(
    port: int,
    count: int,
    pids: Callable[[], list[int]],
    settle: float,
    concurrency: int,
) -> IdleResult:
    gc.collect()
    await asyncio.sleep(0.5)
    before = rss_kib(pids())
    streams: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
    errors: list[str] = []
    gate = asyncio.Semaphore(concurrency)

    async def one() -> None:
        async with gate:
            writer: asyncio.StreamWriter | None = None
            try:
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
                writer.write(REQUEST)
                await _read_response(reader)
                streams.append((reader, writer))
            except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError) as exc:
                errors.append(f"{type(exc).__name__}: {exc}")
                if writer is not None:
                    writer.close()

    started = time.monotonic()
    await asyncio.gather(*(one() for _ in range(count)))
    opened_in = time.monotonic() - started
    await asyncio.sleep(settle)
    after = rss_kib(pids())
    held = sum(1 for reader, _ in streams if not reader.at_eof())
    for _, writer in streams:
        writer.close()
    for _, writer in streams:
        with contextlib.suppress(OSError):
            await writer.wait_closed()
    return IdleResult(
        wanted=count,
        opened=len(streams),
        held=held,
        rss_before_kib=before,
        rss_after_kib=after,
        seconds_to_open=opened_in,
        first_error=errors[0] if errors else None,
    )


def measure_idle_memory(
    port: int,
    count: int,
    pids: Callable[[], list[int]],
    settle: float = 2.0,
    concurrency: int = 200,
    timeout: float = 180.0,
) -> IdleResult:
    """Open ``count`` idle keep-alive connections and measure the proxy's RSS growth."""

    async def bounded() -> IdleResult:
        return await asyncio.wait_for(_hold_idle(port, count, pids, settle, concurrency), timeout)

    return asyncio.run(bounded())
