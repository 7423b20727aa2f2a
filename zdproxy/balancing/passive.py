"""Interfaces through which the data path reports outcomes to passive health
and asks for retry permission. The defaults do nothing / always allow; the
health package installs real ones. Kept here so the data path depends only on
these small interfaces, never on the detectors' insides."""

from __future__ import annotations

from typing import Protocol

from zdproxy.balancing.failures import Failure
from zdproxy.balancing.model import Backend


class PassiveObserver(Protocol):
    def failure(self, backend: Backend, kind: Failure, now: float) -> None:
        """A 5xx answer (``Failure.STATUS_5XX``, a bad or cut response included) or a
        connection-level failure (``failures.LOCAL``: connect, reset, timeout)."""

    def success(self, backend: Backend, now: float) -> None:
        """A good answer from a backend that has a failure streak."""


class NullObserver:
    def failure(self, backend: Backend, kind: Failure, now: float) -> None:
        backend.failures += 1

    def success(self, backend: Backend, now: float) -> None:
        backend.failures = 0


class RetryPolicy(Protocol):
    def record_request(self, now: float) -> None: ...

    def record_requests(self, now: float, count: int) -> None:
        """``count`` requests since the last call (the data path batches them)."""
        ...

    def allow_retry(self, now: float) -> bool: ...


class UnboundedRetries:
    def record_request(self, now: float) -> None:
        pass

    def record_requests(self, now: float, count: int) -> None:
        pass

    def allow_retry(self, now: float) -> bool:
        return True
