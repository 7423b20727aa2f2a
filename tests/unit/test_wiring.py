"""The composition root's wiring (``server.wire``) and the drain ticker, in process
(nothing is started: no sockets)."""

from __future__ import annotations

import importlib
import inspect
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from zdproxy.config.schema import Config
from zdproxy.control.runtime import Runtime
from zdproxy.control.ticker import RuntimeTicker
from zdproxy.health.checker import HealthService
from zdproxy.server import ProxyServer, wire
from zdproxy.upgrade import Handover

from .test_backend_model import Clock, make_config


def services_config() -> Config:
    def pool(port: int) -> dict[str, Any]:
        return {"weight": 100, "backends": [{"address": f"127.0.0.1:{port}"}]}

    return Config.model_validate(
        {
            "listen": "127.0.0.1:18080",
            "admin": {"enabled": False},
            "state": {"path": None},
            "health_check": {"enabled": False},
            "sticky": {"mode": "pool"},
            "services": {
                "shop": {"pools": {"blue": pool(9001)}},
                "api": {"pools": {"blue": pool(9002)}},
            },
            "routes": [
                {"match": {"path_prefix": "/api"}, "service": "api"},
                {"match": {"path_prefix": "/"}, "service": "shop"},
            ],
        }
    )


def test_wire_gives_every_service_its_health_and_sticky_key() -> None:
    server = ProxyServer(services_config())
    assert server.health is None
    wire(server)
    built = [service.health for service in server.services.values()]
    assert all(isinstance(h, HealthService) for h in built)
    assert len({id(h) for h in built}) == len(built) == 2
    assert server.health is server.services["shop"].health  # the primary: the first
    for service in server.services.values():
        key = service.sticky_key
        assert key is not None and key.selector is service.selector
        assert service.selector.secret == key.secret
        # each service's health sees its own runtime only
        assert service.health is not None and service.health.runtime is service.runtime
    # the keys are the services' own (generated, one per service)
    assert server.services["shop"].selector.secret != server.services["api"].selector.secret


def test_a_part_that_cannot_be_imported_fails_the_start(tmp_path: Path) -> None:
    """No silent degradation: with the health package unimportable, importing the
    composition root fails (it used to run without health checks, stickiness or
    drains)."""
    code = (
        "import sys; sys.modules['zdproxy.health.checker'] = None\n"
        "try:\n"
        "    import zdproxy.server\n"
        "except ImportError as exc:\n"
        "    print('ImportError', exc)\n"
        "else:\n"
        "    print('imported')\n"
    )
    root = Path(importlib.import_module("zdproxy").__file__ or "").parent.parent
    done = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
        env={"PYTHONPATH": str(root)},
        check=False,
    )
    assert done.stdout.startswith("ImportError"), done.stdout + done.stderr


class Failing(Runtime):
    def tick(self, now: float | None = None) -> None:
        raise RuntimeError("boom")


def test_the_ticker_advances_every_runtime_even_when_one_fails(
    caplog: pytest.LogCaptureFixture,
) -> None:
    clock = Clock()
    good = Runtime(make_config(), clock=clock)
    good.backends["blue-1"].in_flight = 1
    good.drain("blue-1", "ops")
    ticker = RuntimeTicker([Failing(make_config()), good])
    ticker.tick()
    assert good.backends["blue-1"].state.value == "draining"  # in flight, before timeout
    clock.now += 10  # draining.timeout
    ticker.tick()
    assert good.backends["blue-1"].state.value == "drained"
    assert "runtime tick failed" in caplog.text


def admin_config(port: int) -> Config:
    return Config.model_validate(
        {
            "listen": "127.0.0.1:18080",
            "admin": {"enabled": True, "listen": f"127.0.0.1:{port}"},
            "state": {"path": None},
            "health_check": {"enabled": False},
            "pools": {"blue": {"weight": 100, "backends": [{"address": "127.0.0.1:9001"}]}},
        }
    )


def listening_socket() -> socket.socket:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(8)
    return sock


def test_wire_binds_the_admin_socket_and_registers_hooks_without_the_server() -> None:
    probe = listening_socket()
    port = probe.getsockname()[1]
    probe.close()
    server = ProxyServer(admin_config(port))
    wire(server)
    sock = server.admin_socket
    try:
        assert sock is not None and sock.getsockname() == ("127.0.0.1", port)
        assert len(server.persistences) == 1
        hooks = (
            server.start_hooks
            + server.stop_hooks
            + server.pause_hooks
            + server.resume_hooks
            + server.retire_hooks
        )
        # every hook is called with nothing: no part is handed the server
        for hook in hooks:
            inspect.signature(hook).bind()
    finally:
        if sock is not None:
            sock.close()


def test_wire_takes_the_admin_socket_a_hot_upgrade_handed_over() -> None:
    passed = listening_socket()
    address = f"127.0.0.1:{passed.getsockname()[1]}"
    left, right = socket.socketpair()
    try:
        server = ProxyServer(admin_config(passed.getsockname()[1]))
        server.handover = Handover({}, (address, passed), left)
        wire(server)
        # the same socket object, not a new one bound beside it
        assert server.admin_socket is passed
        assert server.handover.admin is None
    finally:
        for sock in (passed, left, right):
            sock.close()
