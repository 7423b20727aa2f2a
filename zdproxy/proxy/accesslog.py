"""The access log: one line per request, gathered on the data path, written in batches.

Per request the data path only appends a tuple of values it already has (a
``Record``) to a list; formatting and writing happen in a batch, at most
``FLUSH_INTERVAL`` later or as soon as ``FLUSH_LINES`` are waiting, and
everything left is written on shutdown. Lines go to a file (opened for append)
or to stderr. A file that was moved or deleted (log rotation) is reopened at
the next batch, and SIGUSR1 reopens it at once, as nginx does.

The formatting functions are pure: a record and the wall-clock offset in, one
line out. Durations are in seconds with millisecond resolution (the loop's clock),
as nginx's ``$request_time``. Values a client chose (target, User-Agent, Referer) are escaped so
that they can neither end a line nor close a quoted field.
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
import time
from collections.abc import Callable, Sequence
from functools import lru_cache
from typing import TYPE_CHECKING

from zdproxy.errors import ZdproxyError

if TYPE_CHECKING:
    import asyncio

    from zdproxy.proxy.downstream import ClientConnection
    from zdproxy.proxy.exchange import Exchange

log = logging.getLogger("zdproxy.error")

FLUSH_INTERVAL = 0.1
FLUSH_LINES = 1000

#: (end time on the loop's clock, client address, method, target, HTTP version,
#: status, response body bytes, request body bytes, the request's forwarded header
#: list (name, ": ", value, "\r\n", ...), duration, upstream time or None, pool,
#: backend id, retries, error cause, request id)
Record = tuple[
    float,
    str,
    bytes,
    bytes,
    str,
    int,
    int,
    int,
    Sequence[bytes],
    float,
    float | None,
    str | None,
    str | None,
    int,
    str | None,
    bytes | None,
]

Formatter = Callable[[Record, float], str]


class AccessLogError(ZdproxyError):
    """The access log file cannot be opened."""


# ---- formatting (pure) ------------------------------------------------------

#: bytes that must not reach a log line as they are: controls, quote, backslash, non-ASCII
_UNSAFE = re.compile(rb'[\x00-\x1f"\\\x7f-\xff]')
_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")


def _hex_escape(match: re.Match[bytes]) -> bytes:
    return b"\\x%02X" % match.group()[0]


def escape_combined(value: bytes) -> str:
    """A client's bytes inside a quoted field of the combined format, as nginx does it:
    quote, backslash, controls and non-ASCII bytes become ``\\xHH``."""
    if _UNSAFE.search(value) is None:
        return value.decode("ascii")
    return _UNSAFE.sub(_hex_escape, value).decode("ascii")


def json_string(value: bytes) -> str:
    """A client's bytes as a JSON string of printable ASCII only: UTF-8 is kept as
    ``\\uXXXX`` escapes, other bytes as a literal ``\\xHH`` text."""
    if _UNSAFE.search(value) is None:
        return '"' + value.decode("ascii") + '"'
    return json.dumps(value.decode("utf-8", "backslashreplace"))


def request_headers(forwarded: Sequence[bytes]) -> tuple[bytes | None, bytes | None]:
    """(User-Agent, Referer) from the request's header list, when present."""
    agent = referer = None
    for i in range(0, len(forwarded) - 2, 4):
        name = forwarded[i]
        size = len(name)  # compare lengths first: most names are neither
        if size == 10 and name.lower() == b"user-agent":
            agent = forwarded[i + 2]
        elif size == 7 and name.lower() == b"referer":
            referer = forwarded[i + 2]
    return agent, referer


def rfc3339(wall: float) -> str:
    """UTC with milliseconds: ``2026-11-30T23:50:07.123Z``."""
    seconds, millis = divmod(round(wall * 1000), 1000)
    return f"{_rfc3339_second(seconds)}.{millis:03d}Z"


# the lines of a batch share a few seconds: each is formatted once (gmtime is slow)
@lru_cache(maxsize=8)
def _rfc3339_second(seconds: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds))


