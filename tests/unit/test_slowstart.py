"""Slow-start arithmetic, with plain values."""

from __future__ import annotations

from zdproxy.balancing.slowstart import (
    MIN_FRACTION,
    SCALE,
    pool_weights,
    ramp_fraction,
    scaled_weight,
)


def test_fraction_is_linear_over_the_window_with_a_floor() -> None:
    assert ramp_fraction(0.0, 0.0, 10.0) == MIN_FRACTION
    assert ramp_fraction(0.0, 5.0, 10.0) == 0.5
    assert ramp_fraction(0.0, 10.0, 10.0) == 1.0
    assert ramp_fraction(0.0, 99.0, 10.0) == 1.0
    assert ramp_fraction(0.0, 0.0, 0.0) == 1.0


def test_scaled_weight_never_zero_for_a_weighted_backend() -> None:
    assert scaled_weight(1, 0.0) == 1
    assert scaled_weight(1, 0.5) == SCALE // 2
    assert scaled_weight(3, 1.0) == 3 * SCALE
    assert scaled_weight(0, 1.0) == 0


def test_pool_weights_scale_every_member_while_one_ramps() -> None:
    members = [("a", 1), ("b", 1), ("c", 2)]
    weights = pool_weights(members, {"c": 0.0}, now=5.0, window=10.0)
    assert weights == {"a": SCALE, "b": SCALE, "c": SCALE}  # c at half of 2 x SCALE
    # linear: the share of c grows with time
    shares = []
    for t in (1.0, 4.0, 7.0, 9.9):
        w = pool_weights(members, {"c": 0.0}, now=t, window=10.0)
        c = w["c"]
        assert c is not None
        shares.append(c / sum(v for v in w.values() if v is not None))
    assert shares == sorted(shares)


def test_pool_weights_back_to_configured_when_no_ramp_left() -> None:
    members = [("a", 1), ("b", 1)]
    assert pool_weights(members, {"b": 0.0}, now=10.0, window=10.0) == {"a": None, "b": None}
    assert pool_weights(members, {}, now=0.0, window=10.0) == {"a": None, "b": None}
