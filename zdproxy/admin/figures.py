"""Live traffic figures for the state API and the dashboard, off the hot path.

Once a second the control plane reads the counters the data path keeps anyway
(each pool's ``PoolStats.totals()``, each backend's response codes) into a
short ring. A figure is the difference between the newest read and the oldest
one within the window: the same arithmetic as rollout analysis
(``Sample.between``), so the dashboard and a rollout verdict agree.

Pure logic over plain values: no asyncio, no I/O; the caller owns the clock.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from zdproxy.balancing.analysis import Sample

#: seconds of traffic a figure covers (requests/s, error rate, p99)
WINDOW_SECONDS = 10.0

Totals = tuple[tuple[int, ...], tuple[int, ...]]


@dataclass(frozen=True, slots=True)
class Reading:
    """Counters read at one instant: pools' ``totals()``, backends' (requests, errors)."""

    time: float
    pools: Mapping[str, Totals]
    backends: Mapping[str, tuple[int, int]]


def backend_counts(codes: Mapping[int, int]) -> tuple[int, int]:
    """(responses, errors) of a backend's counts by status: errors are 5xx answers
    and proxy-side failures (no valid status), as in rollout analysis."""
    total = errors = 0
    for code, n in codes.items():
        total += n
        if code >= 500 or code < 100:
            errors += n
    return total, errors


class TrafficFigures:
    """A ring of readings, one a second, spanning ``window`` seconds."""

    def __init__(self, window: float = WINDOW_SECONDS) -> None:
        self.window = window
        self._readings: deque[Reading] = deque()

    def add(self, reading: Reading) -> None:
        readings = self._readings
        readings.append(reading)
        # keep one reading at or before the window's start, so it is covered whole
        while len(readings) > 2 and readings[1].time <= reading.time - self.window:
            readings.popleft()

    def _ends(self) -> tuple[Reading, Reading] | None:
        if len(self._readings) < 2:
            return None
        return self._readings[0], self._readings[-1]

    def pool(self, name: str) -> dict[str, Any]:
        """A pool's figures over the window (zeros before two readings exist)."""
        ends = self._ends()
        first = ends[0].pools.get(name) if ends else None
        last = ends[1].pools.get(name) if ends else None
        if ends is None or first is None or last is None:
            return _figures(None, 0.0)
        return _figures(Sample.between(first, last), ends[1].time - ends[0].time)

    def backend(self, backend_id: str) -> dict[str, Any]:
        """A backend's requests/s and error rate over the window."""
        ends = self._ends()
        first = ends[0].backends.get(backend_id) if ends else None
        last = ends[1].backends.get(backend_id) if ends else None
        if ends is None or first is None or last is None:
            return _rates(0, 0, 0.0)
        elapsed = ends[1].time - ends[0].time
        return _rates(max(0, last[0] - first[0]), max(0, last[1] - first[1]), elapsed)


def _rates(requests: int, errors: int, elapsed: float) -> dict[str, Any]:
    return {
        "window_s": round(elapsed, 3),
        "requests": requests,
        "errors": errors,
        "requests_per_second": round(requests / elapsed, 3) if elapsed > 0 else 0.0,
        "error_rate": round(errors / requests, 6) if requests else 0.0,
    }


def _figures(sample: Sample | None, elapsed: float) -> dict[str, Any]:
    if sample is None or sample.requests < 0:  # stats reset (pool removed, re-added)
        return {**_rates(0, 0, elapsed), "p50_ms": None, "p99_ms": None}
    figures = sample.figures()
    return {
        **_rates(sample.requests, sample.errors, elapsed),
        "p50_ms": figures["p50_ms"],
        "p99_ms": figures["p99_ms"],
    }


def read(
    now: float,
    pools: Iterable[tuple[str, Totals]],
    backends: Iterable[tuple[str, Mapping[int, int]]],
) -> Reading:
    """One reading from the live counters (copies: the data path keeps counting)."""
    return Reading(
        now,
        dict(pools),
        {backend_id: backend_counts(codes) for backend_id, codes in backends},
    )
