"""The data path through a real ``zdproxy run`` process and real backends."""

from __future__ import annotations

import asyncio
import hashlib
import io
import os
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import aiohttp
import pytest
import yaml
from support import (
    Backend,
    ZdproxyProcess,
    araw_request,
    base_config,
    free_port,
    in_thread,
    raw_request,
    running,
)


@pytest.fixture
async def blue_green() -> tuple[list[Backend], list[Backend]]:
    blue = [await Backend(f"blue-{n}", "blue").start() for n in (1, 2)]
    green = [await Backend(f"green-{n}", "green").start() for n in (1, 2)]
    yield blue, green
    for backend in blue + green:
        await backend.stop()


def pools_for(blue: list[Backend], green: list[Backend], blue_weight: int = 100) -> dict:
    return {
        "blue": {
            "weight": blue_weight,
            "backends": [{"id": b.name, "address": b.address} for b in blue],
        },
        "green": {
            "weight": 100 - blue_weight,
            "backends": [{"id": b.name, "address": b.address} for b in green],
        },
    }


async def test_keepalive_load_10000_requests_50_connections(blue_green, tmp_path: Path) -> None:
    blue, green = blue_green
    with running(base_config(pools_for(blue, green)), tmp_path) as proxy:
        failures = 0
        ok = 0
        connector = aiohttp.TCPConnector(limit=50)
        async with aiohttp.ClientSession(connector=connector) as session:

            async def worker() -> None:
                nonlocal failures, ok
                for _ in range(200):
                    try:
                        async with session.get(proxy.url + "/x") as response:
                            await response.read()
                            if response.status == 200:
                                ok += 1
                            else:
                                failures += 1
                    except aiohttp.ClientError:
                        failures += 1

            await asyncio.gather(*(worker() for _ in range(50)))
        assert (ok, failures) == (10_000, 0)
        # keep-alive on the upstream side too: far fewer connections than requests
        assert sum(len(b.requests) for b in blue) == 10_000


async def test_pool_and_backend_weights_obeyed(tmp_path: Path) -> None:
    blue = [await Backend("blue-1", "blue").start(), await Backend("blue-2", "blue").start()]
    green = [await Backend("green-1", "green").start()]
    pools = {
        "blue": {
            "weight": 80,
            "backends": [
                {"id": "blue-1", "address": blue[0].address, "weight": 3},
                {"id": "blue-2", "address": blue[1].address, "weight": 1},
            ],
        },
        "green": {"weight": 20, "backends": [{"id": "green-1", "address": green[0].address}]},
    }
    try:
        with running(base_config(pools), tmp_path) as proxy:
            seen: Counter[str] = Counter()
            async with aiohttp.ClientSession() as session:
                for _ in range(5000):
                    async with session.get(proxy.url + "/") as response:
                        seen[response.headers["X-Backend"]] += 1
                        assert (
                            response.headers["X-Zdproxy-Pool"]
                            == response.headers["X-Backend"].split("-")[0]
                        )
        assert abs(seen["green-1"] / 5000 - 0.20) <= 0.02
        assert abs(seen["blue-1"] / 5000 - 0.60) <= 0.02
        assert abs(seen["blue-2"] / 5000 - 0.20) <= 0.02
    finally:
        for backend in blue + green:
            await backend.stop()


async def test_override_header_and_cookie(blue_green, tmp_path: Path) -> None:
    blue, green = blue_green
    with running(base_config(pools_for(blue, green)), tmp_path) as proxy:
        async with aiohttp.ClientSession() as session:
            async with session.get(proxy.url, headers={"X-Zdproxy-Pool": "green"}) as r:
                assert r.headers["X-Zdproxy-Pool"] == "green"
            async with session.get(proxy.url, headers={"Cookie": "a=b; zd_pool=green"}) as r:
                assert r.headers["X-Zdproxy-Pool"] == "green"
            async with session.get(proxy.url) as r:
                assert r.headers["X-Zdproxy-Pool"] == "blue"
            # an unknown pool name is ignored: the weights decide
            async with session.get(proxy.url, headers={"X-Zdproxy-Pool": "nope"}) as r:
                assert r.headers["X-Zdproxy-Pool"] == "blue"


