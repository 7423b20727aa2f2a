"""The selector: the one interface the data path asks for a backend.

Pool choice first (routing overrides, then affinity, then percent weights),
then a backend inside the pool. The selector reads an immutable ``Snapshot``;
``update`` swaps it whole, so no request ever sees a half-applied change.

Affinity (``sticky.mode``):

* ``pool``: an HMAC-signed cookie pins a client to the pool it first got
  ("version stickiness"). New clients follow the weights; a pinned client
  stays while its pool's weight is above zero; when it drops to zero the client
  moves at once, or after ``draining.timeout`` (``on_pool_zero``). A pin
  issued before a pool went to zero is not honoured when the pool comes back,
  so a restarted canary starts from its weight, not from its old clients.
  A pool the runtime marks revoked (a rolled-back canary) loses its clients
  at once, whatever ``on_pool_zero`` says.
* ``backend``: the cookie pins a backend too. When that backend is down,
  ejected, draining (unless ``draining.sticky_until_timeout``, then until the
  drain timeout) or just failed this request, another backend of the pool is
  chosen and the client re-pinned; the failed one is never retried.
* ``hash``: no cookie; the key (client address or a header, filled in by the
  data path as ``hash_key``) picks the pool from the weight split and the
  backend by consistent hashing with bounded loads.

When the chosen pool has no backend that can take the request, the request
goes to another pool that has one (not for a forced pool), and when none has,
to every member of the pool that the operator did not take out and that is
not still starting: Envoy's panic mode, which beats a 503 when the health
checks (or the outlier detector) are what is wrong.

The common path (no affinity, a backend available) allocates nothing: the
pickers are built once per snapshot.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Final, Protocol

from zdproxy.balancing.chash import HashRing, hash64
from zdproxy.balancing.model import (
    ADMIN_FLAGS,
    Backend,
    BackendState,
    Flag,
    PoolView,
    Snapshot,
)
from zdproxy.balancing.sticky import Pin, StickyCodec
from zdproxy.balancing.wrr import Picker, make_picker
from zdproxy.config.schema import DrainingConfig, StickyConfig


class RouteHints:
    """What the data path extracted from the request for routing decisions.

    The data path's per-request object is one (a subclass: policy never imports
    the data path); ``set_cookie`` is written back by the selector when the
    response must carry a new pin. A class, not a Protocol: compiled, the
    selector reads and writes these as native attributes, where a Protocol's
    are generic attribute lookups (about 150 instructions each, three a request).
    """

    __slots__ = ("affinity", "hash_key", "pool_override", "set_cookie")

    def __init__(
        self,
        pool_override: str | None = None,
        affinity: str | None = None,
        hash_key: str | None = None,
    ) -> None:
        self.pool_override = pool_override
        self.affinity = affinity
        self.hash_key = hash_key
        self.set_cookie: bytes | None = None


class Selector(Protocol):
    def select(self, hints: RouteHints, exclude: Backend | None = None) -> Backend | None:
        """A backend for this request, or None when no backend can take it.

        ``exclude`` is a backend that just failed this request (for retries).
        """
        ...

    def pool_view(self, name: str) -> PoolView | None: ...


# sticky modes
# Final: compiled code inlines them (a plain global is a dict lookup per read)
OFF: Final = 0
POOL: Final = 1
BACKEND: Final = 2
HASH: Final = 3
_MODES = {"off": OFF, "pool": POOL, "backend": BACKEND, "hash": HASH}

#: rings kept across snapshots (keyed by pool and members), before the cache is emptied
_RING_CACHE = 64


def _in_flight(backend: Backend) -> int:
    return backend.in_flight


class _PoolPicker:
    __slots__ = (
        "_panic",
        "_panic_size",
        "cookie",
        "cookie_second",
        "picker",
        "ring",
        "size",
        "view",
    )

    def __init__(self, view: PoolView) -> None:
        self.view = view
        self.picker: Picker[Backend] = make_picker(view.routable, view.routable_weights)
        self.size = len(view.routable)
        self._panic: Picker[Backend] | None = None
        self._panic_size = 0
        #: hash ring over the routable members (hash mode), built on first use
        self.ring: HashRing[Backend] | None = None
        #: the pool pin issued in ``cookie_second`` (the same for every new client)
        self.cookie: bytes | None = None
        self.cookie_second = -1

    def pick(self, exclude: Backend | None, exclude2: Backend | None = None) -> Backend | None:
        backend = self.picker.pick()
        if backend is None:
            return None
        if backend is exclude or backend is exclude2:
            # the other backends of the pool come up within ``size`` picks
            for _ in range(self.size):
                backend = self.picker.pick()
                if backend is not exclude and backend is not exclude2:
                    break
            else:
                return None
        return backend

    def panic_pick(self, exclude: Backend | None) -> Backend | None:
        """A member that the operator left enabled and that is not still starting,
        whatever its health: used only when the pool has nothing routable."""
        picker = self._panic
        if picker is None:
            members = [
                b for b in self.view.backends if not b.flags & _PANIC_EXCLUDED and b.weight > 0
            ]
            self._panic = picker = make_picker(members, [b.weight for b in members])
            self._panic_size = len(members)
        backend = picker.pick()
        if backend is not None and backend is exclude:
            for _ in range(self._panic_size):
                backend = picker.pick()
                if backend is not exclude:
                    break
            else:
                return None
        return backend


#: panic mode spreads over failed and ejected members, never over ones the operator
#: took out or that are still starting
_PANIC_EXCLUDED = ADMIN_FLAGS | Flag.PENDING_ACTIVE_CHECK | Flag.REMOVING


class WeightedSelector:
    """Percent weights across pools, weighted round-robin inside a pool, with
    optional affinity and panic mode."""

    __slots__ = (
        "_activated",
        "_codec",
        "_drain_timeout",
        "_half_age",
        "_max_age",
        "_mode",
        "_pickers",
        "_pool_picker",
        "_rings",
        "_slots",
        "_sticky_drain",
        "_weighted",
        "_zero_drain",
        "_zero_since",
        "clock",
        "monotonic",
        "snapshot",
    )

    def __init__(
        self,
        snapshot: Snapshot,
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        #: wall clock: pins carry Unix seconds (they outlive the process)
        self.clock = clock
        #: the drain clock (the runtime's): drain starts and pools at weight 0
        self.monotonic = monotonic
        self.snapshot = snapshot
        self._pickers: dict[str, _PoolPicker] = {}
        self._pool_picker: Picker[_PoolPicker] = make_picker([], [])
        self._weighted: tuple[_PoolPicker, ...] = ()
        self._slots: tuple[_PoolPicker, ...] = ()
        self._mode = OFF
        self._codec: StickyCodec | None = None
        self._max_age = 0
        self._half_age = 0
        self._zero_drain = False
        self._sticky_drain = False
        self._drain_timeout = 0.0
        #: when each pool last went from weight 0 to above 0 (pins older than that lapse)
        self._activated: dict[str, int] = {}
        #: since when (monotonic) each pool has had weight 0 (``on_pool_zero:
        #: drain_timeout``); a backend's drain start is in the snapshot
        self._zero_since: dict[str, float] = {}
        self._rings: dict[tuple[str, tuple[tuple[str, int], ...]], HashRing[Backend]] = {}
        self._track(None, snapshot)
        self.update(snapshot)

    def configure(self, sticky: StickyConfig, draining: DrainingConfig, secret: bytes) -> None:
        """Affinity and draining settings (at start and on reload)."""
        self._mode = _MODES[sticky.mode]
        self._codec = StickyCodec(secret, sticky.cookie, sticky.max_age)
        self._max_age = self._codec.max_age
        self._half_age = self._max_age // 2
        self._zero_drain = sticky.on_pool_zero == "drain_timeout"
        self._sticky_drain = draining.sticky_until_timeout
        self._drain_timeout = draining.timeout

    @property
    def secret(self) -> bytes:
        """The sticky signing key (b"" before ``configure``): workers get the
        control process's."""
        return self._codec.secret if self._codec is not None else b""

    @property
    def mode(self) -> str:
        return next(name for name, value in _MODES.items() if value == self._mode)

    def update(self, snapshot: Snapshot) -> None:
        self._track(self.snapshot, snapshot)
        pickers = {name: _PoolPicker(view) for name, view in snapshot.pools.items()}
        weighted = tuple(p for p in pickers.values() if p.view.weight > 0)
        pool_picker = make_picker(weighted, [p.view.weight for p in weighted])
        slots: list[_PoolPicker] = []
        for p in weighted:
            slots += [p] * p.view.weight
        # assign together: a request sees either the old or the new state
        self._pickers, self._pool_picker, self._weighted, self._slots, self.snapshot = (
            pickers,
            pool_picker,
            weighted,
            tuple(slots),
            snapshot,
        )

    def _track(self, old: Snapshot | None, new: Snapshot) -> None:
        """Note when pools go to / come back from weight 0."""
        now = self.monotonic()
        for name, view in new.pools.items():
            before = old.pools.get(name) if old is not None else None
            if view.weight > 0:
                self._zero_since.pop(name, None)
                if old is not None and (before is None or before.weight == 0):
                    # compared with pins' epochs: wall clock
                    self._activated[name] = int(self.clock())
            elif name in new.revoked:
                # a rolled-back canary: its clients move now, not at the drain timeout
                self._zero_since.pop(name, None)
            elif before is not None and before.weight > 0:
                self._zero_since[name] = now

    def drain_started(self, backend_id: str) -> float | None:
        """When the backend started draining (monotonic), if it is draining."""
        return self.snapshot.drain_started.get(backend_id)

    def pool_view(self, name: str) -> PoolView | None:
        return self.snapshot.pools.get(name)

    # ---- selection ----------------------------------------------------------

    def select(self, hints: RouteHints, exclude: Backend | None = None) -> Backend | None:
        override = hints.pool_override
        if override is not None:
            forced = self._pickers.get(override)
            if forced is not None:
                backend = forced.pick(exclude)
                if backend is None:
                    return self._rescue(forced, exclude, False)
                return backend
        mode = self._mode
        if mode == OFF:
            pool = self._pool_picker.pick()
            if pool is None:
                return None
            backend = pool.pick(exclude)
            if backend is None:
                return self._rescue(pool, exclude, True)
            return backend
        if mode == POOL:
            return self._select_pool_pinned(hints, exclude)
        if mode == BACKEND:
            return self._select_backend_pinned(hints, exclude)
        return self._select_hashed(hints, exclude)

    def _rescue(
        self, pool: _PoolPicker, exclude: Backend | None, cross_pool: bool
    ) -> Backend | None:
        """``pool`` has no backend for this request: another pool, then panic mode."""
        if pool.size:
            # its only routable backend is the one that just failed: another pool's
            # backend if there is one, else that backend again (on a new connection:
            # a keep-alive race is not a dead backend)
            if cross_pool:
                for other in self._weighted:
                    if other is not pool and other.size:
                        backend = other.pick(exclude)
                        if backend is not None:
                            return backend
            return exclude
        if cross_pool:
            for other in self._weighted:
                if other is not pool and other.size:
                    backend = other.pick(exclude)
                    if backend is not None:
                        return backend
        return pool.panic_pick(exclude)

    def _honoured(self, pin: Pin, now: float) -> _PoolPicker | None:
        """The pinned pool, if the pin still holds."""
        if now - pin.epoch > self._max_age:
            return None
        pool = self._pickers.get(pin.pool)
        if pool is None or pin.epoch < self._activated.get(pin.pool, -1):
            return None
        if pool.view.weight > 0:
            return pool
        if self._zero_drain:
            since = self._zero_since.get(pin.pool)
            if since is not None and self.monotonic() < since + self._drain_timeout:
                return pool
        return None

    def _pool_cookie(self, pool: _PoolPicker, now: float) -> bytes:
        second = int(now)
        cookie = pool.cookie
        if cookie is None or pool.cookie_second != second:
            assert self._codec is not None
            cookie = pool.cookie = self._codec.set_cookie(Pin(pool.view.name, None, second))
            pool.cookie_second = second
        return cookie

    def _select_pool_pinned(self, hints: RouteHints, exclude: Backend | None) -> Backend | None:
        codec = self._codec
        assert codec is not None
        now = self.clock()
        pool: _PoolPicker | None = None
        value = hints.affinity
        if value is not None:
            pin = codec.decode(value)
            if pin is not None:
                pool = self._honoured(pin, now)
                if pool is not None and now - pin.epoch > self._half_age and pool.view.weight > 0:
                    hints.set_cookie = self._pool_cookie(pool, now)  # refresh
        if pool is None:
            pool = self._pool_picker.pick()
            if pool is None:
                return None
            hints.set_cookie = self._pool_cookie(pool, now)
        backend = pool.pick(exclude)
        if backend is None:
            return self._rescue(pool, exclude, True)
        return backend

    def _pin_usable(self, backend: Backend, now: float) -> bool:
        if backend.state is BackendState.UP:
            return not backend.ejected
        if backend.state is BackendState.DRAINING and self._sticky_drain:
            started = self.snapshot.drain_started.get(backend.id)
            return started is not None and self.monotonic() < started + self._drain_timeout
        return False

    def _select_backend_pinned(self, hints: RouteHints, exclude: Backend | None) -> Backend | None:
        codec = self._codec
        assert codec is not None
        now = self.clock()
        pool: _PoolPicker | None = None
        pinned: Backend | None = None
        value = hints.affinity
        if value is not None:
            pin = codec.decode(value)
            if pin is not None and pin.backend is not None:
                pool = self._honoured(pin, now)
                if pool is not None:
                    pinned = self.snapshot.backends.get(pin.backend)
                    if pinned is not None and pinned.pool == pin.pool:
                        if pinned is not exclude and self._pin_usable(pinned, now):
                            if now - pin.epoch > self._half_age and pool.view.weight > 0:
                                hints.set_cookie = codec.backend_cookie(
                                    pin.pool, pinned.id, int(now)
                                )
                            return pinned
                    else:
                        pinned = None
        if pool is None:
            pool = self._pool_picker.pick()
            if pool is None:
                return None
        # a new client, or a fallback: never the pinned backend that cannot serve
        backend = pool.pick(exclude, pinned)
        if backend is None:
            backend = self._rescue(pool, exclude, True)
            if backend is None or backend.pool != pool.view.name or backend is pinned:
                return backend
        hints.set_cookie = codec.backend_cookie(pool.view.name, backend.id, int(now))
        return backend

    def _ring(self, pool: _PoolPicker) -> HashRing[Backend]:
        ring = pool.ring
        if ring is None:
            members = pool.view.routable
            key = (pool.view.name, tuple((b.id, b.weight) for b in members))
            ring = self._rings.get(key)
            if ring is None or any(a is not b for a, b in zip(ring.items, members, strict=True)):
                if len(self._rings) >= _RING_CACHE:
                    self._rings.clear()
                ring = self._rings[key] = HashRing(
                    members, [b.weight for b in members], [b.id for b in members], _in_flight
                )
            pool.ring = ring
        return ring

    def _select_hashed(self, hints: RouteHints, exclude: Backend | None) -> Backend | None:
        slots = self._slots
        if not slots:
            return None
        key = hints.hash_key
        if key is None:
            pool = self._pool_picker.pick()
            if pool is None:
                return None
            backend = pool.pick(exclude)
        else:
            h = hash64(key)
            pool = slots[(h & 0xFFFFFFFF) % len(slots)]
            backend = self._ring(pool).lookup(h, exclude)
        if backend is None:
            return self._rescue(pool, exclude, True)
        return backend
