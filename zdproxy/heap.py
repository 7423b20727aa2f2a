"""The garbage collector in a long-running server.

Under a new connection per request, CPython's full (generation 2) collection
ran about every 1.5 s and took 40-54 ms each time (``gc.callbacks``, compiled
build, c=50): it scans every container object in the process, and almost all
of them are what start-up built and the server keeps for its whole life
(modules, the config, the admin app). Those pauses were the p99 of that
benchmark. Frozen (``gc.freeze``), they are left out of every collection;
what the data path allocates is still collected as before.

A config reload replaces part of what was frozen: frozen objects are never
collected, so the old ones, where they form cycles, would stay for good. A
reload therefore unfreezes, collects once and freezes again (one full
collection per reload).
"""

from __future__ import annotations

import gc
import logging
import time

log = logging.getLogger("zdproxy.error")


def settle() -> None:
    """Collect what start-up (or a reload) left over, then freeze the rest."""
    started = time.perf_counter()
    gc.unfreeze()
    gc.collect()
    gc.freeze()
    log.debug(
        "heap settled: %d objects frozen in %.1f ms",
        gc.get_freeze_count(),
        (time.perf_counter() - started) * 1000,
    )