async def test_overrides_can_be_switched_off_and_renamed(blue_green, tmp_path: Path) -> None:
    blue, green = blue_green
    config = base_config(
        pools_for(blue, green),
        routing={"header": {"name": "X-Canary"}, "cookie": {"enabled": False, "name": "zd_pool"}},
        http={"pool_response_header": False},
    )
    with running(config, tmp_path) as proxy:
        async with aiohttp.ClientSession() as session:
            async with session.get(proxy.url, headers={"X-Zdproxy-Pool": "green"}) as r:
                assert r.headers["X-Backend"].startswith("blue")
                assert "X-Zdproxy-Pool" not in r.headers
            async with session.get(proxy.url, headers={"X-Canary": "green"}) as r:
                assert r.headers["X-Backend"].startswith("green")
            async with session.get(proxy.url, headers={"Cookie": "zd_pool=green"}) as r:
                assert r.headers["X-Backend"].startswith("blue")


@pytest.mark.parametrize("chunked", [False, True])
async def test_uploads_echoed_byte_for_byte(blue_green, tmp_path: Path, chunked: bool) -> None:
    blue, green = blue_green
    payload = os.urandom(1024 * 1024 + 17)
    with running(base_config(pools_for(blue, green)), tmp_path) as proxy:
        async with aiohttp.ClientSession() as session:

            async def body():  # an async generator makes aiohttp send it chunked
                for i in range(0, len(payload), 65536):
                    yield payload[i : i + 65536]

            data = body() if chunked else io.BytesIO(payload)
            async with session.post(proxy.url + "/echo", data=data) as response:
                echoed = await response.read()
        assert response.status == 200
        assert hashlib.sha256(echoed).digest() == hashlib.sha256(payload).digest()


