"""Helpers for the client-facing hardening tests: a proxy process started under
a lower open-file limit, its memory, raw sockets that tell a FIN from a reset."""

from __future__ import annotations

import socket
import sys
from pathlib import Path
from typing import Any

from support_hostile import HOST, ProxyProcess

#: runs zdproxy with RLIMIT_NOFILE lowered (soft and hard), as ``ulimit -n`` would:
#: the limit is set, then the interpreter execs itself, so only zdproxy runs under it
_LOW_NOFILE = (
    "import os, resource, sys\n"
    "n = int(sys.argv[1])\n"
    "resource.setrlimit(resource.RLIMIT_NOFILE, (n, n))\n"
    "os.execv(sys.executable, [sys.executable, '-m', 'zdproxy.cli', *sys.argv[2:]])\n"
)


def proxy_with_nofile(
    workdir: Path, backends: list[int], nofile: int, overrides: dict[str, Any] | None = None
) -> ProxyProcess:
    proxy = ProxyProcess(workdir, backends, overrides)
    proxy.command = [sys.executable, "-c", _LOW_NOFILE, str(nofile)]
    return proxy


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS")


def open_fds(pid: int) -> int:
    return len(list(Path(f"/proc/{pid}/fd").iterdir()))


def read_to_eof(sock: socket.socket) -> bytes:
    """Everything until the peer's FIN. A reset raises ConnectionResetError: a
    test that calls this fails when the proxy's close destroys data."""
    chunks = []
    while True:
        data = sock.recv(65536)
        if not data:
            return b"".join(chunks)
        chunks.append(data)


def connect(port: int, timeout: float = 10.0) -> socket.socket:
    sock = socket.create_connection((HOST, port), timeout=timeout)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def http_get(port: int, path: str, timeout: float = 5.0) -> bytes:
    """One ``Connection: close`` GET; the whole answer."""
    with connect(port, timeout) as sock:
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: {HOST}\r\nConnection: close\r\n\r\n".encode())
        return read_to_eof(sock)
