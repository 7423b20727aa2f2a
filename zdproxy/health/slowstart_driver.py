"""Slow start driver: ramps effective weights through the runtime.

The arithmetic is ``zdproxy.balancing.slowstart``. A ramp starts when the
health checker brings a backend up (after a failure, a re-enable or when it was
added at runtime; not the first rise of the backends configured at process
start, where every member starts together). While ramps run, the pools
concerned get their effective weights refreshed ``TICKS_PER_SECOND`` times a
second; no task runs otherwise.
"""

from __future__ import annotations

import asyncio
import logging

from zdproxy.balancing.model import Admin, BackendState
from zdproxy.balancing.slowstart import pool_weights, ramp_fraction
from zdproxy.control.runtime import Runtime

log = logging.getLogger("zdproxy.health")

TICKS_PER_SECOND = 4


class SlowStart:
    def __init__(self, runtime: Runtime, window: float) -> None:
        self.runtime = runtime
        self.window = window
        #: backend id -> when (loop time) its ramp started
        self.ramps: dict[str, float] = {}
        #: pools whose effective weights are scaled now
        self._scaled: set[str] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._task: asyncio.Task[None] | None = None

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop

    def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            self._task = None

    def reconfigure(self, window: float) -> None:
        self.window = window

    def begin(self, backend_id: str) -> None:
        loop = self._loop
        if self.window <= 0 or loop is None:
            return
        self.ramps[backend_id] = loop.time()
        log.info("backend %s: slow start over %.1fs", backend_id, self.window)
        self._tick()
        if self._task is None or self._task.done():
            self._task = loop.create_task(self._run())

    def cancel(self, backend_id: str) -> None:
        self.ramps.pop(backend_id, None)

    def sync(self) -> None:
        """After a snapshot: a backend that left service mid-ramp stops ramping."""
        for backend_id in list(self.ramps):
            backend = self.runtime.backends.get(backend_id)
            if (
                backend is None
                or backend.state is not BackendState.UP
                or backend.admin is not Admin.ENABLED
            ):
                del self.ramps[backend_id]

    def weight_percent(self, backend_id: str) -> int | None:
        """Share of its weight a ramping backend has now, in percent; None when not ramping."""
        started = self.ramps.get(backend_id)
        if started is None or self._loop is None:
            return None
        return round(100 * ramp_fraction(started, self._loop.time(), self.window))

    async def _run(self) -> None:
        while self.ramps or self._scaled:
            await asyncio.sleep(1.0 / TICKS_PER_SECOND)
            self._tick()

    def _tick(self) -> None:
        loop = self._loop
        assert loop is not None
        now = loop.time()
        self.sync()
        runtime = self.runtime
        pools = {runtime.backends[b].pool for b in self.ramps if b in runtime.backends}
        for pool in pools | self._scaled:
            members = [(b.id, b.weight) for b in runtime.backends.values() if b.pool == pool]
            weights = pool_weights(members, self.ramps, now, self.window)
            scaled = any(w is not None for w in weights.values())
            for backend_id, weight in weights.items():
                runtime.set_effective_weight(backend_id, weight)
            if scaled:
                self._scaled.add(pool)
            else:
                self._scaled.discard(pool)
        for backend_id, started in list(self.ramps.items()):
            if ramp_fraction(started, now, self.window) >= 1.0:
                del self.ramps[backend_id]
                log.info("backend %s: slow start done", backend_id)