async def test_large_upload_streams_without_buffering(tmp_path: Path) -> None:
    """256 MiB through the proxy must not grow its memory by more than a few MiB."""
    received = {"n": 0}

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        length = next(
            int(line.split(b":")[1])
            for line in head.split(b"\r\n")
            if line.lower().startswith(b"content-length")
        )
        while received["n"] < length:
            chunk = await reader.read(1 << 20)
            if not chunk:
                break
            received["n"] += len(chunk)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        await writer.drain()
        writer.close()

    sink = await asyncio.start_server(handle, "127.0.0.1", 0)
    sink_port = sink.sockets[0].getsockname()[1]
    pools = {"blue": {"weight": 100, "backends": [{"address": f"127.0.0.1:{sink_port}"}]}}
    size = 256 * 1024 * 1024
    with running(base_config(pools), tmp_path) as proxy:
        before = proxy.rss_kib()

        def upload() -> tuple[bytes, int]:
            peak = before
            with socket.create_connection(("127.0.0.1", proxy.port)) as sock:
                sock.sendall(b"POST /up HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % size)
                block = b"\0" * (1 << 20)
                for i in range(size // len(block)):
                    sock.sendall(block)
                    if i % 16 == 0:
                        peak = max(peak, proxy.rss_kib())
                sock.settimeout(30)
                return sock.recv(4096), peak

        answer, peak = await asyncio.get_running_loop().run_in_executor(None, upload)
        assert answer.startswith(b"HTTP/1.1 200")
        assert received["n"] == size
        growth_mib = (peak - before) / 1024
        assert growth_mib < 16, f"proxy RSS grew by {growth_mib:.1f} MiB"
    sink.close()
    await sink.wait_closed()


async def test_proxy_generated_errors(tmp_path: Path) -> None:
    slow = await Backend("slow", "blue").start()
    closed_port = free_port()
    pools = {
        "blue": {"weight": 100, "backends": [{"id": "slow", "address": slow.address}]},
        "dead": {"weight": 0, "backends": [{"id": "dead", "address": f"127.0.0.1:{closed_port}"}]},
        "empty": {"weight": 0, "backends": []},
    }
    config = base_config(
        pools, timeouts={"upstream_response": "500ms", "connect": "500ms"}, retries={"attempts": 0}
    )
    try:
        with running(config, tmp_path) as proxy:
            async with aiohttp.ClientSession() as session:
                async with session.get(proxy.url, headers={"X-Zdproxy-Pool": "dead"}) as r:
                    assert r.status == 502
                    assert r.headers["X-Zdproxy-Error"] == "upstream-connect"
                async with session.get(proxy.url, headers={"X-Zdproxy-Pool": "empty"}) as r:
                    assert r.status == 503
                    assert r.headers["X-Zdproxy-Error"] == "no-backend"
                async with session.get(proxy.url + "/slow/3") as r:
                    assert r.status == 504
                    assert r.headers["X-Zdproxy-Error"] == "upstream-timeout"
                    assert (await r.text()).startswith("504")
                # the connection still serves after generated errors
                async with session.get(proxy.url) as r:
                    assert r.status == 200
    finally:
        await slow.stop()


async def test_forwarded_headers_and_hop_by_hop(blue_green, tmp_path: Path) -> None:
    blue, _green = blue_green
    pools = {"blue": {"weight": 100, "backends": [{"id": "b", "address": blue[0].address}]}}
    with running(base_config(pools, http={"trusted_proxies": ["10.0.0.0/8"]}), tmp_path) as proxy:
        raw = (
            b"GET /h HTTP/1.1\r\nHost: example.test\r\nX-Forwarded-For: 1.2.3.4\r\n"
            b"Connection: keep-alive, X-Secret\r\nX-Secret: s\r\nKeep-Alive: timeout=5\r\n"
            b"Proxy-Connection: x\r\nTE: trailers\r\nX-Forwarded-Proto: https\r\n"
            b"Connection: close\r\n\r\n"
        )
        answer = await araw_request(proxy.port, raw)
        assert answer.startswith(b"HTTP/1.1 200")
        seen = blue[0].requests[-1]["headers"]
        # the client is not a trusted proxy: its X-Forwarded-* claims are replaced
        assert seen["X-Forwarded-For"] == "127.0.0.1"
        assert seen["X-Forwarded-Proto"] == "http"
        assert seen["X-Forwarded-Host"] == "example.test"
        assert seen["Host"] == "example.test"
        for hop in ("X-Secret", "Keep-Alive", "Proxy-Connection", "TE"):
            assert hop not in seen
    trusted = base_config(pools, http={"trusted_proxies": ["127.0.0.0/8"]})
    with running(trusted, tmp_path) as proxy:
        await araw_request(
            proxy.port,
            b"GET / HTTP/1.1\r\nHost: h\r\nX-Forwarded-For: 1.2.3.4\r\nConnection: close\r\n\r\n",
        )
        assert blue[0].requests[-1]["headers"]["X-Forwarded-For"] == "1.2.3.4, 127.0.0.1"


async def test_http10_head_204_304_and_expect(blue_green, tmp_path: Path) -> None:
    blue, green = blue_green
    with running(base_config(pools_for(blue, green)), tmp_path) as proxy:
        await in_thread(_http10_head_204_304_and_expect, proxy.port)


def _http10_head_204_304_and_expect(port: int) -> None:
    answer = raw_request(port, b"GET / HTTP/1.0\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 200") and answer.endswith(b"\n")
    assert b"keep-alive" not in answer.lower()
    # HTTP/1.0 keep-alive is honoured
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        for _ in range(2):
            sock.sendall(b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
            head = sock.recv(65536)
            assert head.startswith(b"HTTP/1.1 200")
            assert b"Connection: keep-alive" in head
    for path, code in (("/status/204", 204), ("/status/304", 304)):
        with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
            # two requests on one connection: a bodiless answer must not eat the next
            req = f"GET {path} HTTP/1.1\r\nHost: h\r\n\r\n".encode()
            sock.sendall(req + req)
            data = b""
            while data.count(b"HTTP/1.1 %d" % code) < 2:
                chunk = sock.recv(65536)
                assert chunk, data
                data += chunk
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(b"HEAD / HTTP/1.1\r\nHost: h\r\n\r\nGET / HTTP/1.1\r\nHost: h\r\n\r\n")
        data = b""
        while data.count(b"HTTP/1.1 200") < 2 or not data.endswith(b"\n"):
            chunk = sock.recv(65536)
            assert chunk
            data += chunk
        head_answer, _, rest = data.partition(b"\r\n\r\n")
        assert b"Content-Length: 7" in head_answer  # "blue-N\n" would be the GET body
        assert rest.startswith(b"HTTP/1.1 200")
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(
            b"POST /echo HTTP/1.1\r\nHost: h\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n"
        )
        first = sock.recv(4096)
        assert first.startswith(b"HTTP/1.1 100 Continue\r\n\r\n")
        sock.sendall(b"hello")
        # the echo backend sends its head before it reads the body: that head may
        # come in the same read as the 100
        data = first[len(b"HTTP/1.1 100 Continue\r\n\r\n") :]
        while not data.endswith(b"0\r\n\r\n"):
            chunk = sock.recv(4096)
            assert chunk
            data += chunk
        assert data.startswith(b"HTTP/1.1 200") and b"hello" in data


async def test_pipelined_requests_answered_in_order(blue_green, tmp_path: Path) -> None:
    blue, green = blue_green
    with running(base_config(pools_for(blue, green)), tmp_path) as proxy:
        requests = b"".join(
            b"GET /slow/0.%d HTTP/1.1\r\nHost: h\r\nX-N: %d\r\n\r\n" % (9 - n, n) for n in range(5)
        )
        requests += b"GET /last HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n"
        answer = await in_thread(raw_request, proxy.port, requests, 10)
        assert answer.count(b"HTTP/1.1 200") == 6
        order = [r["path"] for r in blue[0].requests + blue[1].requests]
        assert sorted(order) == sorted([f"/slow/0.{9 - n}" for n in range(5)] + ["/last"])
        # responses come back in request order
        bodies = [part for part in answer.split(b"HTTP/1.1 200 OK") if part]
        assert all(b"slow" in body for body in bodies[:5])
        assert b"slow" not in bodies[5]


async def test_sigterm_lets_in_flight_request_finish(blue_green, tmp_path: Path) -> None:
    blue, green = blue_green
    proxy = ZdproxyProcess(base_config(pools_for(blue, green)), tmp_path).start()
    try:
        async with aiohttp.ClientSession() as session:
            pending = asyncio.ensure_future(session.get(proxy.url + "/slow/1.5"))
            deadline = time.monotonic() + 5
            while not any(
                r["path"].startswith("/slow") for r in blue[0].requests + blue[1].requests
            ):
                assert time.monotonic() < deadline
                await asyncio.sleep(0.02)
            proxy.signal(signal.SIGTERM)
            response = await pending
            assert response.status == 200
            assert response.headers.get("Connection") == "close"
            assert (await response.text()).endswith("slow\n")
            response.release()
        code = await asyncio.get_running_loop().run_in_executor(None, proxy.wait, 20)
        assert code == 0
    finally:
        proxy.stop()


def test_check_reports_file_line_key(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "listen: ['127.0.0.1:8080']\n"
        "pools:\n"
        "  blue:\n"
        "    weight: 90\n"
        "    backends:\n"
        "      - address: 127.0.0.1:99999\n"
        "    wieght: 3\n"
    )
    result = subprocess.run(
        [sys.executable, "-m", "zdproxy.cli", "check", "-c", str(bad)],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert any(line.startswith(f"{bad}:6: pools.blue.backends.0.address:") for line in lines)
    assert any(line.startswith(f"{bad}:7: pools.blue.wieght:") for line in lines)
    good = tmp_path / "good.yaml"
    good.write_text(
        yaml.safe_dump(
            base_config({"blue": {"weight": 100, "backends": [{"address": "127.0.0.1:1"}]}})
        )
    )
    result = subprocess.run(
        [sys.executable, "-m", "zdproxy.cli", "check", "-c", str(good)],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    assert "OK" in result.stdout


async def test_slow_reader_applies_backpressure_to_the_backend(tmp_path: Path) -> None:
    """A client that stops reading a 256 MiB download must not make the proxy buffer it."""
    size = 256 * 1024 * 1024
    sent = {"n": 0}

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % size)
        block = b"x" * (1 << 20)
        try:
            while sent["n"] < size:
                writer.write(block)
                await writer.drain()
                sent["n"] += len(block)
        except ConnectionError:
            pass
        writer.close()

    source = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = source.sockets[0].getsockname()[1]
    pools = {"blue": {"weight": 100, "backends": [{"address": f"127.0.0.1:{port}"}]}}
    with running(base_config(pools), tmp_path) as proxy:
        before = proxy.rss_kib()
        sock = socket.create_connection(("127.0.0.1", proxy.port))
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
        sock.sendall(b"GET /big HTTP/1.1\r\nHost: x\r\n\r\n")
        # stalled reader: the backend must be held back too (by TCP, via the proxy)
        stalled_at = -1
        for _ in range(200):
            await asyncio.sleep(0.05)
            if sent["n"] == stalled_at:
                break
            stalled_at = sent["n"]
        assert sent["n"] < 64 * 1024 * 1024, f"backend pushed {sent['n']} bytes"
        growth_mib = (proxy.rss_kib() - before) / 1024
        assert growth_mib < 16, f"proxy RSS grew by {growth_mib:.1f} MiB"

        def drain() -> int:
            total = 0
            sock.settimeout(30)
            while total < size:
                chunk = sock.recv(1 << 20)
                if not chunk:
                    break
                total += len(chunk)
            sock.close()
            return total

        received = await in_thread(drain)
        head_len = received - size
        assert 0 < head_len < 1024
    source.close()
    await source.wait_closed()


def test_demo_serves_blue_and_prints_a_token(tmp_path: Path) -> None:
    """``zdproxy demo``: no arguments, two pools, the proxy on 8080."""
    from support import port_open, wait_for

    if port_open(8080) or port_open(9901):
        pytest.fail("ports 8080/9901 are taken on this machine: the demo needs them")
    log = tmp_path / "demo.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "zdproxy.cli", "demo"], stdout=out, stderr=subprocess.STDOUT
        )
    try:
        wait_for(lambda: b"token" in log.read_bytes(), 20, "the demo's guide")
        wait_for(lambda: port_open(8080), 10, "the demo proxy")

        def get(headers: dict[str, str]) -> tuple[int, str, str]:
            import urllib.request

            request = urllib.request.Request("http://127.0.0.1:8080/", headers=headers)
            with urllib.request.urlopen(request, timeout=5) as response:
                return response.status, response.headers["X-Zdproxy-Pool"], response.read().decode()

        # backends start "starting": wait until the health checks let traffic through
        def blue_serves() -> bool:
            try:
                return get({})[0] == 200
            except OSError:
                return False

        wait_for(blue_serves, 20, "a healthy blue backend")
        status, pool, body = get({})
        assert (status, pool) == (200, "blue") and '"pool": "blue"' in body
        assert get({"X-Zdproxy-Pool": "green"})[1] == "green"
        assert "ZDPROXY_ADMIN_TOKEN=" in log.read_text()
    finally:
        proc.send_signal(signal.SIGINT)
        assert proc.wait(20) == 0
