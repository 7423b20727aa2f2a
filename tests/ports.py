"""Race-free ports for the test suite.

Binding port 0, closing the socket and handing the number to a child process
(the old ``free_port``) races: until the child binds it, the kernel may give
that port to any other socket, an outgoing connection's local port or another
``bind(0)``, and the child then fails with "Address already in use".

So ports come from below the kernel's ephemeral range
(``/proc/sys/net/ipv4/ip_local_port_range``), which the kernel never hands out
by itself, and one counter shared by every test process (a file under a
``flock``) hands each port out once per lap. A port still bound from an
earlier lap (a long-lived server) is skipped by a bind check.
"""

from __future__ import annotations

import errno
import fcntl
import os
import socket
import tempfile
from pathlib import Path

_STATE = Path(tempfile.gettempdir()) / f"zdproxy-test-ports-{os.getuid()}"
_LOWEST = 20000


def _range() -> tuple[int, int]:
    """[low, high) below the ephemeral range, at least 2,000 ports wide."""
    try:
        ephemeral_low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        ephemeral_low = 32768
    high = max(ephemeral_low, _LOWEST + 2000)
    low = min(_LOWEST, high - 2000)
    return max(low, 1024), high


def _bindable(port: int) -> bool:
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError as exc:
            if exc.errno in (errno.EADDRINUSE, errno.EACCES):
                return False
            raise
    return True


def free_port() -> int:
    """A loopback port that no other test process is handed, and that the kernel
    does not give to ephemeral sockets, so a child process can bind it later."""
    low, high = _range()
    with open(_STATE, "a+") as state:
        fcntl.flock(state, fcntl.LOCK_EX)
        state.seek(0)
        try:
            port = int(state.read().strip() or low)
        except ValueError:
            port = low
        for _ in range(high - low):
            if not low <= port < high:
                port = low
            candidate, port = port, port + 1
            if _bindable(candidate):
                state.seek(0)
                state.truncate()
                state.write(str(port))
                return candidate
    raise RuntimeError(f"no free port in {low}-{high - 1}")
