"""``heap.settle``: what start-up left over is collected, the rest frozen, and a
second settle (a reload) collects what the first froze and became garbage."""

from __future__ import annotations

import gc
import weakref
from collections.abc import Iterator

import pytest

from zdproxy import heap


class _Node:
    def __init__(self) -> None:
        self.other: _Node | None = None


def _cycle() -> weakref.ref[_Node]:
    a, b = _Node(), _Node()
    a.other, b.other = b, a
    return weakref.ref(a)


@pytest.fixture(autouse=True)
def _unfrozen_after() -> Iterator[None]:
    yield
    gc.unfreeze()  # the rest of the suite runs with the collector as it was


def test_garbage_before_settle_is_collected_and_the_rest_frozen() -> None:
    gone = _cycle()
    kept = _Node()
    heap.settle()
    assert gone() is None
    assert gc.get_freeze_count() > 1000  # the modules this process imported, at least
    # frozen: not in the generations a collection walks (all gc.get_objects lists)
    assert all(obj is not kept for obj in gc.get_objects())


def test_a_frozen_cycle_dropped_later_goes_at_the_next_settle() -> None:
    a, b = _Node(), _Node()
    a.other, b.other = b, a
    heap.settle()
    ref = weakref.ref(a)
    del a, b
    gc.collect()
    assert ref() is not None  # frozen: no collection sees it
    heap.settle()
    assert ref() is None
