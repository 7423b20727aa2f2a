"""Fixtures for the hostile-HTTP suites: a recording raw backend, a real proxy
process, and a raw-socket client.

* :class:`RecordingBackend` is a raw asyncio server in a thread of its own. It
  parses every request it receives with its own strict parser (not httptools,
  so the proxy's parser is not checking itself), records the raw bytes, and
  flags any request that is malformed or that a connection ended in the middle
  of. The request target selects a misbehaviour (``/fault/<name>``, see
  :data:`FAULTS`); anything else gets a small ``200``.
* :class:`ProxyProcess` runs ``zdproxy run -c`` as a subprocess on a free port,
  with health checks off and in-memory state, and only ever signals its own PID.
* :func:`exchange` and :class:`RawClient` speak raw bytes and read a response
  with a tiny independent parser.

Waiting is always polling with a deadline (:func:`wait_for`), never a bare sleep.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import fcntl
import hashlib
import os
import re
import signal
import socket
import struct
import subprocess
import sys
import termios
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from ports import free_port

HOST = "127.0.0.1"

# --------------------------------------------------------------------------------------
# waiting


def wait_for(predicate: Callable[[], Any], timeout: float = 5.0, what: str = "condition") -> Any:
    """Poll ``predicate`` until it returns something truthy; fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    delay = 0.002
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(delay)
        delay = min(delay * 2, 0.05)


# --------------------------------------------------------------------------------------
# a strict, independent HTTP/1.1 request parser (what the proxy must send upstream)

_TCHAR = frozenset(b"!#$%&'*+-.^_`|~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz")
_TARGET_OK = frozenset([*range(0x21, 0x7F), *range(0x80, 0x100)])
_VALUE_OK = frozenset([0x09, *range(0x20, 0x7F), *range(0x80, 0x100)])
#: headers a proxy must never pass on (hop-by-hop); Connection only as "upgrade"
_HOP_BY_HOP = frozenset(
    {b"keep-alive", b"proxy-connection", b"te", b"trailer", b"proxy-authorization"}
)
_MAX_HEAD = 1 << 20


class Malformed(Exception):
    """The bytes a backend received are not one well-formed HTTP/1.1 request."""


@dataclass
class Request:
    """One request as a backend saw it."""

    conn_id: int
    index: int  # 1 for the first request on its connection
    method: bytes
    target: bytes
    headers: list[tuple[bytes, bytes]]
    body: bytes
    raw: bytes

    def header(self, name: bytes) -> bytes | None:
        lname = name.lower()
        for key, value in self.headers:
            if key.lower() == lname:
                return value
        return None


def _is_token(data: bytes) -> bool:
    return bool(data) and all(b in _TCHAR for b in data)


def parse_request_head(head: bytes) -> tuple[bytes, bytes, list[tuple[bytes, bytes]]]:
    """Validate a head (without the final CRLF CRLF) strictly; raise Malformed."""
    if b"\r\n" in head and head.replace(b"\r\n", b"").find(b"\n") >= 0:
        raise Malformed("bare LF in head")
    if b"\r" in head.replace(b"\r\n", b""):
        raise Malformed("bare CR in head")
    lines = head.split(b"\r\n")
    parts = lines[0].split(b" ")
    if len(parts) != 3:
        raise Malformed(f"request line {lines[0][:80]!r} is not METHOD SP TARGET SP VERSION")
    method, target, version = parts
    if not _is_token(method):
        raise Malformed(f"bad method {method!r}")
    if not target or any(b not in _TARGET_OK for b in target):
        raise Malformed(f"bad target {target[:80]!r}")
    if version != b"HTTP/1.1":
        raise Malformed(f"proxy sent version {version!r}")
    headers: list[tuple[bytes, bytes]] = []
    for line in lines[1:]:
        if line[:1] in (b" ", b"\t"):
            raise Malformed("obs-fold")
        name, colon, value = line.partition(b":")
        if not colon or not _is_token(name):
            raise Malformed(f"bad header line {line[:80]!r}")
        if any(b not in _VALUE_OK for b in value):
            raise Malformed(f"bad header value in {name!r}")
        headers.append((name, value.strip(b" \t")))
    return method, target, headers


