"""The data path's settings as one frozen value (``proxy.settings``): a pure
function of the config, installed whole by the context."""

from __future__ import annotations

import asyncio
import dataclasses
import ipaddress
from collections.abc import Iterator

import pytest

from zdproxy.proxy.context import ProxyContext
from zdproxy.proxy.settings import DataPathSettings
from zdproxy.server import ProxyServer

from .test_backend_model import make_config


@pytest.fixture
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    loop = asyncio.new_event_loop()
    yield loop
    loop.close()


def custom() -> DataPathSettings:
    config = make_config(
        timeouts={"connect": "1s", "request_header": "2s", "request_body": "3s",
                  "upstream_response": "4s", "idle": "5s", "tunnel_idle": "6s"},
        limits={"max_header_bytes": 4096, "max_headers": 20, "max_body_bytes": 1000,
                "max_connections": 500, "max_response_header_bytes": 8192},
        routing={"header": {"name": "X-Canary"}, "cookie": {"enabled": False, "name": "zd_pool"}},
        sticky={"mode": "hash", "hash_on": "header:X-User"},
        http={"pool_response_header_name": "X-Pool", "strictness": "lenient",
              "trusted_proxies": ["10.0.0.0/8"], "request_id": {"enabled": False}},
        retries={"attempts": 3, "buffer_body_bytes": 2048},
    )  # fmt: skip
    return DataPathSettings.from_config(config, fd_cap=300)


def test_settings_are_computed_from_the_config() -> None:
    settings = custom()
    assert (
        settings.t_connect,
        settings.t_header,
        settings.t_body,
        settings.t_upstream,
        settings.t_idle,
        settings.t_tunnel,
    ) == (1.0, 2.0, 3.0, 4.0, 5.0, 6.0)
    assert (settings.max_header_bytes, settings.max_headers, settings.max_body) == (4096, 20, 1000)
    # the open-file cap wins over limits.max_connections when it is lower
    assert settings.max_connections == 300
    assert settings.max_response_header_bytes == 8192
    assert settings.override_header == b"x-canary" and settings.override_cookie is None
    assert settings.hash_on == b"x-user"
    assert settings.affinity_cookie is None and not settings.selector_wants_affinity
    assert settings.pool_header == b"X-Pool: "
    assert settings.strict is False
    assert settings.trusted == (ipaddress.ip_network("10.0.0.0/8"),)
    assert settings.request_ids is None
    assert (settings.retry_attempts, settings.retry_buffer) == (3, 2048)


def test_defaults_and_a_cap_above_the_limit() -> None:
    config = make_config(sticky={"mode": "pool"})
    settings = DataPathSettings.from_config(config, fd_cap=10**9)
    assert settings.max_connections == config.limits.max_connections
    assert settings.affinity_cookie == config.sticky.cookie and settings.selector_wants_affinity
    assert settings.hash_on is None and settings.strict is True
    assert settings.request_ids is not None
    assert settings.request_ids.header_lower in settings.header_kinds
    # the same config gives equal settings (but for the objects built afresh: the
    # request-ID generator, with a random prefix, and the upstream TLS contexts)
    again = DataPathSettings.from_config(config, fd_cap=10**9)
    fresh = {"request_ids": settings.request_ids, "upstream_tls": settings.upstream_tls}
    assert dataclasses.replace(again, **fresh) == settings


def test_settings_are_frozen_and_slotted() -> None:
    settings = custom()
    with pytest.raises(AttributeError):  # FrozenInstanceError (compiled too)
        settings.t_idle = 1.0  # type: ignore[misc]
    assert not hasattr(settings, "__dict__")


def test_the_context_installs_settings_whole(loop: asyncio.AbstractEventLoop) -> None:
    server = ProxyServer(make_config())
    ctx = ProxyContext(server.config, server.selector, server.upstreams, loop)
    first = ctx.settings
    conn_state = (ctx.connections, ctx.counters, ctx.idle)
    settings = custom()
    ctx.install(settings)
    assert ctx.settings is settings and first is not settings
    for field in dataclasses.fields(DataPathSettings):
        if field.name == "max_response_header_bytes":
            assert server.upstreams.max_head_bytes == settings.max_response_header_bytes
        else:
            # == rather than is: a compiled context keeps floats and ints unboxed
            assert getattr(ctx, field.name) == getattr(settings, field.name), field.name
    assert ctx.upstream_tls is settings.upstream_tls
    assert ctx.selector_wants_affinity == settings.selector_wants_affinity
    # the mutable state is not part of it
    assert (ctx.connections, ctx.counters, ctx.idle) == conn_state
