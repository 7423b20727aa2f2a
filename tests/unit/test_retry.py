"""The retry budget, with plain values."""

from __future__ import annotations

import pytest

from zdproxy.balancing.retry import RetryBudget


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