def body_framing(headers: list[tuple[bytes, bytes]]) -> tuple[bool, int]:
    """(chunked, content_length) of a request the proxy sent; raise Malformed on any doubt."""
    lengths = [v for k, v in headers if k.lower() == b"content-length"]
    codings = [v for k, v in headers if k.lower() == b"transfer-encoding"]
    hosts = [v for k, v in headers if k.lower() == b"host"]
    if len(hosts) > 1:
        raise Malformed("several Host headers")
    for name, value in headers:
        lname = name.lower()
        if lname in _HOP_BY_HOP:
            raise Malformed(f"hop-by-hop header {name!r} forwarded")
        if lname == b"connection" and value.lower() != b"upgrade":
            raise Malformed(f"Connection: {value!r} forwarded")
    if codings and lengths:
        raise Malformed("both Content-Length and Transfer-Encoding")
    if codings:
        items = [c.strip(b" \t") for value in codings for c in value.split(b",")]
        if len(codings) > 1 or items[-1] != b"chunked" or items.count(b"chunked") > 1:
            raise Malformed(f"Transfer-Encoding {codings!r}")
        if not set(items[:-1]) <= {b"gzip", b"deflate", b"compress"}:
            raise Malformed(f"Transfer-Encoding {codings!r}")
        return True, 0
    if len(lengths) > 1:
        raise Malformed("several Content-Length headers")
    if lengths:
        if not lengths[0].isdigit():
            raise Malformed(f"Content-Length {lengths[0]!r}")
        return False, int(lengths[0])
    return False, 0


class NeedMore(Exception):
    pass


def read_chunked(buf: bytes, start: int) -> tuple[bytes, int]:
    """Decode a chunked body strictly from ``buf[start:]``: (body, end offset)."""
    pos = start
    body = bytearray()
    while True:
        eol = buf.find(b"\r\n", pos)
        if eol < 0:
            if len(buf) - pos > 1024:
                raise Malformed("chunk-size line too long")
            raise NeedMore
        line = buf[pos:eol]
        size_text, _, ext = line.partition(b";")
        if not size_text or any(c not in b"0123456789abcdefABCDEF" for c in size_text):
            raise Malformed(f"bad chunk size {line[:40]!r}")
        if ext:
            raise Malformed("the proxy forwarded a chunk extension")
        size = int(size_text, 16)
        pos = eol + 2
        if size == 0:
            # trailer section: the proxy sends none
            if buf[pos : pos + 2] == b"\r\n":
                return bytes(body), pos + 2
            if len(buf) - pos < 2:
                raise NeedMore
            raise Malformed("the proxy forwarded trailers")
        if len(buf) < pos + size + 2:
            raise NeedMore
        body += buf[pos : pos + size]
        if buf[pos + size : pos + size + 2] != b"\r\n":
            raise Malformed("chunk data not followed by CRLF")
        pos += size + 2


