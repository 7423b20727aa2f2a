"""Pure balancing policy: no asyncio, no I/O. Unit-tested with plain values."""

from zdproxy.balancing.model import Backend, BackendState, PoolView, Snapshot
from zdproxy.balancing.selector import RouteHints, Selector, WeightedSelector

__all__ = [
    "Backend",
    "BackendState",
    "PoolView",
    "RouteHints",
    "Selector",
    "Snapshot",
    "WeightedSelector",
]
