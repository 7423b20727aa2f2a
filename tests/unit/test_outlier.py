"""Outlier ejection policy, with plain values."""

from __future__ import annotations

from zdproxy.balancing.failures import Failure
from zdproxy.balancing.outlier import OutlierPolicy
from zdproxy.config.schema import OutlierConfig


def policy(**overrides: object) -> OutlierPolicy:
    values: dict[str, object] = {
        "consecutive_5xx": 5,
        "consecutive_connect_failures": 3,
        "base_ejection_time": 10.0,
        "max_ejection_time": 35.0,
        "max_ejection_percent": 50,
    }
    values.update(overrides)
    return OutlierPolicy(OutlierConfig.model_validate(values))


def test_consecutive_5xx_eject() -> None:
    p = policy()
    for _ in range(4):
        assert p.failure("a", "blue", Failure.STATUS_5XX, 100.0, pool_size=4) is None
    ejection = p.failure("a", "blue", Failure.STATUS_5XX, 100.0, pool_size=4)
    assert ejection is not None
    assert ejection.until == 110.0
    assert p.is_ejected("a")


def test_connect_failures_eject_sooner() -> None:
    p = policy()
    assert p.failure("a", "blue", Failure.CONNECT_REFUSED, 0.0, 4) is None
    assert p.failure("a", "blue", Failure.RESET, 0.0, 4) is None
    assert p.failure("a", "blue", Failure.TIMEOUT, 0.0, 4) is not None


def test_a_success_resets_the_streak() -> None:
    p = policy()
    for _ in range(4):
        p.failure("a", "blue", Failure.STATUS_5XX, 0.0, 4)
    p.success("a")
    for _ in range(4):
        assert p.failure("a", "blue", Failure.STATUS_5XX, 0.0, 4) is None


def test_ejection_time_grows_with_repeats_and_is_capped() -> None:
    p = policy(consecutive_5xx=1)
    now = 0.0
    lengths = []
    for _ in range(5):
        ejection = p.failure("a", "blue", Failure.STATUS_5XX, now, 4)
        assert ejection is not None
        lengths.append(ejection.until - now)
        now = ejection.until
        assert p.due(now) == ["a"]
    assert lengths == [10.0, 20.0, 30.0, 35.0, 35.0]


def test_repeat_count_decays_while_in_service() -> None:
    p = policy(consecutive_5xx=1)
    first = p.failure("a", "blue", Failure.STATUS_5XX, 0.0, 4)
    assert first is not None
    p.due(10.0)
    # 25 s in service: two base times, the count drops from 1 to 0
    again = p.failure("a", "blue", Failure.STATUS_5XX, 35.0, 4)
    assert again is not None and again.until - 35.0 == 10.0


def test_max_ejection_percent_keeps_part_of_the_pool() -> None:
    p = policy(consecutive_5xx=1, max_ejection_percent=50)
    assert p.failure("a", "blue", Failure.STATUS_5XX, 0.0, pool_size=3) is not None
    # a second one would be 2 of 3 = 67 % > 50 %
    assert p.failure("b", "blue", Failure.STATUS_5XX, 0.0, pool_size=3) is None
    # other pools have their own share
    assert p.failure("c", "green", Failure.STATUS_5XX, 0.0, pool_size=2) is not None
    # once a is back, b (still failing) can go
    p.due(10.0)
    assert p.failure("b", "blue", Failure.STATUS_5XX, 10.0, pool_size=3) is not None


def test_single_backend_pool_is_never_ejected_below_100_percent() -> None:
    p = policy(consecutive_5xx=1)
    assert p.failure("a", "solo", Failure.STATUS_5XX, 0.0, pool_size=1) is None
    p100 = policy(consecutive_5xx=1, max_ejection_percent=100)
    assert p100.failure("a", "solo", Failure.STATUS_5XX, 0.0, pool_size=1) is not None


def test_failures_while_ejected_are_ignored_and_due_returns_them_once() -> None:
    p = policy(consecutive_5xx=1)
    p.failure("a", "blue", Failure.STATUS_5XX, 0.0, 4)
    assert p.failure("a", "blue", Failure.STATUS_5XX, 1.0, 4) is None
    assert p.next_due() == 10.0
    assert p.due(9.9) == []
    assert p.due(10.0) == ["a"]
    assert p.due(11.0) == []
    assert p.next_due() is None


def test_disabled_counts_but_never_ejects() -> None:
    p = policy(enabled=False, consecutive_5xx=1)
    assert p.failure("a", "blue", Failure.STATUS_5XX, 0.0, 4) is None
    assert p.records["a"].consecutive_5xx == 1


def test_release_and_forget() -> None:
    p = policy(consecutive_5xx=1)
    p.failure("a", "blue", Failure.STATUS_5XX, 0.0, 4)
    assert p.release("a", 1.0)
    assert not p.is_ejected("a")
    assert not p.release("a", 1.0)
    p.forget("a")
    assert "a" not in p.records
