"""Consistent hashing with bounded loads (Mirrokni, Thorup, Zadimoghaddam 2016).

A ring of virtual nodes, as many per item as its weight asks. A key maps to
the first virtual node clockwise of its hash, so adding or removing one item
moves only about 1/n of the keys. Plain consistent hashing lets a hot key or
an unlucky ring overload one item; with bounded loads an item takes a new
request only while its load is under ``balance`` x its fair share of the
total (+1 for the request being placed), otherwise the walk goes on to the
next item clockwise. With ``balance`` 1.25 no item carries more than 25 %
above its share, and keys still move little when items come and go.

Loads are read through a function (in-flight requests of a backend), so the
ring itself is built once per snapshot and never changes.
"""

from __future__ import annotations

import hashlib
import math
from bisect import bisect_right
from collections.abc import Callable, Sequence
from typing import Generic, TypeVar

T = TypeVar("T")

#: virtual nodes per unit of weight
VNODES_PER_WEIGHT = 100
#: cap on the ring size, whatever the weights
MAX_POINTS = 20000
#: an item may carry this many times its fair share of the load
DEFAULT_BALANCE = 1.25


def hash64(key: str) -> int:
    """A well-mixed 64-bit hash of ``key`` (stable across processes, unlike ``hash``)."""
    return int.from_bytes(hashlib.blake2b(key.encode("utf-8"), digest_size=8).digest(), "big")


class HashRing(Generic[T]):
    __slots__ = ("_caps", "_load", "_owners", "_points", "balance", "items", "weights")

    def __init__(
        self,
        items: Sequence[T],
        weights: Sequence[int],
        names: Sequence[str],
        load: Callable[[T], int],
        balance: float = DEFAULT_BALANCE,
    ) -> None:
        """``names`` place each item on the ring: keep an item's name across
        rebuilds (its backend id) so its keys stay with it."""
        if not len(items) == len(weights) == len(names):
            raise ValueError("items, weights and names must have the same length")
        if balance < 1.0:
            raise ValueError("balance must be at least 1")
        self.items = tuple(items)
        self.weights = tuple(max(0, w) for w in weights)
        self._load = load
        self.balance = balance
        total_weight = sum(self.weights)
        per_weight = VNODES_PER_WEIGHT
        if total_weight * per_weight > MAX_POINTS and total_weight:
            per_weight = max(1, MAX_POINTS // total_weight)
        points: list[tuple[int, int]] = []
        for index, (name, weight) in enumerate(zip(names, self.weights, strict=True)):
            for v in range(weight * per_weight):
                points.append((hash64(f"{name}#{v}"), index))
        points.sort()
        self._points = [p for p, _ in points]
        self._owners = [i for _, i in points]
        #: share of the total load each item may carry (before the ``balance`` factor)
        self._caps = tuple(w / total_weight if total_weight else 0.0 for w in self.weights)

    def __len__(self) -> int:
        return len(self.items)

    def lookup(self, key_hash: int, exclude: T | None = None) -> T | None:
        """The item for ``key_hash``: the first one clockwise with room for one more
        request, skipping ``exclude``; None when the ring has no other item."""
        points = self._points
        if not points:
            return None
        items = self.items
        load = self._load
        loads = [load(item) for item in items]
        budget = self.balance * (sum(loads) + 1)
        caps = self._caps
        owners = self._owners
        n = len(points)
        start = bisect_right(points, key_hash)
        seen = 0
        tried = bytearray(len(items))
        fallback: T | None = None
        for step in range(n):
            index = owners[(start + step) % n]
            if tried[index]:
                continue
            tried[index] = 1
            seen += 1
            item = items[index]
            if item is not exclude:
                if loads[index] + 1 <= math.ceil(budget * caps[index]):
                    return item
                if fallback is None:
                    fallback = item
            if seen == len(items):
                break
        # every item at its bound (cannot happen with balance >= 1, but be safe)
        return fallback

    def owner(self, key_hash: int) -> T | None:
        """The item plain consistent hashing gives ``key_hash``, ignoring loads."""
        points = self._points
        if not points:
            return None
        return self.items[self._owners[bisect_right(points, key_hash) % len(points)]]
