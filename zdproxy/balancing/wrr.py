"""Weighted round-robin pickers.

* Equal weights: plain round-robin, O(1). This is exactly what smooth weighted
  round-robin yields when all weights are equal.
* Unequal weights on a small set: nginx's smooth weighted round-robin (each
  pick adds every weight to its current value, takes the largest, and
  subtracts the total from the winner), O(n) with n small.
* Unequal weights on a large set: earliest-deadline-first on a heap (as
  Envoy does), O(log n), so that choosing stays flat as pools grow.
"""

from __future__ import annotations

import heapq
from collections.abc import Sequence
from typing import Final, Generic, TypeVar

T = TypeVar("T")

#: above this many items with unequal weights, switch from SWRR to EDF
SWRR_MAX_ITEMS: Final = 32


class Picker(Generic[T]):
    """Picks the next item by weight. Stateful; not shared across snapshots."""

    __slots__ = ()

    def pick(self) -> T | None:
        raise NotImplementedError


class EmptyPicker(Picker[T]):
    __slots__ = ()

    def pick(self) -> T | None:
        return None


class RoundRobin(Picker[T]):
    __slots__ = ("_items", "_n", "_next")

    def __init__(self, items: Sequence[T], start: int = 0) -> None:
        self._items = tuple(items)
        self._n = len(self._items)
        self._next = start % self._n if self._n else 0

    def pick(self) -> T | None:
        i = self._next
        self._next = i + 1 if i + 1 < self._n else 0
        return self._items[i]


class SmoothWeighted(Picker[T]):
    __slots__ = ("_current", "_items", "_total", "_weights")

    def __init__(self, items: Sequence[T], weights: Sequence[int]) -> None:
        self._items = tuple(items)
        self._weights = tuple(weights)
        self._current = [0] * len(self._items)
        self._total = sum(self._weights)

    def pick(self) -> T | None:
        current = self._current
        weights = self._weights
        best = 0
        best_value = None
        for i in range(len(current)):
            value = current[i] + weights[i]
            current[i] = value
            if best_value is None or value > best_value:
                best = i
                best_value = value
        current[best] -= self._total
        return self._items[best]


class EarliestDeadline(Picker[T]):
    """Each item is due every ``1/weight``; pick the earliest due, ties by order."""

    __slots__ = ("_heap", "_items", "_steps")

    def __init__(self, items: Sequence[T], weights: Sequence[int]) -> None:
        self._items = tuple(items)
        self._steps = tuple(1.0 / w for w in weights)
        self._heap = [(step, i) for i, step in enumerate(self._steps)]
        heapq.heapify(self._heap)

    def pick(self) -> T | None:
        deadline, i = self._heap[0]
        heapq.heapreplace(self._heap, (deadline + self._steps[i], i))
        return self._items[i]


def make_picker(items: Sequence[T], weights: Sequence[int]) -> Picker[T]:
    """The cheapest picker that honours ``weights``; zero-weight items never win."""
    pairs = [(item, w) for item, w in zip(items, weights, strict=True) if w > 0]
    if not pairs:
        return EmptyPicker()
    kept = [item for item, _ in pairs]
    kept_weights = [w for _, w in pairs]
    if len(set(kept_weights)) == 1:
        return RoundRobin(kept)
    if len(kept) <= SWRR_MAX_ITEMS:
        return SmoothWeighted(kept, kept_weights)
    return EarliestDeadline(kept, kept_weights)
