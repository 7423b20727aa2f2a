"""Passive health: the outlier detector the data path reports outcomes to.

Implements ``zdproxy.balancing.passive.PassiveObserver``. The policy (when to
eject, for how long, how many) is ``zdproxy.balancing.outlier``; this object
feeds it, keeps ``Backend.failures`` (the data path reports a success only to a
backend with a failure streak, so a success costs nothing in the common case),
applies ejections through ``Runtime.set_ejected`` and ends them on a timer.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from zdproxy.balancing.failures import Failure
from zdproxy.balancing.model import Admin, Backend, BackendState
from zdproxy.balancing.outlier import OutlierPolicy
from zdproxy.config.schema import OutlierConfig
from zdproxy.control.runtime import Runtime

log = logging.getLogger("zdproxy.health")


class OutlierDetector:
    def __init__(self, runtime: Runtime, config: OutlierConfig) -> None:
        self.runtime = runtime
        self.policy = OutlierPolicy(config)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = 0.0

    def reconfigure(self, config: OutlierConfig) -> None:
        self.policy.reconfigure(config)

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop

    def stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    # ---- PassiveObserver ----------------------------------------------------

    def failure(self, backend: Backend, kind: Failure, now: float) -> None:
        backend.failures += 1
        if backend.state is not BackendState.UP or backend.ejected:
            return  # out of rotation already (down, draining, ...): nothing to decide
        members = sum(
            1
            for b in self.runtime.backends.values()
            if b.pool == backend.pool and b.admin is Admin.ENABLED
        )
        ejection = self.policy.failure(backend.id, backend.pool, kind, now, members)
        if ejection is None:
            return
        log.warning(
            "backend %s ejected for %.1fs: %s",
            backend.id,
            ejection.until - now,
            ejection.reason,
        )
        self.runtime.set_ejected(backend.id, True)
        self._wake_at(ejection.until)

    def success(self, backend: Backend, now: float) -> None:
        backend.failures = 0
        self.policy.success(backend.id)

    # ---- ejection timers ------------------------------------------------------

    def _wake_at(self, when: float) -> None:
        loop = self._loop
        if loop is None:
            return
        if self._timer is not None:
            if self._timer_at <= when:
                return
            self._timer.cancel()
        self._timer_at = when
        self._timer = loop.call_at(when, self._wake)

    def _wake(self) -> None:
        self._timer = None
        loop = self._loop
        assert loop is not None
        now = loop.time()
        for backend_id in self.policy.due(now):
            backend = self.runtime.backends.get(backend_id)
            if backend is None:
                self.policy.forget(backend_id)
                continue
            backend.failures = 0
            log.info("backend %s: ejection over, back in service", backend_id)
            self.runtime.set_ejected(backend_id, False)
        following = self.policy.next_due()
        if following is not None:
            self._wake_at(max(following, now + 0.001))

    def sync(self, backends: dict[str, Backend]) -> None:
        """After a snapshot: forget removed backends; a backend the operator
        re-enabled or took out comes back from ejection (its health checks decide)."""
        loop = self._loop
        now = loop.time() if loop is not None else 0.0
        for backend_id in [b for b in self.policy.records if b not in backends]:
            self.policy.forget(backend_id)
        for backend in backends.values():
            if backend.ejected and backend.admin is not Admin.ENABLED:
                self.policy.release(backend.id, now)
                self.runtime.set_ejected(backend.id, False)

    # ---- hot upgrade -----------------------------------------------------------

    def export(self) -> dict[str, dict[str, Any]]:
        """Ejections in progress, for a hot upgrade's hand-over: by backend id,
        the pool, the wall-clock end (``until``: the hand-over's own duration, seconds
        on a loaded machine, must not lengthen the ejection), the seconds left (what
        older versions read) and the ejection counts (the backoff goes on)."""
        loop = self._loop
        now = loop.time() if loop is not None else 0.0
        wall = time.time()
        return {
            backend_id: {
                "pool": record.pool,
                "until": round(wall + record.ejected_until - now, 3),
                "remaining": round(record.ejected_until - now, 3),
                "ejections": record.ejections,
                "ejections_total": record.ejections_total,
            }
            for backend_id, record in self.policy.records.items()
            if record.ejected_until is not None
        }

    def adopt(self, handed: Any) -> None:
        """Take over the old process's ejections (after ``start``): out of rotation
        for the rest of their time, as if this process had ejected them."""
        if not isinstance(handed, dict) or self._loop is None:
            return
        now = self._loop.time()
        for backend_id, item in handed.items():
            backend = self.runtime.backends.get(backend_id)
            if backend is None or not isinstance(item, dict) or item.get("pool") != backend.pool:
                continue
            try:
                if "until" in item:
                    remaining = float(item["until"]) - time.time()
                else:
                    remaining = float(item["remaining"])
                ejections = int(item["ejections"])
                total = int(item["ejections_total"])
            except (KeyError, TypeError, ValueError):
                continue
            if remaining <= 0:
                continue
            record = self.policy.track(backend_id, backend.pool)
            record.ejections, record.ejections_total = ejections, total
            record.ejected_until = now + remaining
            self.runtime.set_ejected(backend_id, True)
            self._wake_at(record.ejected_until)

    # ---- for the admin API ---------------------------------------------------

    def info(self, backend_id: str) -> dict[str, Any]:
        record = self.policy.records.get(backend_id)
        if record is None:
            return {"ejected": False, "ejections_total": 0, "ejected_until": None}
        until = None
        if record.ejected_until is not None and self._loop is not None:
            until = round(time.time() + (record.ejected_until - self._loop.time()), 3)
        return {
            "ejected": record.ejected_until is not None,
            "ejections_total": record.ejections_total,
            "ejected_until": until,
        }
