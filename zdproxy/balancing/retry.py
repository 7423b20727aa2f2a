"""When a failed request goes to another backend: the rule (``may_retry``) and the
retry budget (``RetryBudget``), which bounds how many retries the rule may grant.

The data path asks once, in one place (``Exchange._retry_or_fail``): first the
rule, with the facts of the attempt; then, only for a request the rule lets
through, the budget (which counts every retry it grants).

The retry budget: retries may add at most a set share of extra load.

Retries rescue single requests, but when a whole pool is failing they
multiply the load on what is left of it (a retry storm). The budget, as in
Envoy and Finagle, bounds retries to ``budget_percent`` of the requests seen
over a sliding window, plus a small floor so that a quiet proxy (a handful of
requests a second) can still retry the odd failure.

The window is a ring of one-second buckets with running totals, so both calls
are O(1) amortised and allocate nothing. Implements
``zdproxy.balancing.passive.RetryPolicy``; the data path calls
``record_requests`` once per sweeper tick with the requests started since
(a counter increment per request is all the data path pays), and
``allow_retry`` right before each retry (a granted retry is counted against the budget).
"""

from __future__ import annotations

from zdproxy.balancing.failures import Failure

#: the sliding window, in one-second buckets
WINDOW_SECONDS = 10
#: retries always allowed per window, whatever the traffic (the floor)
MIN_RETRIES_PER_WINDOW = 20


class RetryBudget:
    __slots__ = (
        "_buckets",
        "_requests",
        "_retries",
        "_seconds",
        "denied",
        "floor",
        "granted",
        "ratio",
        "window",
    )

    def __init__(
        self,
        budget_percent: float,
        window: int = WINDOW_SECONDS,
        floor: int = MIN_RETRIES_PER_WINDOW,
    ) -> None:
        if window < 1:
            raise ValueError("the window is at least one second")
        self.ratio = budget_percent / 100.0
        self.window = window
        self.floor = floor
        #: per bucket: [requests, retries]
        self._buckets = [[0, 0] for _ in range(window)]
        self._seconds = [-1] * window
        #: running totals over the buckets of the window
        self._requests = 0
        self._retries = 0
        #: lifetime counters, for metrics
        self.granted = 0
        self.denied = 0

    def _bucket(self, now: float) -> list[int]:
        second = int(now)
        index = second % self.window
        if self._seconds[index] != second:
            # once a second: buckets from past laps of the ring leave the totals
            self._expire(second)
            self._seconds[index] = second
        return self._buckets[index]

    def _expire(self, second: int) -> None:
        """Drop buckets that fell out of the window since their last use."""
        oldest = second - self.window
        seconds = self._seconds
        for i in range(self.window):
            if 0 <= seconds[i] <= oldest:
                bucket = self._buckets[i]
                self._requests -= bucket[0]
                self._retries -= bucket[1]
                bucket[0] = bucket[1] = 0
                seconds[i] = -1

    def record_request(self, now: float) -> None:
        self.record_requests(now, 1)

    def record_requests(self, now: float, count: int) -> None:
        self._bucket(now)[0] += count
        self._requests += count

    def allow_retry(self, now: float) -> bool:
        bucket = self._bucket(now)
        if self._retries >= max(self.floor, self._requests * self.ratio):
            self.denied += 1
            return False
        bucket[1] += 1
        self._retries += 1
        self.granted += 1
        return True

    def state(self, now: float) -> dict[str, float]:
        """The window's figures, for the admin API."""
        self._bucket(now)
        return {
            "requests": self._requests,
            "retries": self._retries,
            "allowed": max(self.floor, self._requests * self.ratio),
            "granted_total": self.granted,
            "denied_total": self.denied,
        }


def may_retry(
    failure: Failure,
    *,
    attempts: int,
    max_attempts: int,
    idempotent: bool,
    request_done: bool,
    expects_body: bool,
    body_kept: bool,
    reused: bool,
    got_bytes: bool,
) -> bool:
    """Whether a request whose attempt failed with ``failure``, before any byte of
    a response reached the client, may be sent to another backend.

    ``attempts`` were made of ``1 + max_attempts`` allowed (``retries.attempts``);
    ``body_kept``: the body sent so far can be sent again (nothing, or all of it
    within ``retries.buffer_body_bytes``); ``reused``: the attempt ran on a pooled
    keep-alive connection; ``got_bytes``: the backend sent any byte back.

    - A connect failure never reached a backend: any request goes again.
    - A backend that sent any byte (a 1xx, part of a head) received the request
      and worked on it: never again (a broken backend that answers garbage would
      otherwise see every request several times). Nor when the body is lost.
    - A reset: an idempotent request, or the keep-alive race (a pooled connection
      the backend closed as the request went out) for a request without a body.
    - A timeout: an idempotent request that was sent whole (nginx's
      ``proxy_next_upstream timeout``); the hung backend may still be working on it.
    - Anything else (a bad response, a 5xx answer) was an answer: relayed, never
      retried.
    """
    if attempts > max_attempts:
        return False
    if failure is Failure.CONNECT_REFUSED or failure is Failure.CONNECT_TIMEOUT:
        return True
    if got_bytes or not body_kept:
        return False
    if failure is Failure.RESET:
        return idempotent or (reused and not expects_body)
    if failure is Failure.TIMEOUT:
        return idempotent and request_done
    return False
