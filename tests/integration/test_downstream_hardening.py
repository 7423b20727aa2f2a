"""Client-facing hardening through a real ``zdproxy run`` (issue 9): the bytes an
unfinished request head may hold, pipelining up to a refused request, idle
connections reclaimed at limits.max_connections, Host kept whatever Connection
names, absolute-form targets, and the open-file limit."""

from __future__ import annotations

import os
import re
import select
import socket
import threading
import time
from collections.abc import Iterator

import pytest
from support_downstream import (
    connect,
    http_get,
    proxy_with_nofile,
    read_to_eof,
    rss_kib,
)
from support_hostile import (
    HOST,
    ProxyProcess,
    RawClient,
    RecordingBackend,
    exchange,
    get,
    wait_for,
)

#: a small head limit, so that the large reads of these tests are many times over it
MAX_HEAD = 8192


@pytest.fixture(scope="module")
def backend() -> Iterator[RecordingBackend]:
    server = RecordingBackend().start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def proxy(
    backend: RecordingBackend, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ProxyProcess]:
    process = ProxyProcess(
        tmp_path_factory.mktemp("downstream"),
        [backend.port],
        # a header timeout far longer than any test waits: a 408 means the
        # proxy held an unfinished head instead of refusing it
        {"limits": {"max_header_bytes": MAX_HEAD}, "timeouts": {"request_header": "20s"}},
    ).start()
    yield process
    assert process.stop() == 0, process.log()


# ---- section 3: bytes an unfinished head may hold ----------------------------------------


def _refused_431(sock: socket.socket) -> None:
    """The answer is 431 headers-too-large, then FIN (no reset)."""
    answer = read_to_eof(sock)
    assert answer.startswith(b"HTTP/1.1 431 "), answer[:200]
    assert b"\r\nX-Zdproxy-Error: headers-too-large\r\n" in answer
    assert answer.count(b"HTTP/1.1 ") == 1


def test_one_endless_header_line_gets_431_and_close(proxy: ProxyProcess) -> None:
    """A header line that never ends, streamed: refused once it passes the limit,
    not held until the header timeout (408)."""
    with connect(proxy.port) as sock:
        sock.sendall(b"GET /endless HTTP/1.1\r\nHost: h.test\r\nX-Endless: ")
        sent = 0
        try:
            while sent < 4 * 1024 * 1024:  # bounded: the proxy answers long before
                sock.sendall(b"a" * 1024)
                sent += 1024
                if _answered(sock):
                    break
        except (BrokenPipeError, ConnectionResetError):
            pytest.fail("the proxy reset the connection instead of answering 431")
        sock.settimeout(30)
        _refused_431(sock)


def _answered(sock: socket.socket) -> bool:
    """Something to read (an answer or EOF), without waiting."""
    return bool(select.select([sock], [], [], 0)[0])


def test_one_endless_trailer_line_gets_431_and_close(
    proxy: ProxyProcess, backend: RecordingBackend
) -> None:
    """Trailer lines after the last chunk are held by the parser like header
    lines: one that never ends is refused too, not kept until the body timeout."""
    with connect(proxy.port) as sock:
        sock.sendall(
            b"POST /trailer HTTP/1.1\r\nHost: h.test\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"5\r\nhello\r\n0\r\nX-Trailer: "
        )
        sent = 0
        try:
            while sent < 4 * 1024 * 1024:
                sock.sendall(b"t" * 1024)
                sent += 1024
                if _answered(sock):
                    break
        except (BrokenPipeError, ConnectionResetError):
            pytest.fail("the proxy reset the connection instead of answering 431")
        sock.settimeout(30)
        _refused_431(sock)


def test_large_chunks_without_line_ends_are_not_trailers(
    proxy: ProxyProcess, backend: RecordingBackend
) -> None:
    """Chunk data is not a head line: 300 KB chunks of bytes without LF, in
    separate writes after their chunk headers, stream through."""
    chunk = b"\x00" * 300_000
    with RawClient(proxy.port, timeout=20) as client:
        client.send(
            b"POST /big-chunks HTTP/1.1\r\nHost: h.test\r\nTransfer-Encoding: chunked\r\n\r\n"
        )
        for _ in range(3):
            client.send(b"%x\r\n" % len(chunk))
            time.sleep(0.02)  # not synchronisation: makes a read end after the size line
            client.send(chunk + b"\r\n")
        client.send(b"0\r\n\r\n")
        response = client.read_response()
        assert response.status == 200
        assert response.body == b"ok %d" % (3 * len(chunk))


