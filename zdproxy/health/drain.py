"""The drain deadline for tunnels.

A drained backend keeps its in-flight requests until they finish; a WebSocket
tunnel may never finish on its own. A tunnel whose backend drains gets
``draining.timeout`` from the start of the drain, then is closed (both sides),
which also releases its hold on the backend's in-flight count so that the drain
completes. Tunnels to a backend that was removed or reached ``drained`` (the
runtime moves it there at the drain timeout at the latest) are closed at once.
Tunnels to a disabled backend are left alone: disabling takes a backend out of
rotation, and in-flight work, tunnels included, finishes.

The runtime's clock (``Runtime.clock``, monotonic) times the drain.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

from zdproxy.balancing.model import Admin, Backend

if TYPE_CHECKING:
    from zdproxy.control.runtime import Runtime
    from zdproxy.proxy.context import ProxyContext


class DrainHost(Protocol):
    """What the drainer needs: the service's runtime and the data path's tunnels."""

    @property
    def runtime(self) -> Runtime: ...

    @property
    def ctx(self) -> ProxyContext | None: ...


log = logging.getLogger("zdproxy.health")

#: how often tunnels are checked against their drain deadline, seconds
TICK = 0.25


class TunnelDrainer:
    def __init__(self, host: DrainHost) -> None:
        self.host = host
        #: with several services: whether a backend belongs to another service
        self.foreign: Callable[[Backend], bool] = _nobody
        self._task: asyncio.Task[None] | None = None

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._task = loop.create_task(self._run())

    def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            self._task = None

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(TICK)
            try:
                self.sweep()
            except Exception:
                log.exception("tunnel drain sweep failed")

    def sweep(self) -> int:
        """Close the tunnels past their drain deadline; how many were closed."""
        ctx = self.host.ctx
        if ctx is None or not ctx.tunnels:
            return 0
        runtime = self.host.runtime
        now = runtime.clock()
        timeout = runtime.config.draining.timeout
        closed = 0
        for tunnel in list(ctx.tunnels):
            backend = tunnel.backend
            if backend is None:
                continue
            current = runtime.backends.get(backend.id)
            if current is None and self.foreign(backend):
                continue  # another service's tunnel: its own drainer sees to it
            if current is not backend or backend.admin is Admin.DRAINED:
                why = "its backend was removed" if current is not backend else "drained"
            elif backend.admin is Admin.DRAINING:
                started = runtime.drain_started.get(backend.id)
                if started is None or now < started + timeout:
                    continue
                why = "drain timeout"
            else:
                continue
            log.info("closing a tunnel to %s: %s", backend.id, why)
            tunnel.close()
            closed += 1
        return closed


def _nobody(backend: Backend) -> bool:
    return False
