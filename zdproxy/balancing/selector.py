"""The selector: the one interface the data path asks for a backend.

Pool choice first (routing overrides, then affinity, then percent weights),
then a backend inside the pool. The selector reads an immutable ``Snapshot``;
``update`` swaps it whole, so no request ever sees a half-applied change.
"""

from __future__ import annotations

from typing import Protocol

from zdproxy.balancing.model import Backend, PoolView, Snapshot
from zdproxy.balancing.wrr import Picker, make_picker


class RouteHints(Protocol):
    """What the data path extracted from the request for routing decisions.

    The data path's per-request object implements this; ``set_cookie`` is
    written back by the selector when the response must carry a new pin.
    """

    pool_override: str | None
    affinity: str | None
    hash_key: str | None
    set_cookie: bytes | None


class Selector(Protocol):
    def select(self, hints: RouteHints, exclude: Backend | None = None) -> Backend | None:
        """A backend for this request, or None when no backend can take it.

        ``exclude`` is a backend that just failed this request (for retries).
        """
        ...

    def pool_view(self, name: str) -> PoolView | None: ...


class _PoolPicker:
    __slots__ = ("picker", "size", "view")

    def __init__(self, view: PoolView) -> None:
        self.view = view
        self.picker: Picker[Backend] = make_picker(view.routable, view.routable_weights)
        self.size = len(view.routable)

    def pick(self, exclude: Backend | None) -> Backend | None:
        backend = self.picker.pick()
        if backend is exclude and exclude is not None:
            # the other backends of the pool come up within ``size`` picks
            for _ in range(self.size):
                backend = self.picker.pick()
                if backend is not exclude:
                    break
            else:
                return None
        return backend


class WeightedSelector:
    """Percent weights across pools, weighted round-robin inside a pool."""

    __slots__ = ("_pickers", "_pool_picker", "snapshot")

    def __init__(self, snapshot: Snapshot) -> None:
        self.snapshot = snapshot
        self._pickers: dict[str, _PoolPicker] = {}
        self._pool_picker: Picker[_PoolPicker] = make_picker([], [])
        self.update(snapshot)

    def update(self, snapshot: Snapshot) -> None:
        pickers = {name: _PoolPicker(view) for name, view in snapshot.pools.items()}
        weighted = [p for p in pickers.values() if p.view.weight > 0]
        pool_picker = make_picker(weighted, [p.view.weight for p in weighted])
        # assign together: a request sees either the old or the new state
        self._pickers, self._pool_picker, self.snapshot = pickers, pool_picker, snapshot

    def pool_view(self, name: str) -> PoolView | None:
        return self.snapshot.pools.get(name)

    def select(self, hints: RouteHints, exclude: Backend | None = None) -> Backend | None:
        override = hints.pool_override
        if override is not None:
            forced = self._pickers.get(override)
            if forced is not None:
                return forced.pick(exclude)
        pool = self._pool_picker.pick()
        if pool is None:
            return None
        return pool.pick(exclude)
