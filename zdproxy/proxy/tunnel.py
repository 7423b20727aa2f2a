"""Upgrade tunnels (WebSocket and friends): raw bytes both ways after a 101.

Both protocols switch to relay mode: each side's ``data_received`` writes
straight to the other transport, EOF is passed on as a half-close, and the
client connection's deadline becomes the tunnel idle timeout, renewed by
traffic either way. The tunnel
keeps its backend's in-flight count until it closes, so a drain waits for it
(up to the drain timeout, when the runtime closes it).
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

from zdproxy.balancing.model import Backend
from zdproxy.proxy.deadlines import TUNNEL

if TYPE_CHECKING:
    from zdproxy.proxy.context import ProxyContext
    from zdproxy.proxy.downstream import ClientConnection
    from zdproxy.proxy.exchange import Exchange
    from zdproxy.proxy.upstream import UpstreamConnection


class Tunnel:
    __slots__ = ("backend", "client", "closed", "conn", "ctx", "eofs", "server")

    def __init__(
        self,
        ctx: ProxyContext,
        conn: ClientConnection,
        backend: Backend | None,
        client: asyncio.Transport,
        server: asyncio.Transport,
    ) -> None:
        self.ctx = ctx
        self.conn = conn
        self.backend = backend
        self.client = client
        self.server = server
        self.closed = False
        #: directions that ended with a half-close (EOF passed on)
        self.eofs = 0

    def touch(self) -> None:
        """Bytes passed one way or the other: the idle deadline starts again.

        Read the loop's clock, not the sweeper's coarse ``ctx.now``: that one is
        a tick old, or more on a busy loop, and a tunnel would be cut that much
        before ``timeouts.tunnel_idle``. One clock read per relayed chunk is
        nothing next to the write it accompanies.
        """
        self.conn.deadline = self.ctx.loop.time() + self.ctx.t_tunnel

    def on_eof(self) -> None:
        """One side half-closed (its EOF was passed on); when both have, it is over."""
        self.eofs += 1
        if self.eofs >= 2:
            self.close()

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.ctx.tunnels.discard(self)
        if self.backend is not None:
            self.backend.in_flight -= 1
        self.client.close()
        self.server.close()


def start_tunnel(exchange: Exchange, upstream: UpstreamConnection, rest: bytes) -> None:
    conn = exchange.conn
    client = conn.transport
    server = upstream.transport
    if client is None or server is None or client.is_closing():
        upstream.abort()
        exchange.on_client_lost()
        return
    ctx = conn.ctx
    # the exchange hands its hold on the backend (in_flight) over to the tunnel
    backend = exchange.become_tunnel()
    tunnel = Tunnel(ctx, conn, backend, client, server)
    ctx.tunnels.add(tunnel)
    ctx.counters.tunnels_total += 1
    upstream.tunnel_peer = client
    upstream.tunnel_ref = tunnel
    conn.tunnel = server
    conn.tunnel_ref = tunnel
    if conn.queue and conn.queue[0] is exchange:
        conn.queue.pop(0)
    conn.set_deadline(TUNNEL, ctx.t_tunnel)
    if rest:
        client.write(rest)
    if exchange.upgrade_data:
        server.write(exchange.upgrade_data)
        exchange.upgrade_data = b""
    conn.resume_reading()
