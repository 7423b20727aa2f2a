"""Several services in one process: passive health and tunnel drains stay with
the service that owns the backend (plain values, no network)."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

from zdproxy.balancing.failures import Failure
from zdproxy.balancing.model import Backend
from zdproxy.config.loader import load_config_text
from zdproxy.control.runtime import Runtime
from zdproxy.health.drain import TunnelDrainer
from zdproxy.services import ServiceObservers

CONFIG = """\
listen: 127.0.0.1:8080
health_check: {enabled: false}
services:
  shop:
    pools: {blue: {weight: 100, backends: [{address: 127.0.0.1:9001}]}}
  api:
    pools: {blue: {weight: 100, backends: [{address: 127.0.0.1:9002}]}}
"""


def runtimes() -> tuple[Runtime, Runtime]:
    config = load_config_text(CONFIG, "c.yaml")
    return Runtime(config.service_config("shop")), Runtime(config.service_config("api"))


class Recorder:
    def __init__(self) -> None:
        self.calls: list[tuple[str, str]] = []

    def failure(self, backend: Backend, kind: Failure, now: float) -> None:
        self.calls.append(("failure", backend.id))

    def success(self, backend: Backend, now: float) -> None:
        self.calls.append(("success", backend.id))


def test_a_result_goes_to_the_owner_of_the_backend_only() -> None:
    shop, api = runtimes()
    shop_seen, api_seen = Recorder(), Recorder()
    observers = ServiceObservers([(shop, shop_seen), (api, api_seen)])
    observers.failure(api.backends["api-blue-1"], Failure.STATUS_5XX, 1.0)
    observers.success(shop.backends["shop-blue-1"], 2.0)
    assert shop_seen.calls == [("success", "shop-blue-1")]
    assert api_seen.calls == [("failure", "api-blue-1")]
    # a backend no service owns any more (removed): counted on the backend itself
    gone = Backend("gone-1", "blue", "127.0.0.1", 1)
    observers.failure(gone, Failure.CONNECT_REFUSED, 3.0)
    assert gone.failures == 1 and shop_seen.calls == [("success", "shop-blue-1")]


class FakeTunnel:
    def __init__(self, backend: Backend) -> None:
        self.backend = backend
        self.closed = False

    def close(self) -> None:
        self.closed = True


def test_a_services_drainer_leaves_other_services_tunnels_alone() -> None:
    shop, api = runtimes()
    api_tunnel = FakeTunnel(api.backends["api-blue-1"])
    removed = FakeTunnel(Backend("shop-blue-9", "blue", "127.0.0.1", 9))
    ctx = SimpleNamespace(tunnels={api_tunnel, removed})
    server: Any = SimpleNamespace(ctx=ctx, runtime=shop)
    drainer = TunnelDrainer(server)
    drainer.foreign = lambda backend: api.backends.get(backend.id) is backend
    assert drainer.sweep() == 1
    assert removed.closed and not api_tunnel.closed
