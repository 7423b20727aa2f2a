"""Consistent hashing with bounded loads, with plain values."""

from __future__ import annotations

from collections import Counter

import pytest

from zdproxy.balancing.chash import HashRing, hash64


class Item:
    def __init__(self, name: str) -> None:
        self.name = name
        self.load = 0

    def __repr__(self) -> str:
        return self.name


def ring(
    items: list[Item], weights: list[int] | None = None, balance: float = 1.25
) -> HashRing[Item]:
    return HashRing(
        items,
        weights or [1] * len(items),
        [i.name for i in items],
        lambda i: i.load,
        balance,
    )


KEYS = [f"10.0.{i // 256}.{i % 256}" for i in range(5000)]


def test_hash_is_stable() -> None:
    assert hash64("abc") == hash64("abc")
    assert hash64("abc") != hash64("abd")
    assert 0 <= hash64("x") < 2**64


def test_keys_spread_over_items() -> None:
    items = [Item(f"b{i}") for i in range(4)]
    r = ring(items)
    counts = Counter(r.lookup(hash64(k)) for k in KEYS)
    for item in items:
        assert 0.15 < counts[item] / len(KEYS) < 0.35


def test_weights_are_honoured() -> None:
    items = [Item("a"), Item("b")]
    r = ring(items, [1, 3])
    counts = Counter(r.lookup(hash64(k)) for k in KEYS)
    assert 0.65 < counts[items[1]] / len(KEYS) < 0.85


def test_removing_an_item_moves_only_its_keys() -> None:
    items = [Item(f"b{i}") for i in range(5)]
    full = ring(items)
    before = {k: full.lookup(hash64(k)) for k in KEYS}
    survivors = ring(items[:2] + items[3:])
    after = {k: survivors.lookup(hash64(k)) for k in KEYS}
    moved = [k for k in KEYS if before[k] is not after[k]]
    assert all(before[k] is items[2] for k in moved)
    # adding it back restores the old mapping exactly
    rebuilt = ring(items)
    again = {k: rebuilt.lookup(hash64(k)) for k in KEYS}
    assert again == before


def test_bounded_loads() -> None:
    items = [Item(f"b{i}") for i in range(4)]
    r = ring(items, balance=1.25)
    hot = hash64("the-hot-key")
    owner = r.owner(hot)
    placed = Counter()
    for _ in range(400):
        item = r.lookup(hot)
        assert item is not None
        item.load += 1
        placed[item] += 1
    total = sum(i.load for i in items)
    # nobody above 1.25 x the fair share (+1 for the request being placed)
    for item in items:
        assert item.load <= 1.25 * (total / len(items)) + 2
    assert placed[owner] == max(placed.values())


def test_unloaded_lookup_is_plain_consistent_hashing() -> None:
    items = [Item(f"b{i}") for i in range(3)]
    r = ring(items)
    for k in KEYS[:200]:
        assert r.lookup(hash64(k)) is r.owner(hash64(k))


def test_exclude_and_empty() -> None:
    items = [Item("a"), Item("b")]
    r = ring(items)
    h = hash64("k")
    first = r.lookup(h)
    second = r.lookup(h, exclude=first)
    assert second is not None and second is not first
    assert ring([Item("solo")]).lookup(h, exclude=None) is not None
    solo = Item("solo")
    assert ring([solo]).lookup(h, exclude=solo) is None
    assert HashRing([], [], [], lambda i: 0).lookup(h) is None


def test_bad_arguments() -> None:
    with pytest.raises(ValueError):
        HashRing([Item("a")], [1, 2], ["a"], lambda i: 0)
    with pytest.raises(ValueError):
        ring([Item("a")], balance=0.5)