def clf_time(wall: float) -> str:
    """Common log format time, in UTC: ``30/Nov/2026:23:50:07 +0000``."""
    return _clf_second(int(wall))


@lru_cache(maxsize=8)
def _clf_second(seconds: int) -> str:
    t = time.gmtime(seconds)
    return (
        f"{t.tm_mday:02d}/{_MONTHS[t.tm_mon - 1]}/{t.tm_year:04d}"
        f":{t.tm_hour:02d}:{t.tm_min:02d}:{t.tm_sec:02d} +0000"
    )


def format_combined(record: Record, offset: float) -> str:
    """nginx/Apache combined format, then zdproxy's fields as ``key=value``."""
    (
        end,
        client,
        method,
        target,
        version,
        status,
        sent,
        _received,
        headers,
        duration,
        upstream_time,
        pool,
        backend,
        retries,
        cause,
        request_id,
    ) = record
    agent, referer = request_headers(headers)
    if method:
        request = f"{escape_combined(method)} {escape_combined(target)} HTTP/{version}"
    else:
        request = "-"  # nothing parsable arrived
    return (
        f'{client or "-"} - - [{clf_time(end + offset)}] "{request}" {status} {sent} '
        f'"{"-" if referer is None else escape_combined(referer)}" '
        f'"{"-" if agent is None else escape_combined(agent)}" '
        f"pool={pool or '-'} backend={backend or '-'} "
        f"upstream_time={'-' if upstream_time is None else f'{upstream_time:.3f}'} "
        f"duration={duration:.3f} retries={retries} error={cause or '-'} "
        f"request_id={'-' if request_id is None else request_id.decode('ascii')}"
    )


def format_json(record: Record, offset: float) -> str:
    """One JSON object; every value the client chose is escaped to printable ASCII."""
    (
        end,
        client,
        method,
        target,
        version,
        status,
        sent,
        received,
        headers,
        duration,
        upstream_time,
        pool,
        backend,
        retries,
        cause,
        request_id,
    ) = record
    agent, referer = request_headers(headers)
    return (
        f'{{"time":"{rfc3339(end + offset)}","client":"{client}",'
        f'"method":{json_string(method) if method else "null"},'
        f'"target":{json_string(target) if method else "null"},'
        f'"version":"{version}","status":{status},"bytes_sent":{sent},'
        f'"request_body_bytes":{received},'
        f'"user_agent":{"null" if agent is None else json_string(agent)},'
        f'"referer":{"null" if referer is None else json_string(referer)},'
        f'"duration":{duration:.3f},'
        f'"upstream_time":{"null" if upstream_time is None else f"{upstream_time:.3f}"},'
        f'"pool":{_opt(pool)},"backend":{_opt(backend)},"retries":{retries},'
        f'"error":{_opt(cause)},'
        # a request ID is validated or generated: [A-Za-z0-9._:+/=-] only
        f'"request_id":{"null" if request_id is None else _opt(request_id.decode("ascii"))}}}'
    )


def _opt(value: str | None) -> str:
    # pool names, backend ids (config-checked: [A-Za-z0-9_.:-]) and error causes are
    # the proxy's own strings: nothing in them needs escaping
    return "null" if value is None else '"' + value + '"'


FORMATTERS: dict[str, Formatter] = {"combined": format_combined, "json": format_json}


# ---- the buffer and the writer ----------------------------------------------


