"""Time-driven progress of the runtimes: drains end (``drained``) and removals
complete on time even when no request or admin call comes (``Runtime.tick``).
Built and started by the composition root, in the process that owns the state
(the control process with workers)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence

from zdproxy.control.runtime import Runtime

log = logging.getLogger("zdproxy.control")

#: how often drains and removals are advanced, seconds
TICK_SECONDS = 0.1


class RuntimeTicker:
    def __init__(self, runtimes: Sequence[Runtime], interval: float = TICK_SECONDS) -> None:
        self.runtimes = list(runtimes)
        self.interval = interval
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run())

    def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            self._task = None

    def tick(self) -> None:
        """One pass over every runtime; one that fails is logged, the others go on."""
        for runtime in self.runtimes:
            try:
                runtime.tick()
            except Exception:
                log.exception("runtime tick failed")

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            self.tick()
