"""Slow start: a backend that comes up ramps its share linearly.

A freshly started application (cold caches, JIT, connection pools) should not
get its full share at once. For ``window`` seconds after it comes up, its
effective weight grows linearly from ``MIN_FRACTION`` of its weight to all of
it.

Backend weights are small integers (a pool of weight-1 backends is common), so
a fraction of one is not a weight. While any member of a pool ramps, every
member of that pool gets an effective weight scaled by ``SCALE``: the steady
ones ``weight x SCALE``, the ramping ones their fraction of it. When the last
ramp of the pool ends, the scaling is dropped and the configured weights
apply again. Pure arithmetic; the clock and the runtime calls are the
caller's (``zdproxy.health.slowstart_driver``).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

#: effective weights are scaled by this while a pool has a ramp in progress
SCALE = 100
#: share a backend gets at the start of its ramp (Envoy's min_weight_percent is 10 %)
MIN_FRACTION = 0.1


def ramp_fraction(started: float, now: float, window: float) -> float:
    """Share of its weight a backend that came up at ``started`` gets at ``now``."""
    if window <= 0:
        return 1.0
    elapsed = now - started
    if elapsed >= window:
        return 1.0
    return max(MIN_FRACTION, min(1.0, elapsed / window))


def scaled_weight(weight: int, fraction: float) -> int:
    """``weight`` scaled by ``SCALE``, times ``fraction``; at least 1 unless ``weight`` is 0."""
    if weight <= 0:
        return 0
    return max(1, round(weight * SCALE * fraction))


def pool_weights(
    members: Iterable[tuple[str, int]],
    ramps: Mapping[str, float],
    now: float,
    window: float,
) -> dict[str, int | None]:
    """Effective weights for a pool's members, by backend id.

    ``members`` are (backend id, configured weight); ``ramps`` maps the ids of
    backends that came up to when they did. The result maps every member to
    its effective weight, or to None everywhere (configured weights apply)
    when no member is still ramping.
    """
    members = list(members)
    ramping = any(
        backend_id in ramps and ramp_fraction(ramps[backend_id], now, window) < 1.0
        for backend_id, _ in members
    )
    if not ramping:
        return {backend_id: None for backend_id, _ in members}
    out: dict[str, int | None] = {}
    for backend_id, weight in members:
        started = ramps.get(backend_id)
        fraction = 1.0 if started is None else ramp_fraction(started, now, window)
        out[backend_id] = scaled_weight(weight, fraction)
    return out
