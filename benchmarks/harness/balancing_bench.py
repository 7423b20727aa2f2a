"""Cost of choosing a backend, as pools grow (2, 10, 100, 1000 backends).

Times ``zdproxy.balancing`` in-process: the pickers (equal and unequal weights)
and the full ``WeightedSelector.select`` a request goes through. Two
reference pickers written here give the scale: nginx's smooth weighted
round-robin (O(n) per pick) and ``random.choices`` over cumulative weights
(O(log n)). Anything that cannot be imported or built is reported as skipped.
"""

from __future__ import annotations

import importlib
import random
import time
from bisect import bisect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

SIZES = (2, 10, 100, 1000)


def unequal_weights(n: int) -> list[int]:
    return [1 + (i % 3) for i in range(n)]


class ReferenceSmoothWeighted:
    """nginx's smooth weighted round-robin, as plainly written: O(n) per pick."""

    def __init__(self, items: list[int], weights: list[int]) -> None:
        self.items, self.weights = items, weights
        self.current = [0] * len(items)
        self.total = sum(weights)

    def pick(self) -> int:
        best = 0
        for i, weight in enumerate(self.weights):
            self.current[i] += weight
            if self.current[i] > self.current[best]:
                best = i
        self.current[best] -= self.total
        return self.items[best]


class ReferenceRandomWeighted:
    """Random pick over cumulative weights: O(log n) per pick."""

    def __init__(self, items: list[int], weights: list[int]) -> None:
        self.items = items
        self.cumulative: list[int] = []
        total = 0
        for weight in weights:
            total += weight
            self.cumulative.append(total)
        self.total = total
        self.random = random.Random(1).random

    def pick(self) -> int:
        return self.items[bisect(self.cumulative, self.random() * self.total)]


@dataclass
class _Hints:
    pool_override: str | None = None
    affinity: str | None = None
    hash_key: str | None = None
    set_cookie: bytes | None = None


def _zdproxy_picker(n: int, equal: bool) -> Callable[[], object]:
    wrr = importlib.import_module("zdproxy.balancing.wrr")
    items = list(range(n))
    weights = [1] * n if equal else unequal_weights(n)
    picker = wrr.make_picker(items, weights)
    pick: Callable[[], object] = picker.pick
    return pick


def _zdproxy_select(n: int, equal: bool) -> Callable[[], object]:
    balancing = importlib.import_module("zdproxy.balancing")
    stats = importlib.import_module("zdproxy.balancing.stats")
    backend_cls: Any = balancing.Backend
    up = balancing.BackendState.UP

    def pool(name: str, weight: int, count: int, base_port: int) -> Any:
        members = []
        for i in range(count):
            backend = backend_cls(f"{name}-{i + 1}", name, "127.0.0.1", base_port + i)
            backend.state = up
            members.append(backend)
        weights = [1] * count if equal else unequal_weights(count)
        for backend, w in zip(members, weights, strict=True):
            backend.weight = w
        return balancing.PoolView(
            name=name,
            weight=weight,
            backends=tuple(members),
            routable=tuple(members),
            routable_weights=tuple(weights),
            stats=stats.PoolStats(),
        )

    pools = {"blue": pool("blue", 100, n, 20000), "green": pool("green", 0, 1, 30000)}
    backends = {b.id: b for view in pools.values() for b in view.backends}
    snapshot = balancing.Snapshot(version=1, pools=pools, backends=backends)
    selector = balancing.WeightedSelector(snapshot)
    hints = _Hints()
    select = selector.select

    def one() -> object:
        return select(hints)

    return one


def _reference(cls: type[ReferenceSmoothWeighted] | type[ReferenceRandomWeighted]) -> Any:
    def build(n: int, equal: bool) -> Callable[[], object]:
        picker = cls(list(range(n)), [1] * n if equal else unequal_weights(n))
        pick: Callable[[], object] = picker.pick
        return pick

    return build


IMPLEMENTATIONS: list[tuple[str, bool, Callable[[int, bool], Callable[[], object]]]] = [
    ("zdproxy make_picker, equal weights", True, _zdproxy_picker),
    ("zdproxy make_picker, unequal weights", False, _zdproxy_picker),
    ("zdproxy WeightedSelector.select, equal weights", True, _zdproxy_select),
    ("zdproxy WeightedSelector.select, unequal weights", False, _zdproxy_select),
    ("reference: smooth WRR O(n) (nginx algorithm)", False, _reference(ReferenceSmoothWeighted)),
    ("reference: random.choices-style bisect O(log n)", False, _reference(ReferenceRandomWeighted)),
]


def time_calls(
    call: Callable[[], object], calls: int, repeats: int = 5, budget_s: float = 0.1
) -> float:
    """Best-of-``repeats`` nanoseconds per call (timeit's convention: the minimum
    is the run least disturbed by the rest of the machine). Each timing is cut to
    about ``budget_s`` seconds so slow implementations do not stretch the run."""
    start = time.perf_counter_ns()
    for _ in range(100):
        call()
    estimate = max(1.0, (time.perf_counter_ns() - start) / 100)
    calls = max(100, min(calls, int(budget_s * 1e9 / estimate)))
    best = float("inf")
    loops = range(calls)
    for _ in range(repeats):
        start = time.perf_counter_ns()
        for _ in loops:
            call()
        best = min(best, (time.perf_counter_ns() - start) / calls)
    return best


def run_balancing(calls: int) -> tuple[list[dict[str, Any]], list[str]]:
    """Records ``{implementation, backends, ns_per_pick}`` and skip messages."""
    records: list[dict[str, Any]] = []
    skipped: list[str] = []
    try:
        importlib.import_module("zdproxy.balancing")
    except Exception as exc:  # not written yet, or broken mid-edit
        skipped.append(f"balancing: zdproxy.balancing not importable ({exc!r}); references only")
    for name, equal, build in IMPLEMENTATIONS:
        for n in SIZES:
            try:
                call = build(n, equal)
                call()
            except Exception as exc:
                if name.startswith("zdproxy"):
                    if not any(
                        msg.startswith("balancing: zdproxy.balancing not") for msg in skipped
                    ):
                        skipped.append(f"balancing: {name}: cannot build ({exc!r})")
                    break
                raise
            per_call = time_calls(call, calls)
            records.append({"implementation": name, "backends": n, "ns_per_pick": round(per_call)})
    return records, skipped