@pytest.mark.parametrize(
    "start",
    [
        pytest.param(b"GET /big HTTP/1.1\r\nHost: h.test\r\nX-Big: ", id="header-value"),
        pytest.param(b"GET /big HTTP/1.1\r\nHost: h.test\r\nX-Big", id="header-name"),
        pytest.param(b"GET /", id="request-target"),
    ],
)
def test_one_large_unterminated_write_gets_431_at_once(proxy: ProxyProcess, start: bytes) -> None:
    """One write of 200 KB with no end of line, then silence: the proxy must not
    keep the read and wait (the issue: ~250 KB held per connection)."""
    with connect(proxy.port) as sock:
        sock.sendall(start + b"a" * 200_000)
        _refused_431(sock)


def test_many_hostile_heads_hold_little_memory(
    backend: RecordingBackend, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """500 connections each write one 200 KB unterminated header, 500 more an
    unfinished head well under the limit, and all stay open: the proxy's memory
    grows by a few KB per connection, not by the reads (nginx: ~20 KB each)."""
    process = ProxyProcess(
        tmp_path_factory.mktemp("rss"),
        [backend.port],
        {"timeouts": {"request_header": "60s"}},  # default 64 KiB head limit
    ).start()
    big: list[socket.socket] = []
    small: list[socket.socket] = []
    try:
        for i in range(20):  # warm up: allocator arenas, parser, logging
            response, client = exchange(process.port, get(f"/warm-{i}"))
            client.close()
            assert response.status == 200
        before = rss_kib(process.proc.pid)  # type: ignore[union-attr]
        line = b"GET /hold HTTP/1.1\r\nHost: h.test\r\nX-Hostile: "
        for _ in range(500):
            sock = connect(process.port)
            sock.sendall(line + b"a" * 200_000)
            big.append(sock)
            sock = connect(process.port)
            sock.sendall(line + b"b" * 2_000)
            small.append(sock)
        # every over-limit head is refused (the unfinished small ones stay open)
        for sock in big:
            _refused_431(sock)
        grown = rss_kib(process.proc.pid) - before  # type: ignore[union-attr]
        per_connection = grown / len(big + small)
        assert per_connection < 40, f"{grown} KiB for {len(big + small)} connections"
        for sock in small[:20]:
            sock.setblocking(False)
            with pytest.raises(BlockingIOError):
                sock.recv(1)  # still waiting, unanswered
        assert process.alive()
    finally:
        for sock in big + small:
            sock.close()
        assert process.stop() == 0, process.log()


# ---- section 5: pipelining ------------------------------------------------------------


def test_small_split_head_then_a_large_read_is_one_request(
    proxy: ProxyProcess, backend: RecordingBackend
) -> None:
    """The start of a head, then one read that ends it and carries a 100 KB body:
    the body is not head bytes (it was answered 431)."""
    body = b"x" * 100_000
    with RawClient(proxy.port) as client:
        client.send(b"POST /split-then-body HTTP/1.1\r\nHost: h.test\r\n")
        # not synchronisation: only makes a separate read of the first part likely
        time.sleep(0.05)
        client.send(b"Content-Length: %d\r\n\r\n" % len(body) + body)
        response = client.read_response()
        assert response.status == 200, response
        assert response.body == b"ok %d" % len(body)
    request = next(r for r in backend.snapshot()[0] if r.target == b"/split-then-body")
    assert request.body == body


def test_small_split_head_then_a_large_read_of_pipelined_requests(
    proxy: ProxyProcess, backend: RecordingBackend
) -> None:
    """The start of a head, then one read (over 64 KiB) that ends it and holds
    1,000 more complete requests: all 1,001 answered, in order."""
    count = 1000
    rest = b"".join(get(f"/piped-{i:04d}-" + "p" * 40) for i in range(count))
    assert len(rest) > 65536
    mark = backend.mark()
    with RawClient(proxy.port, timeout=20) as client:
        client.send(b"GET /piped-first HTTP/1.1\r\n")
        time.sleep(0.05)  # as above: a separate first read, likely
        client.send(b"Host: h.test\r\n\r\n" + rest)
        statuses = [client.read_response().status for _ in range(count + 1)]
        assert statuses == [200] * (count + 1)
        assert client.still_open()
    targets = [r.target for r in backend.since(mark)[0]]
    assert targets[0] == b"/piped-first"
    assert targets[1:] == [f"/piped-{i:04d}-".encode() + b"p" * 40 for i in range(count)]


def test_pipelined_requests_before_a_malformed_one_are_all_answered(
    proxy: ProxyProcess, backend: RecordingBackend
) -> None:
    """3,000 pipelined GETs then a malformed request, in one stream: 3,000 answers
    in order, then the 400, then FIN; never a reset (issue: 2,333 answers, RST)."""
    count = 3000
    stream = b"".join(get(f"/seq-{i}") for i in range(count))
    stream += b"GET /bad HTTP/1.1\r\nHost: h.test\r\nNo colon here\r\n\r\n"
    stream += get("/after-the-bad-one")  # never answered, never forwarded
    # more than the proxy reads at once: unread at the close, this input would
    # make the kernel reset the connection and drop answers not read yet
    stream += b"z" * 2_000_000
    mark = backend.mark()
    sock = connect(proxy.port, timeout=30)
    sender = threading.Thread(target=sock.sendall, args=(stream,), daemon=True)
    sender.start()
    try:
        answer = read_to_eof(sock)  # ConnectionResetError here: the close lost data
    finally:
        sender.join(30)
        sock.close()
    statuses = re.findall(rb"HTTP/1\.1 (\d{3}) ", answer)
    assert statuses[:count] == [b"200"] * count
    assert statuses[count:] == [b"400"]
    assert answer.endswith(b"malformed request\n"), answer[-200:]
    # each answer came from the request at its place: the backend saw them in order
    requests = backend.since(mark)[0]
    assert [r.target for r in requests] == [f"/seq-{i}".encode() for i in range(count)]
    assert re.findall(rb"X-Backend-Req: (\d+)", answer) == [str(r.index).encode() for r in requests]


def test_error_after_one_pipelined_request_keeps_the_first_answer(
    proxy: ProxyProcess,
) -> None:
    with connect(proxy.port) as sock:
        # the junk is more than one read: the proxy stops reading at the bad
        # request, and must not close (reset) with it unread
        sock.sendall(get("/first") + b"GET / HTTP/1.1\r\nBad Header\r\n\r\n" + b"junk" * 500_000)
        answer = read_to_eof(sock)
    assert re.findall(rb"HTTP/1\.1 (\d{3}) ", answer) == [b"200", b"400"]


# ---- section 5: idle keep-alive connections at limits.max_connections ------------------


def test_idle_connections_are_reclaimed_at_max_connections(
    backend: RecordingBackend, tmp_path_factory: pytest.TempPathFactory
) -> None:
    limit = 20
    process = ProxyProcess(
        tmp_path_factory.mktemp("reclaim"),
        [backend.port],
        {"limits": {"max_connections": limit}, "timeouts": {"idle": "120s"}},
    ).start()
    idle: list[RawClient] = []
    try:
        for i in range(limit):
            client = RawClient(process.port, timeout=30)
            client.send(get(f"/idle-{i}"))
            assert client.read_response().status == 200
            idle.append(client)
        # a new client at the limit is served at once, not after timeouts.idle
        with RawClient(process.port, timeout=30) as newcomer:
            newcomer.send(get("/newcomer"))
            assert newcomer.read_response().status == 200
            # the oldest idle connection made room: closed cleanly, FIN not reset,
            # after its complete response
            oldest = idle[0]
            oldest.sock.settimeout(10)
            assert read_to_eof(oldest.sock) == b""
            # the others are untouched and still serve requests
            for client in idle[1:]:
                assert client.still_open(0.01)
            idle[-1].send(get("/still-served"))
            assert idle[-1].read_response().status == 200
        assert "Traceback" not in process.log()
    finally:
        for client in idle:
            client.close()
        assert process.stop() == 0, process.log()


def test_busy_connections_are_never_reclaimed(
    backend: RecordingBackend, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """Connections in the middle of a request keep their place: the newcomer waits
    in the backlog until one ends."""
    limit = 5
    process = ProxyProcess(
        tmp_path_factory.mktemp("busy"),
        [backend.port],
        {"limits": {"max_connections": limit}},
    ).start()
    busy: list[RawClient] = []
    try:
        for i in range(limit):
            client = RawClient(process.port)
            client.send(get(f"/busy-{i}"))
            assert client.read_response().status == 200
            client.send(b"GET /unfinished HTTP/1.1\r\nHost: h.test\r\n")  # a head begun
            busy.append(client)
        with RawClient(process.port, timeout=20) as newcomer:
            newcomer.send(get("/waits"))
            assert newcomer.still_open(0.3)
            for client in busy:
                assert client.still_open(0.01)
            busy.pop(0).close()
            assert newcomer.read_response().status == 200
    finally:
        for client in busy:
            client.close()
        assert process.stop() == 0, process.log()


# ---- section 5: Host -----------------------------------------------------------------------


def _forwarded(backend: RecordingBackend, target: bytes) -> list[tuple[bytes, bytes]]:
    backend.wait_head(target)
    requests = backend.wait_requests(1)
    for request in reversed(requests):
        if request.target == target:
            return request.headers
    raise AssertionError(f"{target!r} not forwarded")


def test_connection_naming_host_and_x_forwarded_drops_neither(
    proxy: ProxyProcess, backend: RecordingBackend
) -> None:
    request = (
        b"GET /conn-host HTTP/1.1\r\nHost: good.example\r\n"
        b"Connection: Host, X-Forwarded-For, X-Forwarded-Proto, X-Forwarded-Host, X-Drop\r\n"
        b"X-Drop: 1\r\nX-Keep: 2\r\n\r\n"
    )
    response, client = exchange(proxy.port, request)
    client.close()
    assert response.status == 200
    forwarded = _forwarded(backend, b"/conn-host")
    # the request ID the proxy adds (on by default) comes once, after the client's own
    ids = [i for i, (name, _) in enumerate(forwarded) if name == b"X-Request-Id"]
    assert len(ids) == 1, forwarded
    del forwarded[ids[0]]
    assert forwarded == [
        (b"Host", b"good.example"),
        (b"X-Keep", b"2"),
        (b"X-Forwarded-For", HOST.encode()),
        (b"X-Forwarded-Proto", b"http"),
        (b"X-Forwarded-Host", b"good.example"),
    ]


@pytest.mark.parametrize(
    ("line", "host", "target", "forwarded_host"),
    [
        (b"GET http://evil.example/p?q=1 HTTP/1.1", b"good.example", b"/p?q=1", b"evil.example"),
        (b"GET HTTP://Evil.Example:8080 HTTP/1.1", b"good.example", b"/", b"Evil.Example:8080"),
        (b"GET https://a.example?x=y HTTP/1.1", b"good.example", b"/?x=y", b"a.example"),
        (b"GET http://[::1]:81/v6 HTTP/1.1", b"good.example", b"/v6", b"[::1]:81"),
        (b"GET http://one.example/no-host HTTP/1.0", None, b"/no-host", b"one.example"),
    ],
)
def test_absolute_form_goes_on_in_origin_form_with_the_target_host(
    proxy: ProxyProcess,
    backend: RecordingBackend,
    line: bytes,
    host: bytes | None,
    target: bytes,
    forwarded_host: bytes,
) -> None:
    mark = backend.mark()
    head = line + b"\r\n" + (b"Host: " + host + b"\r\n" if host else b"") + b"\r\n"
    response, client = exchange(proxy.port, head)
    client.close()
    assert response.status == 200
    requests = wait_for(lambda: backend.since(mark)[0], 5, "the forwarded request")
    assert len(requests) == 1
    sent = requests[0]
    assert sent.raw.split(b"\r\n", 1)[0] == b"GET " + target + b" HTTP/1.1"
    assert sent.headers[0] == (b"Host", forwarded_host)
    assert [v for k, v in sent.headers if k.lower() == b"host"] == [forwarded_host]
    assert sent.header(b"x-forwarded-host") == forwarded_host


@pytest.mark.parametrize(
    ("head", "cause"),
    [
        (b"GET http://user:pw@evil.example/ HTTP/1.1\r\nHost: good.example\r\n", b"bad-target"),
        (b"GET http://@evil.example/ HTTP/1.1\r\nHost: good.example\r\n", b"bad-target"),
        (b"GET ftp://evil.example/ HTTP/1.1\r\nHost: good.example\r\n", b"bad-target"),
        (b"GET http:///nohost HTTP/1.1\r\nHost: good.example\r\n", b"bad-target"),
        (b"GET / HTTP/1.1\r\nHost: a b\r\n", b"bad-host"),
        (b"GET / HTTP/1.1\r\nHost:\r\n", b"bad-host"),
        (b"GET / HTTP/1.1\r\nHost: a/b\r\n", b"bad-host"),
        (b"GET / HTTP/1.1\r\nHost: u@h.example\r\n", b"bad-host"),
        (b"GET / HTTP/1.1\r\nHost: h.example:8o\r\n", b"bad-host"),
        (b"GET / HTTP/1.1\r\nHost: h.example:123456\r\n", b"bad-host"),
        (b"GET / HTTP/1.1\r\nHost: [::1\r\n", b"bad-host"),
        (b"GET / HTTP/1.1\r\nHost: h.example]\r\n", b"bad-host"),
    ],
)
def test_bad_targets_and_hosts_are_refused(
    proxy: ProxyProcess, backend: RecordingBackend, head: bytes, cause: bytes
) -> None:
    mark = backend.mark()
    response, client = exchange(proxy.port, head + b"\r\n" + get("/smuggled"))
    try:
        assert response.status == 400
        assert response.header(b"x-zdproxy-error") == cause
        assert client.closed_by_peer()
    finally:
        client.close()
    assert backend.since(mark)[0] == []


# ---- section 6: file descriptors --------------------------------------------------------


def test_low_open_file_limit_warns_caps_connections_and_keeps_admin(
    backend: RecordingBackend, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """RLIMIT_NOFILE 200 with max_connections 10000: a warning at start, at most
    (200 - 64) / 2 = 68 client connections, the rest wait in the backlog, and the
    admin API still answers."""
    admin_port = _free_port()
    process = proxy_with_nofile(
        tmp_path_factory.mktemp("nofile"),
        [backend.port],
        200,
        {"admin": {"enabled": True, "listen": f"{HOST}:{admin_port}"}},
    ).start()
    clients: list[socket.socket] = []
    mark = backend.mark()
    try:
        warning = (
            r"limits\.max_connections \(10000\) exceeds what the open-file limit allows "
            r"\(RLIMIT_NOFILE 200\b.*serving at most 68 client connections"
        )
        # the listeners may accept before the warning reaches the log: wait for it
        wait_for(lambda: re.search(warning, process.log()) is not None, 10, "the open-file warning")
        # 150 clients, each waiting on a backend that never answers: each proxied
        # one holds a client and an upstream descriptor
        for i in range(150):
            sock = connect(process.port)
            sock.sendall(get(f"/fault/hang?{i}"))
            clients.append(sock)
        wait_for(lambda: len(backend.since(mark)[2]) >= 68, 10, "68 upstream connections")
        answer = http_get(admin_port, "/healthz")
        assert answer.startswith(b"HTTP/1.1 200 "), answer[:200]
        log = process.log()
        assert log.count("limits.max_connections (68) reached") == 1, log
        assert "Too many open files" not in log and "Traceback" not in log, log
        # the cap held: no client beyond the 68th reached the backend
        assert len(backend.since(mark)[2]) == 68
        assert process.alive()
    finally:
        for sock in clients:
            sock.close()
        assert process.stop() == 0, process.log()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def test_out_of_descriptors_upstream_is_503_logged_once(
    backend: RecordingBackend, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """Descriptors eaten elsewhere (idle admin connections here): connecting
    upstream fails with EMFILE. The client gets 503 local-resource-limit (not a
    502 blamed on the backend), and the log says so once, not once per request."""
    admin_port = _free_port()
    process = proxy_with_nofile(
        tmp_path_factory.mktemp("emfile"),
        [backend.port],
        160,
        {
            "admin": {"enabled": True, "listen": f"{HOST}:{admin_port}"},
            "timeouts": {"upstream_response": "2s"},
        },
    ).start()
    hogs: list[socket.socket] = []
    clients: list[RawClient] = []
    try:
        # keep-alive client connections, each with its request answered (no
        # upstream descriptor left once the pool is emptied) ...
        for i in range(40):
            client = RawClient(process.port)
            client.send(get(f"/before-{i}"))
            assert client.read_response().status == 200
            clients.append(client)
        # ... then admin connections take every free descriptor
        for _ in range(200):
            sock = socket.create_connection((HOST, admin_port), timeout=5)
            hogs.append(sock)
        # connect() returns once the kernel queued the connection: wait until the
        # proxy has really accepted enough of them to run out of descriptors
        assert process.proc is not None
        fd_dir = f"/proc/{process.proc.pid}/fd"
        wait_for(lambda: len(os.listdir(fd_dir)) >= 160 - 2, 10, "descriptors used up")
        # the first request takes the pooled upstream connection (and waits on it
        # until the 2 s upstream timeout); every other one needs a new descriptor
        for i, client in enumerate(clients):
            client.send(get(f"/fault/hang?emfile-{i}"))
        responses = [client.read_response() for client in clients]
        refused = [r for r in responses if r.status == 503]
        assert len(refused) >= len(clients) - 1, [r.status for r in responses]
        assert {r.header(b"x-zdproxy-error") for r in refused} == {b"local-resource-limit"}
        assert {r.status for r in responses} <= {503, 504}
        log = process.log()
        lines = log.count("out of file descriptors while connecting to a backend")
        assert 1 <= lines <= 3, log
    finally:
        for sock in hogs:
            sock.close()
        for client in clients:
            client.close()
        assert process.stop() == 0, process.log()