class AccessLog:
    """Records gathered per request, written in batches off the request's path."""

    __slots__ = (
        "_buffer",
        "_error_logged",
        "_fd",
        "_format",
        "_identity",
        "_loop",
        "_path",
        "_timer",
        "closed",
    )

    def __init__(self, fmt: str, path: str | None, loop: asyncio.AbstractEventLoop) -> None:
        self._format = FORMATTERS[fmt]
        self._path = path
        self._loop = loop
        self._buffer: list[Record] = []
        self._timer: asyncio.TimerHandle | None = None
        self._error_logged = 0.0
        self._fd = sys.stderr.fileno() if path is None else -1
        self._identity: tuple[int, int] | None = None
        self.closed = False
        if path is not None:
            try:
                self._open()
            except OSError as exc:
                raise AccessLogError(
                    f"cannot open the access log {path}: {exc.strerror or exc}"
                ) from None

    # per request: gather, never format or write

    def add(self, exchange: Exchange, status: int, cause: str | None, now: float) -> None:
        """Called by the exchange when its response is complete (or given up), at
        loop time ``now`` (the exchange reads the clock once for all it records)."""
        started = exchange.started_at
        head_at = exchange.head_at
        backend = exchange.backend
        attempts = exchange.attempts
        self._append(
            (
                now,
                exchange.conn.client_ip,
                exchange.method,
                exchange.url,
                exchange.version,
                status,
                exchange.body_bytes,
                exchange.received_body,
                exchange.forwarded,
                now - started if started else 0.0,
                head_at - started if head_at and started else None,
                None if backend is None else backend.pool,
                None if backend is None else backend.id,
                attempts - 1 if attempts > 1 else 0,
                cause,
                exchange.request_id,
            )
        )

    def add_rejected(
        self,
        conn: ClientConnection,
        exchange: Exchange | None,
        status: int,
        cause: str,
        sent: int,
        request_id: bytes | None,
    ) -> None:
        """A request the connection refused before it became an exchange's to answer
        (malformed head, limits, header timeout)."""
        self._append(
            (
                self._loop.time(),
                conn.client_ip,
                b"" if exchange is None else exchange.method,
                b"" if exchange is None else exchange.url,
                "1.1" if exchange is None else exchange.version,
                status,
                sent,
                0 if exchange is None else exchange.received_body,
                () if exchange is None else exchange.forwarded,
                0.0,
                None,
                None,
                None,
                0,
                cause,
                request_id,
            )
        )

    def _append(self, record: Record) -> None:
        buffer = self._buffer
        buffer.append(record)
        if len(buffer) >= FLUSH_LINES or self.closed:
            self.flush()
        elif self._timer is None:
            self._timer = self._loop.call_later(FLUSH_INTERVAL, self.flush)

    # per batch: format and write

    def flush(self) -> None:
        timer = self._timer
        if timer is not None:
            self._timer = None
            timer.cancel()
        records = self._buffer
        if not records:
            return
        self._buffer = []
        offset = time.time() - self._loop.time()
        fmt = self._format
        lines = [fmt(record, offset) for record in records]
        lines.append("")
        data = "\n".join(lines).encode("ascii", "backslashreplace")
        if self._path is not None:
            self._reopen_if_moved()
        self._write(data, len(records))

    def _write(self, data: bytes, count: int) -> None:
        # a regular file or stderr: the write lands in the page cache or a pipe
        view = memoryview(data)
        try:
            while view:
                written = os.write(self._fd, view)
                view = view[written:]
        except OSError as exc:
            now = time.monotonic()
            if now - self._error_logged >= 60:
                self._error_logged = now
                log.error("access log: %d lines lost: %s", count, exc)

    def close(self) -> None:
        """Write everything gathered; later records are written at once."""
        self.closed = True
        self.flush()

    # files

    def _open(self) -> None:
        assert self._path is not None
        fd = os.open(self._path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)
        old = self._fd
        self._fd = fd
        st = os.fstat(fd)
        self._identity = (st.st_dev, st.st_ino)
        if old >= 0:
            os.close(old)

    def reopen(self) -> None:
        """Open the path again (log rotation: SIGUSR1, or the file was moved)."""
        if self._path is None or self.closed:
            return
        self.flush()
        try:
            self._open()
        except OSError as exc:
            log.error("access log: cannot reopen %s: %s", self._path, exc)

    def _reopen_if_moved(self) -> None:
        assert self._path is not None
        try:
            st = os.stat(self._path)
            moved = (st.st_dev, st.st_ino) != self._identity
        except OSError:
            moved = True
        if moved and not self.closed:
            try:
                self._open()
            except OSError as exc:
                now = time.monotonic()
                if now - self._error_logged >= 60:
                    self._error_logged = now
                    log.error("access log: cannot reopen %s: %s", self._path, exc)
