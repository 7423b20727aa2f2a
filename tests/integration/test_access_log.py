"""The access log and request IDs through a real ``zdproxy run`` process.

Each line is checked field by field against what the client sent and got and
what the backend saw; counts are exact (one line per request, none lost at
shutdown, none forged by a hostile client).
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import socket
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from support import (
    Backend,
    ZdproxyProcess,
    araw_request,
    async_wait_for,
    base_config,
    free_port,
    in_thread,
    running,
)

JSON_KEYS = {
    "time",
    "client",
    "method",
    "target",
    "version",
    "status",
    "bytes_sent",
    "request_body_bytes",
    "user_agent",
    "referer",
    "duration",
    "upstream_time",
    "pool",
    "backend",
    "retries",
    "error",
    "request_id",
}
RFC3339_MS = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")
GENERATED_ID = re.compile(r"^[0-9a-f]{12}-[0-9a-f]+$")
COMBINED = re.compile(
    r"^(?P<client>\S+) - - \[(?P<time>\d\d/[A-Z][a-z]{2}/\d{4}:\d\d:\d\d:\d\d \+0000)\] "
    r'"(?P<request>[^"]*)" (?P<status>\d{3}) (?P<bytes>\d+) "(?P<referer>[^"]*)" '
    r'"(?P<agent>[^"]*)" pool=(?P<pool>\S+) backend=(?P<backend>\S+) '
    r"upstream_time=(?P<upstream_time>-|\d+\.\d{3}) duration=(?P<duration>\d+\.\d{3}) "
    r"retries=(?P<retries>\d+) error=(?P<error>\S+) request_id=(?P<request_id>\S+)$"
)


class GarbageBackend:
    """Answers every connection with bytes that are not HTTP."""

    def __init__(self) -> None:
        self.port = free_port()
        self.server: asyncio.Server | None = None

    async def start(self) -> GarbageBackend:
        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await reader.read(65536)
            writer.write(b"this is not http\r\n\r\n")
            await writer.drain()
            writer.close()

        self.server = await asyncio.start_server(handle, "127.0.0.1", self.port)
        return self

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()


@pytest.fixture
async def backends() -> AsyncIterator[tuple[Backend, GarbageBackend]]:
    blue = await Backend("blue-1", "blue").start()
    garbage = await GarbageBackend().start()
    yield blue, garbage
    await blue.stop()
    await garbage.stop()


def config_for(
    blue: Backend, garbage: GarbageBackend, log: dict[str, Any], **extra: Any
) -> dict[str, Any]:
    pools = {
        "blue": {"weight": 100, "backends": [{"id": "blue-1", "address": blue.address}]},
        "empty": {"weight": 0, "backends": []},  # -> 503
        # nothing listens there: connect refused, retried (same backend), then 502
        "dead": {
            "weight": 0,
            "backends": [{"id": "dead-1", "address": f"127.0.0.1:{free_port()}"}],
        },
        "bad": {"weight": 0, "backends": [{"id": "bad-1", "address": f"127.0.0.1:{garbage.port}"}]},
    }
    return base_config(pools, log=log, **extra)


def read_lines(path: Path) -> list[str]:
    if not path.exists():
        return []
    data = path.read_bytes()
    assert data == b"" or data.endswith(b"\n"), "a partial line was written"
    return data.decode("ascii").splitlines()


async def wait_lines(path: Path, count: int) -> list[str]:
    await async_wait_for(lambda: len(read_lines(path)) >= count, what=f"{count} log lines")
    lines = read_lines(path)
    assert len(lines) == count, lines
    return lines


def head_of(response: bytes) -> dict[str, str]:
    """Header names (lower case) -> value of a raw response; the status as ':status'."""
    head = response.split(b"\r\n\r\n", 1)[0].decode("latin-1").split("\r\n")
    out = {":status": head[0].split(" ")[1]}
    for line in head[1:]:
        name, _, value = line.partition(":")
        assert name.lower() not in out, f"duplicate header {name}"
        out[name.lower()] = value.strip()
    return out


def body_of(response: bytes) -> bytes:
    return response.split(b"\r\n\r\n", 1)[1]


NORMAL = (
    b"POST /index?q=1 HTTP/1.1\r\nHost: shop\r\nUser-Agent: curl/8.0\r\n"
    b"Referer: http://shop/prev\r\nX-Request-Id: abc.123\r\nContent-Length: 5\r\n"
    b"Connection: close\r\n\r\nhello"
)
NOT_FOUND = b"GET /status/404 HTTP/1.1\r\nHost: shop\r\nConnection: close\r\n\r\n"
EMPTY = b"GET /w HTTP/1.1\r\nHost: shop\r\nX-Zdproxy-Pool: empty\r\nConnection: close\r\n\r\n"
DEAD = b"GET /x HTTP/1.1\r\nHost: shop\r\nX-Zdproxy-Pool: dead\r\nConnection: close\r\n\r\n"
BAD = b"GET /y HTTP/1.1\r\nHost: shop\r\nX-Zdproxy-Pool: bad\r\nConnection: close\r\n\r\n"
MALFORMED = b"GET /z HTTP/1.1\r\nHost shop\r\n\r\n"


async def six_kinds(port: int) -> list[bytes]:
    """A normal request, a backend's 404, a 503 (no backend), a 502 (connect refused),
    a 502 (garbage from the backend) and a malformed request (400), in this order."""
    requests = (NORMAL, NOT_FOUND, EMPTY, DEAD, BAD, MALFORMED)
    return [await araw_request(port, request) for request in requests]


#: per request of ``six_kinds``: status, method, target, pool, backend, retries, error,
#: request body bytes, User-Agent, Referer, whether a response head came from upstream
EXPECTED: list[tuple[Any, ...]] = [
    (200, "POST", "/index?q=1", "blue", "blue-1", 0, None, 5, "curl/8.0", "http://shop/prev", True),
    (404, "GET", "/status/404", "blue", "blue-1", 0, None, 0, None, None, True),
    (503, "GET", "/w", None, None, 0, "no-backend", 0, None, None, False),
    (502, "GET", "/x", "dead", "dead-1", 2, "upstream-connect", 0, None, None, False),
    (502, "GET", "/y", "bad", "bad-1", 0, "bad-upstream-response", 0, None, None, False),
    (400, "GET", "/z", None, None, 0, "bad-request", 0, None, None, False),
]


def check_request_ids(logged: list[str], heads: list[dict[str, str]], blue: Backend) -> None:
    """The client's valid ID is kept, others are generated, each unique; the same
    in the response and, for requests that reached it, at the backend."""
    assert logged == [head["x-request-id"] for head in heads]
    assert logged[0] == "abc.123"
    assert all(GENERATED_ID.match(request_id) for request_id in logged[1:]), logged
    assert len(set(logged)) == len(logged)
    at_backend = [
        [v.decode() for k, v in r["raw_headers"] if k.lower() == b"x-request-id"]
        for r in blue.requests
    ]
    assert at_backend == [[logged[0]], [logged[1]]]


async def test_json_lines_have_exact_fields(backends, tmp_path: Path) -> None:
    blue, garbage = backends
    log_path = tmp_path / "access.log"
    config = config_for(blue, garbage, {"access_log": "json", "access_log_path": str(log_path)})
    with running(config, tmp_path) as proxy:
        responses = await six_kinds(proxy.port)
        lines = await wait_lines(log_path, len(EXPECTED))
    entries = [json.loads(line) for line in lines]
    heads = [head_of(response) for response in responses]
    for entry, head, response, expected in zip(entries, heads, responses, EXPECTED, strict=True):
        assert set(entry) == JSON_KEYS
        assert RFC3339_MS.match(entry["time"]), entry["time"]
        assert (entry["client"], entry["version"]) == ("127.0.0.1", "1.1")
        assert isinstance(entry["duration"], float) and entry["duration"] >= 0
        got = (
            entry["status"],
            entry["method"],
            entry["target"],
            entry["pool"],
            entry["backend"],
            entry["retries"],
            entry["error"],
            entry["request_body_bytes"],
            entry["user_agent"],
            entry["referer"],
            isinstance(entry["upstream_time"], float),
        )
        assert got == expected
        assert entry["upstream_time"] is None or entry["upstream_time"] >= 0
        # what the client got: the status, the body's length, the error cause
        assert int(head[":status"]) == entry["status"]
        assert entry["bytes_sent"] == len(body_of(response)) > 0
        assert head.get("x-zdproxy-error") == entry["error"]
    check_request_ids([entry["request_id"] for entry in entries], heads, blue)


async def test_combined_lines_parse_with_exact_fields(backends, tmp_path: Path) -> None:
    blue, garbage = backends
    log_path = tmp_path / "access.log"
    config = config_for(blue, garbage, {"access_log": "combined", "access_log_path": str(log_path)})
    with running(config, tmp_path) as proxy:
        responses = await six_kinds(proxy.port)
        lines = await wait_lines(log_path, len(EXPECTED))
    heads = [head_of(response) for response in responses]
    ids = []
    for line, head, response, expected in zip(lines, heads, responses, EXPECTED, strict=True):
        match = COMBINED.match(line)
        assert match, line
        status, method, target, pool, backend, retries, error, _, agent, referer, up = expected
        assert match["client"] == "127.0.0.1"
        assert match["request"] == f"{method} {target} HTTP/1.1"
        assert match["status"] == head[":status"] == str(status)
        assert int(match["bytes"]) == len(body_of(response)) > 0
        assert match["referer"] == (referer or "-")
        assert match["agent"] == (agent or "-")
        assert (match["pool"], match["backend"]) == (pool or "-", backend or "-")
        assert (match["retries"], match["error"]) == (str(retries), error or "-")
        assert (match["upstream_time"] != "-") == up
        ids.append(match["request_id"])
    check_request_ids(ids, heads, blue)


async def test_one_line_per_request_over_keep_alive(backends, tmp_path: Path) -> None:
    blue, garbage = backends
    log_path = tmp_path / "access.log"
    config = config_for(blue, garbage, {"access_log": "json", "access_log_path": str(log_path)})
    with running(config, tmp_path) as proxy:
        connector = aiohttp.TCPConnector(limit=1)
        async with aiohttp.ClientSession(connector=connector) as session:
            for n in range(200):
                async with session.get(f"{proxy.url}/n/{n}") as response:
                    assert response.status == 200
                    await response.read()
        lines = await wait_lines(log_path, 200)
        assert len(blue.requests) == 200
    # nothing more came after the stop either
    assert len(read_lines(log_path)) == 200
    targets = [json.loads(line)["target"] for line in lines]
    assert targets == [f"/n/{n}" for n in range(200)]


async def test_lines_of_requests_finished_during_shutdown_are_written(
    backends, tmp_path: Path
) -> None:
    """SIGTERM while requests are in flight: each finishes, and its line reaches the
    file before the process exits (the batch timer never gets to fire)."""
    blue, garbage = backends
    log_path = tmp_path / "access.log"
    config = config_for(blue, garbage, {"access_log": "json", "access_log_path": str(log_path)})
    proxy = ZdproxyProcess(config, tmp_path).start()
    try:
        quick = [await araw_request(proxy.port, NOT_FOUND) for _ in range(10)]
        assert all(r.startswith(b"HTTP/1.1 404") for r in quick)
        slow = [
            asyncio.ensure_future(
                araw_request(proxy.port, b"GET /slow/0.5 HTTP/1.1\r\nHost: s\r\n\r\n", 10)
            )
            for _ in range(5)
        ]
        await async_wait_for(lambda: len(blue.requests) == 15, what="slow requests at the backend")
        proxy.signal(signal.SIGTERM)
        answers = await asyncio.gather(*slow)
        assert await in_thread(proxy.wait, 20) == 0
    finally:
        proxy.stop()
    assert all(a.startswith(b"HTTP/1.1 200") for a in answers)
    entries = [json.loads(line) for line in read_lines(log_path)]
    assert [e["target"] for e in entries] == ["/status/404"] * 10 + ["/slow/0.5"] * 5


async def test_off_writes_nothing(backends, tmp_path: Path) -> None:
    blue, garbage = backends
    log_path = tmp_path / "access.log"
    config = config_for(blue, garbage, {"access_log": "off", "access_log_path": str(log_path)})
    with running(config, tmp_path) as proxy:
        responses = await six_kinds(proxy.port)
        assert head_of(responses[0])[":status"] == "200"
    assert not log_path.exists()
    assert '"status"' not in proxy.log() and "request_id=" not in proxy.log()


async def test_default_destination_is_stderr(backends, tmp_path: Path) -> None:
    blue, garbage = backends
    config = config_for(blue, garbage, {"access_log": "combined"})
    with running(config, tmp_path) as proxy:
        await araw_request(proxy.port, NOT_FOUND)
        await async_wait_for(lambda: '"GET /status/404 HTTP/1.1" 404' in proxy.log())


HOSTILE_TARGET = b'/a"b\\c%0d%0a"?x={|}'
# the parser refuses other controls in a header value; these it lets through
HOSTILE_AGENT = b'evil" 200 0 "-" "x\x85\xe2\x80\xa8\t\\"'


async def test_client_values_cannot_forge_lines(backends, tmp_path: Path) -> None:
    blue, garbage = backends
    for fmt in ("json", "combined"):
        log_path = tmp_path / f"{fmt}.log"
        log = {"access_log": fmt, "access_log_path": str(log_path)}
        workdir = tmp_path / fmt
        workdir.mkdir()
        with running(config_for(blue, garbage, log), workdir) as proxy:
            request = (
                b"GET "
                + HOSTILE_TARGET
                + b" HTTP/1.1\r\nHost: x\r\nUser-Agent: "
                + HOSTILE_AGENT
                + b'\r\nReferer: \t"\\\r\nConnection: close\r\n\r\n'
            )
            response = await araw_request(proxy.port, request)
            # forwarded: the backend answered (aiohttp's router says 404 to that path)
            assert "x-zdproxy-error" not in head_of(response), response
            await araw_request(proxy.port, NOT_FOUND)
            # refused by the parser (400): its line is clean too
            refused = await araw_request(proxy.port, b"GET /x\x7f\xff\x1b HTTP/1.1\r\n\r\n")
            assert refused.startswith(b"HTTP/1.1 400"), refused
            lines = await wait_lines(log_path, 3)
        # printable ASCII only: nothing a terminal or a line splitter acts on
        assert all(re.fullmatch(r"[\x20-\x7e]+", line) for line in lines), lines
        if fmt == "json":
            entry = json.loads(lines[0])
            assert entry["target"] == HOSTILE_TARGET.decode("utf-8", "backslashreplace")
            assert entry["user_agent"] == HOSTILE_AGENT.decode("utf-8", "backslashreplace")
            assert entry["referer"] == '"\\'
            assert json.loads(lines[2])["status"] == 400
            assert json.loads(lines[1])["target"] == "/status/404"
        else:
            match = COMBINED.match(lines[0])
            assert match, lines[0]
            assert match["request"] == r"GET /a\x22b\x5Cc%0d%0a\x22?x={|} HTTP/1.1"
            assert match["agent"] == r"evil\x22 200 0 \x22-\x22 \x22x\x85\xE2\x80\xA8\x09\x5C\x22"
            assert match["referer"] == r"\x22\x5C"
            assert COMBINED.match(lines[1])
            assert (COMBINED.match(lines[2]) or {"status": None})["status"] == "400"


async def test_a_moved_log_file_is_reopened_and_sigusr1_reopens(backends, tmp_path: Path) -> None:
    blue, garbage = backends
    log_path = tmp_path / "access.log"
    config = config_for(blue, garbage, {"access_log": "combined", "access_log_path": str(log_path)})
    with running(config, tmp_path) as proxy:
        await araw_request(proxy.port, NOT_FOUND)
        await wait_lines(log_path, 1)
        os.rename(log_path, tmp_path / "access.log.1")  # what logrotate does
        await araw_request(proxy.port, NOT_FOUND)
        await wait_lines(log_path, 1)
        # SIGUSR1 reopens (its default action would end the process)
        proxy.signal(signal.SIGUSR1)
        await araw_request(proxy.port, NOT_FOUND)
        await wait_lines(log_path, 2)
        assert proxy.proc is not None and proxy.proc.poll() is None
    assert len(read_lines(tmp_path / "access.log.1")) == 1


def test_an_unwritable_log_path_is_one_clear_error(tmp_path: Path) -> None:
    config = base_config(
        {"blue": {"weight": 100, "backends": [{"address": "127.0.0.1:1"}]}},
        log={"access_log": "json", "access_log_path": str(tmp_path / "missing" / "a.log")},
    )
    proxy = ZdproxyProcess(config, tmp_path).start(wait=False)
    try:
        assert proxy.wait(20) == 1
    finally:
        proxy.stop()
    out = proxy.log()
    assert "cannot open the access log" in out and "missing/a.log" in out
    assert "Traceback" not in out


# ---- request IDs ------------------------------------------------------------


def get_with(headers: bytes, path: bytes = b"/r") -> bytes:
    return b"GET " + path + b" HTTP/1.1\r\nHost: x\r\n" + headers + b"Connection: close\r\n\r\n"


@pytest.mark.parametrize(
    ("sent", "kept"),
    [
        (b"X-Request-Id: Ab9._:+/=-z\r\n", True),
        (b"x-request-id: " + b"a" * 200 + b"\r\n", True),
        (b"", False),
        (b"X-Request-Id: " + b"a" * 201 + b"\r\n", False),
        (b"X-Request-Id: has space\r\n", False),
        (b'X-Request-Id: q"uote\r\n', False),
        (b"X-Request-Id: \r\n", False),
        (b"X-Request-Id: one\r\nX-Request-Id: two\r\n", False),
    ],
)
async def test_request_id_kept_or_replaced(
    backends, tmp_path: Path, sent: bytes, kept: bool
) -> None:
    blue, garbage = backends
    log_path = tmp_path / "access.log"
    config = config_for(blue, garbage, {"access_log": "json", "access_log_path": str(log_path)})
    with running(config, tmp_path) as proxy:
        response = await araw_request(proxy.port, get_with(sent))
        lines = await wait_lines(log_path, 1)
    returned = head_of(response)["x-request-id"]
    if kept:
        assert returned == sent.split(b": ", 1)[1].rstrip(b"\r\n").decode()
    else:
        assert GENERATED_ID.match(returned), returned
    seen = [v for k, v in blue.requests[0]["raw_headers"] if k.lower() == b"x-request-id"]
    assert seen == [returned.encode()]  # exactly one, the same
    assert json.loads(lines[0])["request_id"] == returned


async def test_request_id_not_trusted_and_disabled(backends, tmp_path: Path) -> None:
    blue, garbage = backends
    http = {"request_id": {"trust_incoming": False, "header": "X-Trace"}}
    with running(config_for(blue, garbage, {}, http=http), tmp_path) as proxy:
        response = await araw_request(proxy.port, get_with(b"X-Trace: mine\r\n"))
        head = head_of(response)
        assert GENERATED_ID.match(head["x-trace"]) and "x-request-id" not in head
        assert blue.requests[-1]["headers"]["X-Trace"] == head["x-trace"]
    blue.requests.clear()
    http = {"request_id": {"enabled": False}}
    workdir = tmp_path / "off"
    workdir.mkdir()
    with running(config_for(blue, garbage, {}, http=http), workdir) as proxy:
        head = head_of(await araw_request(proxy.port, get_with(b"X-Request-Id: a b\r\n")))
        assert "x-request-id" not in head
        # forwarded untouched, as any other header
        assert (b"X-Request-Id", b"a b") in blue.requests[-1]["raw_headers"]
        head = head_of(await araw_request(proxy.port, MALFORMED))
        assert head[":status"] == "400" and "x-request-id" not in head


async def test_request_id_set_by_the_backend_is_left_alone(tmp_path: Path) -> None:
    async def handler(request: web.Request) -> web.Response:
        return web.Response(text="ok", headers={"X-Request-Id": "backend-own"})

    app = web.Application()
    app.router.add_get("/", handler)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        pools = {"blue": {"weight": 100, "backends": [{"address": f"127.0.0.1:{port}"}]}}
        with running(base_config(pools), tmp_path) as proxy:
            head = head_of(await araw_request(proxy.port, get_with(b"", b"/")))
    finally:
        await runner.cleanup()
    assert head["x-request-id"] == "backend-own"  # and only once (head_of checks)


async def test_websocket_upgrade_is_logged_when_the_tunnel_starts(tmp_path: Path) -> None:
    seen: list[str] = []

    async def ws_handler(request: web.Request) -> web.WebSocketResponse:
        seen.append(request.headers.get("X-Request-Id", ""))
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        async for message in ws:
            await ws.send_str(message.data)
        return ws

    app = web.Application()
    app.router.add_get("/ws", ws_handler)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    log_path = tmp_path / "access.log"
    pools = {"blue": {"weight": 100, "backends": [{"id": "ws-1", "address": f"127.0.0.1:{port}"}]}}
    log = {"access_log": "json", "access_log_path": str(log_path)}
    try:
        with running(base_config(pools, log=log), tmp_path) as proxy:
            async with (
                aiohttp.ClientSession() as session,
                session.ws_connect(f"{proxy.url}/ws") as ws,
            ):
                await ws.send_str("hi")
                assert (await ws.receive_str()) == "hi"
                # the tunnel is still open: its line is already there
                lines = await wait_lines(log_path, 1)
                assert ws._response is not None
                returned = ws._response.headers["X-Request-Id"]
    finally:
        await runner.cleanup()
    entry = json.loads(lines[0])
    assert (entry["status"], entry["target"], entry["backend"]) == (101, "/ws", "ws-1")
    assert entry["request_id"] == returned == seen[0]
    assert len(read_lines(log_path)) == 1  # the close adds no second line


async def test_header_timeout_and_too_large_head_are_logged(backends, tmp_path: Path) -> None:
    blue, garbage = backends
    log_path = tmp_path / "access.log"
    log = {"access_log": "json", "access_log_path": str(log_path)}
    config = config_for(blue, garbage, log, timeouts={"request_header": "0.3s"})
    with running(config, tmp_path) as proxy:
        big = b"GET /big HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 70000 + b"\r\n\r\n"
        big_response = await araw_request(proxy.port, big)

        def slow_head() -> bytes:
            with socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as sock:
                sock.sendall(b"GET /slow HTTP/1.1\r\nHost: x\r\n")
                return sock.recv(65536)

        timeout_response = await in_thread(slow_head)
        lines = await wait_lines(log_path, 2)
    entries = [json.loads(line) for line in lines]
    assert [(e["status"], e["error"]) for e in entries] == [
        (431, "headers-too-large"),
        (408, "request-header-timeout"),
    ]
    assert [e["request_id"] for e in entries] == [
        head_of(big_response)["x-request-id"],
        head_of(timeout_response)["x-request-id"],
    ]
