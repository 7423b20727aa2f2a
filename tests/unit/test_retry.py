"""The retry budget, with plain values."""

from __future__ import annotations

import pytest

from zdproxy.balancing.failures import LOCAL, Failure, parse
from zdproxy.balancing.retry import RetryBudget, may_retry


def test_floor_lets_a_quiet_proxy_retry() -> None:
    budget = RetryBudget(20.0, window=10, floor=3)
    budget.record_request(0.5)
    assert [budget.allow_retry(0.5) for _ in range(4)] == [True, True, True, False]


def test_budget_is_a_share_of_requests_in_the_window() -> None:
    budget = RetryBudget(20.0, window=10, floor=0)
    for _ in range(1000):
        budget.record_request(1.0)
    granted = sum(budget.allow_retry(1.0) for _ in range(1000))
    assert granted == 200
    assert budget.denied == 800


def test_window_slides() -> None:
    budget = RetryBudget(10.0, window=10, floor=0)
    for _ in range(100):
        budget.record_request(0.0)
    assert sum(budget.allow_retry(0.0) for _ in range(50)) == 10
    # still inside the window: nothing new
    assert not budget.allow_retry(9.5)
    # after the window the old requests and retries are gone
    for _ in range(100):
        budget.record_request(10.0)
    assert sum(budget.allow_retry(10.0) for _ in range(50)) == 10
    state = budget.state(10.0)
    assert state["requests"] == 100 and state["retries"] == 10


def test_long_gap_resets_everything() -> None:
    budget = RetryBudget(20.0, window=5, floor=0)
    for second in range(5):
        for _ in range(10):
            budget.record_request(float(second))
    assert budget.state(4.0)["requests"] == 50
    assert budget.state(1000.0)["requests"] == 0
    assert not budget.allow_retry(1000.0)


def test_zero_budget_with_floor() -> None:
    budget = RetryBudget(0.0, window=10, floor=1)
    for _ in range(100):
        budget.record_request(0.0)
    assert budget.allow_retry(0.0)
    assert not budget.allow_retry(0.0)


def test_window_must_be_positive() -> None:
    with pytest.raises(ValueError):
        RetryBudget(20.0, window=0)


# ---- the rule: which failed attempt may go to another backend ------------------

FACTS: dict[str, object] = {
    "attempts": 1,
    "max_attempts": 2,
    "idempotent": True,
    "request_done": True,
    "expects_body": False,
    "body_kept": True,
    "reused": False,
    "got_bytes": False,
}


def rule(failure: Failure, **changes: object) -> bool:
    facts = {**FACTS, **changes}
    return may_retry(failure, **facts)  # type: ignore[arg-type]


def test_a_connect_failure_is_retried_whatever_the_method() -> None:
    for kind in (Failure.CONNECT_REFUSED, Failure.CONNECT_TIMEOUT):
        assert rule(kind, idempotent=False, expects_body=True, request_done=False)
        # attempts: 1 + max_attempts in all
        assert rule(kind, attempts=2) and not rule(kind, attempts=3)


def test_a_reset_is_retried_for_idempotent_requests_and_the_keep_alive_race() -> None:
    assert rule(Failure.RESET)
    assert not rule(Failure.RESET, idempotent=False)
    # a pooled connection closed as the request went out: safe without a body
    assert rule(Failure.RESET, idempotent=False, reused=True)
    assert not rule(Failure.RESET, idempotent=False, reused=True, expects_body=True)
    # the backend sent a byte (it had the request), or the body cannot be replayed
    assert not rule(Failure.RESET, got_bytes=True)
    assert not rule(Failure.RESET, body_kept=False)
    assert not rule(Failure.RESET, attempts=3)


def test_a_timeout_is_retried_only_for_a_whole_idempotent_request() -> None:
    assert rule(Failure.TIMEOUT)
    assert not rule(Failure.TIMEOUT, request_done=False)
    assert not rule(Failure.TIMEOUT, idempotent=False, reused=True)
    assert not rule(Failure.TIMEOUT, got_bytes=True)


def test_answers_are_never_retried() -> None:
    for kind in (Failure.BAD_RESPONSE, Failure.STATUS_5XX, Failure.STRAY_BYTES):
        assert not rule(kind)


def test_failure_kinds_are_the_metric_labels_and_local_ones_are_connection_level() -> None:
    assert {f.value for f in Failure} == {
        "connect_refused",
        "connect_timeout",
        "reset",
        "timeout",
        "bad_response",
        "stray_bytes",
        "5xx",
    }
    assert {f for f in Failure if f in LOCAL} == {
        Failure.CONNECT_REFUSED,
        Failure.CONNECT_TIMEOUT,
        Failure.RESET,
        Failure.TIMEOUT,
    }
    assert parse("reset") is Failure.RESET and parse("connect") is None
