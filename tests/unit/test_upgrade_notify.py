"""sd_notify against real unix datagram sockets (path and abstract namespace)."""

from __future__ import annotations

import os
import socket
from pathlib import Path

from zdproxy.upgrade import sd_notify


def test_a_path_socket_gets_the_message(tmp_path: Path) -> None:
    path = tmp_path / "notify"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(path))
        assert sd_notify("READY=1\nMAINPID=42", {"NOTIFY_SOCKET": str(path)}) is True
        assert sock.recv(4096) == b"READY=1\nMAINPID=42"


def test_an_abstract_socket_is_written_with_at() -> None:
    name = f"zdproxy-test-notify-{os.getpid()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        assert sd_notify("READY=1", {"NOTIFY_SOCKET": "@" + name}) is True
        assert sock.recv(4096) == b"READY=1"


def test_no_socket_or_a_bad_one_is_false_and_never_raises(tmp_path: Path) -> None:
    assert sd_notify("READY=1", {}) is False
    assert sd_notify("READY=1", {"NOTIFY_SOCKET": "relative/path"}) is False
    # nobody listens there: logged, not raised (a notify must never stop the proxy)
    assert sd_notify("READY=1", {"NOTIFY_SOCKET": str(tmp_path / "gone")}) is False
