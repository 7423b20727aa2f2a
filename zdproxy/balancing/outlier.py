"""Outlier ejection policy (passive health), Envoy-style, with no I/O.

Real requests report their outcome. A backend is ejected when it fails too
many in a row:

* ``consecutive_5xx``: 5xx answers, counting connection-level failures too
  (a backend that resets or times out is no better than one answering 502);
* ``consecutive_connect_failures``: connect failures, resets before any
  response byte and timeouts (locally seen failures), which usually mean the
  process is gone, so the threshold is lower.

Any good answer resets both streaks. An ejection lasts
``base_ejection_time`` x the backend's ejection count, capped by
``max_ejection_time``; the count goes back down by one for each
``base_ejection_time`` the backend then spends in service without being
ejected again, so a backend that flapped once is not punished for ever.

``max_ejection_percent`` keeps part of a pool in service: an ejection that
would take more than that share of the pool's members out is skipped (the
streak stays, so the backend is ejected as soon as room frees up).

The caller (``zdproxy.health.outlier_driver``) applies the decisions to the runtime
and wakes ``release`` when an ejection is due to end.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from zdproxy.balancing.failures import LOCAL, Failure
from zdproxy.config.schema import OutlierConfig


@dataclass(slots=True)
class OutlierRecord:
    """What the policy knows about one backend."""

    pool: str
    #: consecutive failures of any kind (5xx and connection-level)
    consecutive_5xx: int = 0
    #: consecutive connection-level failures
    consecutive_local: int = 0
    #: ejections so far, decayed while the backend stays in service
    ejections: int = 0
    #: when the current ejection ends; None while in service
    ejected_until: float | None = None
    #: since when the backend has been in service (for the decay)
    in_service_since: float = 0.0
    #: total ejections, never decayed (for the admin API and metrics)
    ejections_total: int = 0


@dataclass(frozen=True, slots=True)
class Ejection:
    backend_id: str
    until: float
    reason: str


class OutlierPolicy:
    def __init__(self, config: OutlierConfig) -> None:
        self.config = config
        self.records: dict[str, OutlierRecord] = {}

    def reconfigure(self, config: OutlierConfig) -> None:
        self.config = config

    # ---- membership ----------------------------------------------------------

    def track(self, backend_id: str, pool: str) -> OutlierRecord:
        record = self.records.get(backend_id)
        if record is None or record.pool != pool:
            record = self.records[backend_id] = OutlierRecord(pool=pool)
        return record

    def forget(self, backend_id: str) -> None:
        self.records.pop(backend_id, None)

    # ---- outcomes ------------------------------------------------------------

    def failure(
        self, backend_id: str, pool: str, kind: Failure, now: float, pool_size: int
    ) -> Ejection | None:
        """Count a failure; an ``Ejection`` when the backend must go out now.

        ``pool_size`` is the number of the pool's members that count for
        ``max_ejection_percent``.
        """
        record = self.track(backend_id, pool)
        if record.ejected_until is not None:
            return None  # already out; late answers of requests sent before
        record.consecutive_5xx += 1
        if kind in LOCAL:
            record.consecutive_local += 1
        config = self.config
        if not config.enabled:
            return None
        if record.consecutive_local >= config.consecutive_connect_failures:
            reason = f"{record.consecutive_local} connection failures in a row"
        elif record.consecutive_5xx >= config.consecutive_5xx:
            reason = f"{record.consecutive_5xx} failed answers in a row"
        else:
            return None
        if not self._room_to_eject(pool, pool_size):
            return None
        self._decay(record, now)
        record.ejections += 1
        record.ejections_total += 1
        record.consecutive_5xx = 0
        record.consecutive_local = 0
        until = now + self.ejection_time(record.ejections)
        record.ejected_until = until
        return Ejection(backend_id, until, reason)

    def success(self, backend_id: str) -> None:
        record = self.records.get(backend_id)
        if record is not None:
            record.consecutive_5xx = 0
            record.consecutive_local = 0

    def ejection_time(self, ejections: int) -> float:
        config = self.config
        return min(config.base_ejection_time * max(1, ejections), config.max_ejection_time)

    def _room_to_eject(self, pool: str, pool_size: int) -> bool:
        if pool_size <= 0:
            return False
        ejected = sum(
            1 for r in self.records.values() if r.pool == pool and r.ejected_until is not None
        )
        allowed = math.floor(pool_size * self.config.max_ejection_percent / 100)
        return ejected + 1 <= allowed

    def _decay(self, record: OutlierRecord, now: float) -> None:
        base = self.config.base_ejection_time
        if record.ejections and base > 0:
            served = max(0.0, now - record.in_service_since)
            record.ejections = max(0, record.ejections - int(served // base))

    # ---- time ----------------------------------------------------------------

    def due(self, now: float) -> list[str]:
        """Backends whose ejection has ended by ``now``; they are back in service."""
        back: list[str] = []
        for backend_id, record in self.records.items():
            if record.ejected_until is not None and record.ejected_until <= now:
                record.ejected_until = None
                record.in_service_since = now
                record.consecutive_5xx = 0
                record.consecutive_local = 0
                back.append(backend_id)
        return back

    def next_due(self) -> float | None:
        times = [r.ejected_until for r in self.records.values() if r.ejected_until is not None]
        return min(times) if times else None

    def release(self, backend_id: str, now: float) -> bool:
        """End an ejection early (the backend was disabled, removed or re-enabled)."""
        record = self.records.get(backend_id)
        if record is None or record.ejected_until is None:
            return False
        record.ejected_until = None
        record.in_service_since = now
        return True

    def is_ejected(self, backend_id: str) -> bool:
        record = self.records.get(backend_id)
        return record is not None and record.ejected_until is not None