def websocket_accept(key: bytes) -> bytes:
    digest = hashlib.sha1(key + b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11").digest()
    return base64.b64encode(digest)


# --------------------------------------------------------------------------------------
# the recording backend

FAULTS = {
    "bad-status": "status line that is not HTTP (502)",
    "garbage": "bytes that are not a response at all (502)",
    "te-chunked-chunked": "Transfer-Encoding: chunked, chunked (502)",
    "te-gzip": "Transfer-Encoding: gzip without chunked (502)",
    "cl-and-chunked": "Content-Length and chunked together (forwarded chunked)",
    "two-cl": "two differing Content-Length headers (502)",
    "bad-chunk": "valid head, then an invalid chunk size (client connection closed)",
    "reset-mid-body": "head and part of the body, then a TCP reset",
    "close-mid-body": "head and part of a Content-Length body, then FIN",
    "early-response": "answer as soon as the head arrived, before the request body",
    "slow-body": "head, then the body a few bytes at a time (slow)",
    "hang": "read the request, never answer",
    "ws-no-accept": "101 without Sec-WebSocket-Accept (502)",
    "ws-echo": "101 with a proper accept, then echo raw bytes; on EOF send <eof> and close",
    "ws-half-close": "101, then 'hello' and EOF; keeps reading (recording) until the peer closes",
    "ws-push": "101, 'tick|' every 0.2 s for 3 s, 'done|'; then reads until the peer closes",
    "close": "200 with Connection: close",
}


@dataclass
class BackendConn:
    conn_id: int
    raw: bytearray = field(default_factory=bytearray)
    requests: int = 0
    closed: bool = False
    #: a request this connection ended in the middle of (its bytes), if any
    incomplete: bytes | None = None


class RecordingBackend:
    """A raw HTTP/1.1 server in a thread, recording everything it receives.

    ``requests`` lists every complete well-formed request; ``malformed`` the
    (reason, raw bytes) of anything else; ``conns`` every connection with its
    raw bytes and whether it ended mid-request.
    """

    def __init__(self, faults: bool = True) -> None:
        #: False: every request gets the plain 200, whatever its target (for fuzzing)
        self.faults = faults
        self.port = 0
        self.requests: list[Request] = []
        self.malformed: list[tuple[str, bytes]] = []
        self.conns: list[BackendConn] = []
        #: (connection id, target) of every request head, as soon as it arrives
        self.heads: list[tuple[int, bytes]] = []
        self._cond = threading.Condition()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._ready = threading.Event()

    # -- lifecycle

    def start(self) -> RecordingBackend:
        self._thread = threading.Thread(target=self._run, name="recording-backend", daemon=True)
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("recording backend did not start")
        return self

    def _run(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        self._server = loop.run_until_complete(
            asyncio.start_server(self._serve, HOST, 0, backlog=1024)
        )
        self.port = self._server.sockets[0].getsockname()[1]
        self._ready.set()
        loop.run_forever()
        self._server.close()
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            loop.run_until_complete(asyncio.gather(*self._tasks, return_exceptions=True))
        loop.run_until_complete(self._server.wait_closed())
        loop.close()

    def stop(self) -> None:
        if self._loop is not None and self._thread is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)

    # -- queries (thread-safe)

    def snapshot(self) -> tuple[list[Request], list[tuple[str, bytes]], list[BackendConn]]:
        with self._cond:
            return list(self.requests), list(self.malformed), list(self.conns)

    def mark(self) -> tuple[int, int, int]:
        """Counts now, for :meth:`since`."""
        with self._cond:
            return len(self.requests), len(self.malformed), len(self.conns)

    def since(
        self, mark: tuple[int, int, int]
    ) -> tuple[list[Request], list[tuple[str, bytes]], list[BackendConn]]:
        with self._cond:
            return (
                self.requests[mark[0] :],
                self.malformed[mark[1] :],
                self.conns[mark[2] :],
            )

    def wait_requests(self, count: int, timeout: float = 5.0) -> list[Request]:
        def enough() -> list[Request] | None:
            with self._cond:
                return list(self.requests) if len(self.requests) >= count else None

        result: list[Request] = wait_for(enough, timeout, f"{count} backend requests")
        return result

    def wait_head(self, target: bytes, timeout: float = 5.0) -> int:
        """Wait until a request head for ``target`` arrived; its connection id."""

        def found() -> int | None:
            with self._cond:
                for conn_id, seen in self.heads:
                    if seen == target:
                        return conn_id
            return None

        conn_id: int = wait_for(found, timeout, f"a request head for {target!r}")
        return conn_id

    def conn(self, conn_id: int) -> BackendConn:
        with self._cond:
            return self.conns[conn_id - 1]

    # -- serving

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        with self._cond:
            conn = BackendConn(conn_id=len(self.conns) + 1)
            self.conns.append(conn)
        buf = b""
        try:
            while True:
                try:
                    request, buf = await self._read_request(reader, writer, conn, buf)
                except Malformed as exc:
                    with self._cond:
                        self.malformed.append((str(exc), bytes(conn.raw)))
                    writer.write(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")
                    break
                if request is None:
                    break
                keep = await self._respond(request, reader, writer, conn)
                if not keep:
                    break
        except (ConnectionError, OSError):
            pass
        finally:
            with self._cond:
                conn.closed = True
            self._tasks.discard(task)
            with contextlib.suppress(Exception):
                writer.close()

    async def _read_more(self, reader: asyncio.StreamReader, conn: BackendConn) -> bytes:
        try:
            data = await reader.read(65536)
        except (ConnectionError, OSError):
            data = b""
        if data:
            with self._cond:
                conn.raw += data
        return data

    async def _read_request(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        conn: BackendConn,
        buf: bytes,
    ) -> tuple[Request | None, bytes]:
        """The next request on ``conn``, or None at a clean end of the connection."""
        while b"\r\n\r\n" not in buf:
            if len(buf) > _MAX_HEAD:
                raise Malformed("head too large")
            data = await self._read_more(reader, conn)
            if not data:
                if buf:
                    with self._cond:
                        conn.incomplete = buf
                return None, b""
            buf += data
        end = buf.index(b"\r\n\r\n")
        method, target, headers = parse_request_head(buf[:end])
        chunked, length = body_framing(headers)
        start = end + 4
        with self._cond:
            self.heads.append((conn.conn_id, target))
            self._cond.notify_all()
        if self.faults and target.startswith(b"/fault/early-response"):
            # answer before reading the body (as a backend refusing an upload does)
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nearly")
            await writer.drain()
        while True:
            try:
                if chunked:
                    body, stop = read_chunked(buf, start)
                else:
                    if len(buf) < start + length:
                        raise NeedMore
                    body, stop = buf[start : start + length], start + length
                break
            except NeedMore:
                data = await self._read_more(reader, conn)
                if not data:
                    with self._cond:
                        conn.incomplete = buf
                    return None, b""
                buf += data
        with self._cond:
            conn.requests += 1
            request = Request(
                conn.conn_id, conn.requests, method, target, headers, body, buf[:stop]
            )
            self.requests.append(request)
            self._cond.notify_all()
        return request, buf[stop:]

    async def _respond(
        self,
        request: Request,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        conn: BackendConn,
    ) -> bool:
        """Answer ``request``; False when the connection is to end."""
        fault = ""
        if self.faults and request.target.startswith(b"/fault/"):
            fault = request.target[7:].split(b"?")[0].split(b"/")[0].decode("latin-1")
        ident = b"X-Backend-Conn: %d\r\nX-Backend-Req: %d\r\n" % (conn.conn_id, request.index)
        if fault == "":
            body = b"ok %d" % len(request.body)
            writer.write(
                b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n%s\r\n%s" % (len(body), ident, body)
            )
            await writer.drain()
            return True
        if fault == "close":
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok")
            await writer.drain()
            return False
        if fault == "bad-status":
            writer.write(b"HTTP/1.1 2x0 Whatever\r\nContent-Length: 0\r\n\r\n")
            await writer.drain()
            return await self._linger(reader, conn)
        if fault == "garbage":
            writer.write(b"\x00\x01\x02 this is not HTTP\r\n\r\n")
            await writer.drain()
            return await self._linger(reader, conn)
        if fault == "te-chunked-chunked":
            writer.write(
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked, chunked\r\n%s\r\n"
                b"5\r\nhello\r\n0\r\n\r\n" % ident
            )
            await writer.drain()
            return await self._linger(reader, conn)
        if fault == "te-gzip":
            writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n%s\r\nhello" % ident)
            await writer.drain()
            return await self._linger(reader, conn)
        if fault == "two-cl":
            writer.write(
                b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 6\r\n%s\r\nhello!" % ident
            )
            await writer.drain()
            return await self._linger(reader, conn)
        if fault == "cl-and-chunked":
            writer.write(
                b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n%s\r\n"
                b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n" % ident
            )
            await writer.drain()
            return True
        if fault == "bad-chunk":
            writer.write(
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n%s\r\n5\r\nhello\r\n" % ident
            )
            await writer.drain()
            await self._flushed(writer)
            writer.write(b"zz\r\nnot a chunk\r\n0\r\n\r\n")
            await writer.drain()
            return await self._linger(reader, conn)
        if fault in ("reset-mid-body", "close-mid-body"):
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n%s\r\n" % ident)
            writer.write(b"x" * 1000)
            await writer.drain()
            await self._flushed(writer)
            if fault == "reset-mid-body":
                _reset(writer)
            return False
        if fault == "early-response":
            return await self._linger(reader, conn)  # answered when the head came
        if fault == "slow-body":
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n%s\r\n" % ident)
            for _ in range(2000):
                writer.write(b"x" * 50)
                await writer.drain()
                await asyncio.sleep(0.01)  # the misbehaviour itself: a slow backend
            return True
        if fault == "hang":
            return await self._linger(reader, conn)
        if fault == "ws-no-accept":
            writer.write(
                b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                b"Connection: Upgrade\r\n\r\n"
            )
            await writer.drain()
            return await self._linger(reader, conn)
        if fault == "ws-echo":
            key = request.header(b"sec-websocket-key") or b""
            writer.write(
                b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                b"Connection: Upgrade\r\nSec-WebSocket-Accept: %s\r\n\r\n" % websocket_accept(key)
            )
            await writer.drain()
            await self._echo(reader, writer, conn)
            return False
        if fault == "ws-push":
            key = request.header(b"sec-websocket-key") or b""
            writer.write(
                b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                b"Connection: Upgrade\r\nSec-WebSocket-Accept: %s\r\n\r\n" % websocket_accept(key)
            )
            for _ in range(15):
                writer.write(b"tick|")
                await writer.drain()
                await asyncio.sleep(0.2)  # the backend's own pace: a live feed
            writer.write(b"done|")
            await writer.drain()
            return await self._linger(reader, conn)
        if fault == "ws-half-close":
            key = request.header(b"sec-websocket-key") or b""
            writer.write(
                b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                b"Connection: Upgrade\r\nSec-WebSocket-Accept: %s\r\n\r\nhello"
                % websocket_accept(key)
            )
            await writer.drain()
            writer.write_eof()
            return await self._linger(reader, conn)
        body = b"unknown fault"
        writer.write(b"HTTP/1.1 404 Not Found\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
        await writer.drain()
        return True

    async def _linger(self, reader: asyncio.StreamReader, conn: BackendConn) -> bool:
        """Keep reading (and recording) until the peer closes; never answer again."""
        while await self._read_more(reader, conn):
            pass
        return False

    async def _echo(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, conn: BackendConn
    ) -> None:
        while True:
            data = await self._read_more(reader, conn)
            if not data:
                break
            writer.write(data)
            await writer.drain()
        # the client half-closed: this direction still works
        writer.write(b"<eof>")
        await writer.drain()

    @staticmethod
    async def _flushed(writer: asyncio.StreamWriter, timeout: float = 5.0) -> None:
        """Wait until the kernel sent everything written (so a reset cannot eat it)."""
        sock = writer.get_extra_info("socket")
        deadline = time.monotonic() + timeout
        buf = bytearray(4)
        while time.monotonic() < deadline:
            fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, buf)
            if struct.unpack("i", buf)[0] == 0:
                return
            await asyncio.sleep(0.005)


def _reset(writer: asyncio.StreamWriter) -> None:
    sock = writer.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


# --------------------------------------------------------------------------------------
# the proxy process


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """``extra`` over ``base``, recursively; a None value removes the key."""
    out = dict(base)
    for key, value in extra.items():
        if value is None:
            out.pop(key, None)
        elif isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def _accepts(port: int) -> bool:
    try:
        with socket.create_connection((HOST, port), timeout=0.5):
            return True
    except OSError:
        return False


class ProxyProcess:
    """``zdproxy run -c`` in a subprocess on a free port, in front of ``backends``."""

    def __init__(
        self,
        workdir: Path,
        backends: list[int],
        overrides: dict[str, Any] | None = None,
        env: dict[str, str] | None = None,
    ) -> None:
        self.workdir = workdir
        self.backends = backends
        self.overrides = overrides or {}
        self.env = {**os.environ, **(env or {})}
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = workdir / "zdproxy.log"
        self.command = [sys.executable, "-m", "zdproxy.cli"]

    def config(self) -> dict[str, Any]:
        base: dict[str, Any] = {
            "listen": f"{HOST}:{self.port}",
            "admin": {"enabled": False},
            "state": {"path": None},
            "health_check": {"enabled": False},
            "outlier_detection": {"enabled": False},
            "retries": {"attempts": 0},
            "log": {"level": "warning"},
            "shutdown_timeout": "2s",
            "pools": {
                "blue": {
                    "weight": 100,
                    "backends": [{"address": f"{HOST}:{port}"} for port in self.backends],
                }
            },
        }
        return _merge(base, self.overrides)

    def start(self) -> ProxyProcess:
        for _attempt in range(3):
            self.port = free_port()
            path = self.workdir / "zdproxy.yaml"
            path.write_text(yaml.safe_dump(self.config()))
            log = self.log_path.open("ab")
            self.proc = subprocess.Popen(
                [*self.command, "run", "-c", str(path)],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                cwd=self.workdir,
                env=self.env,
            )
            log.close()
            if self._wait_listening():
                return self
            self.stop()
        raise RuntimeError(f"zdproxy did not start:\n{self.log()}")

    def _wait_listening(self, timeout: float = 15.0) -> bool:
        """The data port and, when enabled, the admin port accept connections. The
        data listener is bound first thing at start, so it alone says little."""
        ports = [self.port]
        admin = self.config()["admin"]
        if admin.get("enabled", True) and "listen" in admin:
            ports.append(int(str(admin["listen"]).rpartition(":")[2]))
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                return False
            if all(_accepts(port) for port in ports):
                return True
            time.sleep(0.02)
        return False

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def stop(self) -> int | None:
        proc = self.proc
        if proc is None:
            return None
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGTERM)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait(10)
        return proc.returncode


# --------------------------------------------------------------------------------------
# the raw client


@dataclass
class Response:
    status: int
    reason: bytes
    headers: list[tuple[bytes, bytes]]
    body: bytes
    #: the body ended because the connection closed before its declared end
    truncated: bool = False

    def header(self, name: bytes) -> bytes | None:
        lname = name.lower()
        for key, value in self.headers:
            if key.lower() == lname:
                return value
        return None

    def all(self, name: bytes) -> list[bytes]:
        lname = name.lower()
        return [value for key, value in self.headers if key.lower() == lname]


_STATUS_LINE = re.compile(rb"HTTP/1\.[01] (\d{3}) ?(.*)")


class RawClient:
    """One TCP connection to the proxy, read with a tiny independent response parser."""

    def __init__(self, port: int, timeout: float = 5.0) -> None:
        self.sock = socket.create_connection((HOST, port), timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.timeout = timeout
        self.buf = b""
        self.eof = False

    def __enter__(self) -> RawClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.sock.close()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def _fill(self) -> bool:
        if self.eof:
            return False
        try:
            data = self.sock.recv(65536)
        except ConnectionResetError:
            data = b""
        if not data:
            self.eof = True
            return False
        self.buf += data
        return True

    def _take_line(self) -> bytes:
        while b"\r\n" not in self.buf:
            if not self._fill():
                raise ConnectionError(f"connection closed mid-head: {self.buf[:200]!r}")
        line, _, self.buf = self.buf.partition(b"\r\n")
        return line

    def read_response(self, method: bytes = b"GET") -> Response:
        """The next final response (interim 1xx skipped, except 101)."""
        while True:
            response = self._read_one(method)
            if response.status >= 200 or response.status == 101:
                return response

    def _read_one(self, method: bytes) -> Response:
        line = self._take_line()
        match = _STATUS_LINE.fullmatch(line)
        if match is None:
            raise AssertionError(f"bad status line from the proxy: {line!r}")
        status = int(match.group(1))
        headers: list[tuple[bytes, bytes]] = []
        while True:
            line = self._take_line()
            if not line:
                break
            name, _, value = line.partition(b":")
            headers.append((name, value.strip()))
        response = Response(status, match.group(2), headers, b"")
        lengths = response.all(b"content-length")
        te = response.header(b"transfer-encoding")
        if te is not None:
            assert not lengths, "the proxy sent Content-Length with Transfer-Encoding"
        if method == b"HEAD" or status in (204, 304) or 100 <= status < 200:
            return response
        if te is not None:
            assert te.lower() == b"chunked", te
            response.body, response.truncated = self._read_chunked()
        elif lengths:
            assert len(set(lengths)) == 1, lengths
            need = int(lengths[0])
            while len(self.buf) < need and self._fill():
                pass
            response.body, self.buf = self.buf[:need], self.buf[need:]
            response.truncated = len(response.body) < need
        else:
            while self._fill():
                pass
            response.body, self.buf = self.buf, b""
        return response

    def _read_chunked(self) -> tuple[bytes, bool]:
        body = b""
        try:
            while True:
                size = int(self._take_line().split(b";")[0], 16)
                if size == 0:
                    while self._take_line():
                        pass
                    return body, False
                while len(self.buf) < size + 2:
                    if not self._fill():
                        return body + self.buf, True
                body += self.buf[:size]
                self.buf = self.buf[size + 2 :]
        except ConnectionError:
            return body, True

    def closed_by_peer(self, timeout: float = 3.0) -> bool:
        """True when the proxy closes the connection (EOF or reset) within ``timeout``
        and sends nothing more."""
        if self.buf:
            return False
        self.sock.settimeout(timeout)
        try:
            data = self.sock.recv(65536)
        except ConnectionResetError:
            return True
        except TimeoutError:
            return False
        finally:
            self.sock.settimeout(self.timeout)
        if data:
            self.buf += data
            return False
        self.eof = True
        return True

    def still_open(self, timeout: float = 0.2) -> bool:
        """Nothing arrives and the connection stays open for ``timeout``."""
        if self.buf or self.eof:
            return False
        self.sock.settimeout(timeout)
        try:
            data = self.sock.recv(65536)
        except TimeoutError:
            return True
        except OSError:
            return False
        finally:
            self.sock.settimeout(self.timeout)
        self.buf += data
        return False


def exchange(port: int, data: bytes, method: bytes = b"GET") -> tuple[Response, RawClient]:
    """Send ``data`` on a new connection and read one response; the caller closes."""
    client = RawClient(port)
    client.send(data)
    return client.read_response(method), client


def get(path: str = "/", host: str = "example.test", extra: bytes = b"") -> bytes:
    return b"GET %s HTTP/1.1\r\nHost: %s\r\n%s\r\n" % (path.encode(), host.encode(), extra)
