"""Canary analysis: is the target pool worse than the pool it replaces?

Pure functions over counts (no I/O, no asyncio), unit-tested with plain values.
The rollout engine reads each pool's cumulative counters
(``PoolStats.totals``) at the start and at the end of a window, for both pools
at the same instant, and hands the differences (``Sample``) to ``judge``.

Every check answers ``pass``, ``fail`` or ``inconclusive``, and fails only on
statistical evidence, so that a small sample never flaps a rollout. Each one
compares an observed figure with its limit and computes a one-sided p-value
(how likely a figure this bad is if the canary were in fact within its limit,
or no worse than the baseline): within the limit, pass; beyond it with
p < ``alpha`` (default 0.001), fail; beyond it with p < ``hold_alpha`` (0.05),
inconclusive (the step holds and the window grows until the evidence decides);
beyond it with a larger p, pass (noise of a small sample).

* ``error_rate`` (absolute, ``max_error_rate``): exact binomial test of the
  canary's errors against the limit rate.
* ``p99_latency`` (absolute, ``max_p99_latency``): the same binomial test on
  the requests surely slower than the limit, against 1 %.
* ``error_rate_increase`` (relative): Fisher's exact test (is the canary's
  error rate higher than the baseline's?) and the observed increase above
  ``max_error_rate_increase`` (percentage points).
* ``latency_ratio`` (relative): the Mann-Whitney U test on the two latency
  histograms (ties handled, normal approximation), and the canary's p99 above
  both ``max_latency_ratio`` times the baseline's and the baseline's plus
  ``latency_slack``.

A relative check needs ``min_requests`` in the baseline as well; without them
(the baseline gets no traffic at a 100 % step) it is skipped. The verdict is
``fail`` when a check fails, else ``inconclusive`` when one is, else ``pass``;
fewer than ``min_requests`` canary requests make it ``inconclusive`` whatever
the figures.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from zdproxy.balancing.stats import FINE_BOUNDS

PASS = "pass"
FAIL = "fail"
INCONCLUSIVE = "inconclusive"
SKIPPED = "skipped"


@dataclass(frozen=True, slots=True)
class Sample:
    """One pool's traffic over one window."""

    requests: int
    errors: int
    #: counts per ``FINE_BOUNDS`` bucket (the last one is over the last bound)
    latency: tuple[int, ...]

    @classmethod
    def between(
        cls,
        before: tuple[Sequence[int], Sequence[int]],
        after: tuple[Sequence[int], Sequence[int]],
    ) -> Sample:
        """The traffic between two ``PoolStats.totals()`` reads."""
        classes = [a - b for a, b in zip(after[0], before[0], strict=True)]
        latency = tuple(a - b for a, b in zip(after[1], before[1], strict=True))
        return cls(sum(classes), classes[5] + classes[0], latency)

    @classmethod
    def of(cls, requests: int, errors: int, latencies: Sequence[float] = ()) -> Sample:
        """From plain values (tests, benchmarks): latencies in seconds."""
        from bisect import bisect_left

        counts = [0] * (len(FINE_BOUNDS) + 1)
        for seconds in latencies:
            counts[bisect_left(FINE_BOUNDS, seconds)] += 1
        return cls(requests, errors, tuple(counts))

    def __add__(self, other: Sample) -> Sample:
        return Sample(
            self.requests + other.requests,
            self.errors + other.errors,
            tuple(a + b for a, b in zip(self.latency, other.latency, strict=True)),
        )

    @property
    def error_rate(self) -> float:
        return self.errors / self.requests if self.requests else 0.0

    def quantile(self, q: float) -> float | None:
        """Latency at quantile ``q`` (seconds), interpolated inside its bucket
        (log-linearly: the buckets are log-spaced); None without samples."""
        total = sum(self.latency)
        if not total:
            return None
        rank = q * total
        running = 0
        for i, n in enumerate(self.latency):
            if n and running + n >= rank:
                upper = FINE_BOUNDS[i] if i < len(FINE_BOUNDS) else FINE_BOUNDS[-1]
                lower = FINE_BOUNDS[i - 1] if 0 < i <= len(FINE_BOUNDS) else upper / 1.26
                if i == len(FINE_BOUNDS):
                    return upper  # over the last bound: at least that
                share = (rank - running) / n
                return float(lower * (upper / lower) ** share)
            running += n
        return FINE_BOUNDS[-1]

    def slower_than(self, limit: float) -> tuple[int, int]:
        """Requests surely slower than ``limit`` (their whole bucket is above it)
        and possibly slower (their bucket reaches above it)."""
        surely = possibly = 0
        for i, n in enumerate(self.latency):
            lower = FINE_BOUNDS[i - 1] if i > 0 else 0.0
            upper = FINE_BOUNDS[i] if i < len(FINE_BOUNDS) else math.inf
            if lower >= limit:
                surely += n
            if upper > limit:
                possibly += n
        return surely, possibly

    def figures(self) -> dict[str, Any]:
        p50, p99 = self.quantile(0.5), self.quantile(0.99)
        return {
            "requests": self.requests,
            "errors": self.errors,
            "error_rate": round(self.error_rate, 6),
            "p50_ms": round(p50 * 1000, 3) if p50 is not None else None,
            "p99_ms": round(p99 * 1000, 3) if p99 is not None else None,
        }


EMPTY = Sample(0, 0, (0,) * (len(FINE_BOUNDS) + 1))


@dataclass(frozen=True, slots=True)
class Gates:
    """The analysis settings of a plan (validated by the rollout engine)."""

    min_requests: int = 50
    max_error_rate: float | None = None
    #: seconds
    max_p99_latency: float | None = None
    #: percentage points (0.01: one point) the canary may add to the baseline's rate
    max_error_rate_increase: float | None = 0.01
    max_latency_ratio: float | None = 1.5
    #: seconds the canary's p99 may exceed the baseline's whatever the ratio
    latency_slack: float = 0.02
    #: significance level of every test (one-sided): a figure beyond its limit
    #: with a p-value under it fails
    alpha: float = 0.001
    #: beyond its limit with a p-value under this (but not under ``alpha``): the
    #: step holds for more traffic (inconclusive); at or over it: pass
    hold_alpha: float = 0.05


@dataclass(frozen=True, slots=True)
class Check:
    name: str
    result: str
    reason: str
    figures: dict[str, Any] = field(default_factory=dict)
    #: the observed figure is beyond the limit (significant or not)
    beyond: bool = False

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "result": self.result, "reason": self.reason, **self.figures}


@dataclass(frozen=True, slots=True)
class Verdict:
    result: str
    reason: str
    canary: Sample
    baseline: Sample
    checks: tuple[Check, ...]

    @property
    def beyond(self) -> bool:
        """Some figure is beyond its limit, proven or not (the canary looks bad)."""
        return any(check.beyond for check in self.checks)

    def to_json(self) -> dict[str, Any]:
        return {
            "result": self.result,
            "reason": self.reason,
            "canary": self.canary.figures(),
            "baseline": self.baseline.figures(),
            "checks": [check.to_json() for check in self.checks],
        }


# ---- statistics -----------------------------------------------------------------


def _log_choose(n: int, k: int) -> float:
    return math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1)


def binomial_sf(k: int, n: int, p: float) -> float:
    """P(X >= k) for X ~ Binomial(n, p), summed exactly in log space."""
    if k <= 0:
        return 1.0
    if k > n:
        return 0.0
    if p <= 0.0:
        return 0.0
    if p >= 1.0:
        return 1.0
    log_p, log_q = math.log(p), math.log1p(-p)
    total = 0.0
    for i in range(k, n + 1):
        term = math.exp(_log_choose(n, i) + i * log_p + (n - i) * log_q)
        total += term
        # past the mode the terms only shrink: stop once they stop counting
        if i > n * p and term < total * 1e-17:
            break
    return min(1.0, total)


def fisher_greater(a: int, n1: int, c: int, n2: int) -> float:
    """One-sided Fisher's exact test: P(canary errors >= a) given the margins,
    for ``a`` errors of ``n1`` canary requests and ``c`` of ``n2`` baseline ones
    (hypergeometric upper tail)."""
    total, errors = n1 + n2, a + c
    if n1 == 0 or errors == 0:
        return 1.0
    high = min(errors, n1)
    log_norm = _log_choose(total, n1)
    mode = (n1 + 1) * (errors + 1) / (total + 2)
    p = 0.0
    for x in range(a, high + 1):
        term = math.exp(_log_choose(errors, x) + _log_choose(total - errors, n1 - x) - log_norm)
        p += term
        if x > mode and term < p * 1e-17:
            break
    return min(1.0, p)


def _normal_sf(z: float) -> float:
    return 0.5 * math.erfc(z / math.sqrt(2.0))


def mann_whitney_greater(canary: Sequence[int], baseline: Sequence[int]) -> float:
    """One-sided Mann-Whitney U test on two histograms over the same buckets:
    the p-value of "canary latencies are stochastically larger". Requests in the
    same bucket are ties (mid-ranks, tie-corrected variance, continuity
    correction)."""
    n1, n2 = sum(canary), sum(baseline)
    if n1 == 0 or n2 == 0:
        return 1.0
    u = 0.0
    below = 0
    ties = 0.0
    for c, b in zip(canary, baseline, strict=True):
        u += c * (below + 0.5 * b)
        below += b
        t = c + b
        ties += t * t * t - t
    n = n1 + n2
    variance = n1 * n2 / 12.0 * ((n + 1) - ties / (n * (n - 1))) if n > 1 else 0.0
    if variance <= 0:
        return 1.0  # every request in one bucket: no evidence either way
    z = (u - n1 * n2 / 2.0 - 0.5) / math.sqrt(variance)
    return _normal_sf(z)


# ---- checks ----------------------------------------------------------------------


def _ms(seconds: float | None) -> float | None:
    return round(seconds * 1000, 3) if seconds is not None else None


def _p(value: float) -> float:
    return float(f"{value:.3g}")


def _decide(
    name: str, text: str, figures: dict[str, Any], beyond: bool, p: float, test: str, gates: Gates
) -> Check:
    """Beyond the limit and significant: fail; beyond and suggestive: inconclusive
    (more traffic decides); within the limit, or beyond on too little evidence: pass."""
    if not beyond:
        return Check(name, PASS, text, figures)
    if p < gates.alpha:
        return Check(name, FAIL, f"{text}, {test}p={p:.2g}", figures, True)
    if p < gates.hold_alpha:
        return Check(
            name, INCONCLUSIVE, f"{text}, not significant yet ({test}p={p:.2g})", figures, True
        )
    return Check(name, PASS, f"{text}, within noise ({test}p={p:.2g})", figures, True)


def check_error_rate(canary: Sample, limit: float, gates: Gates) -> Check:
    rate = canary.error_rate
    p = binomial_sf(canary.errors, canary.requests, limit)
    figures = {"value": round(rate, 6), "limit": limit, "p_value": _p(p)}
    text = f"error rate {rate:.2%} ({canary.errors}/{canary.requests}), limit {limit:.2%}"
    return _decide("error_rate", text, figures, rate > limit, p, "", gates)


def check_p99(canary: Sample, limit: float, gates: Gates) -> Check:
    surely, possibly = canary.slower_than(limit)
    n = sum(canary.latency)
    p99 = canary.quantile(0.99)
    p = binomial_sf(surely, n, 0.01)
    figures: dict[str, Any] = {
        "value_ms": _ms(p99),
        "limit_ms": _ms(limit),
        "slower": surely,
        "p_value": _p(p),
    }
    text = f"p99 {_ms(p99)} ms, limit {_ms(limit)} ms ({surely}/{n} requests slower)"
    if possibly > 0.01 * n >= surely:
        # the limit falls inside a bucket that holds the 99th percentile: the
        # histogram cannot tell; judge on the requests surely slower
        figures["note"] = "limit inside a histogram bucket"
    return _decide("p99_latency", text, figures, surely > 0.01 * n, p, "", gates)


def check_error_increase(canary: Sample, baseline: Sample, allowed: float, gates: Gates) -> Check:
    increase = canary.error_rate - baseline.error_rate
    p = fisher_greater(canary.errors, canary.requests, baseline.errors, baseline.requests)
    figures = {"value": round(increase, 6), "limit": allowed, "p_value": _p(p)}
    text = (
        f"error rate {canary.error_rate:.2%} vs baseline {baseline.error_rate:.2%} "
        f"(+{increase * 100:.2f} points, allowed +{allowed * 100:.2f})"
    )
    return _decide("error_rate_increase", text, figures, increase > allowed, p, "Fisher ", gates)


def check_latency_ratio(canary: Sample, baseline: Sample, ratio: float, gates: Gates) -> Check:
    slack = gates.latency_slack
    c99, b99 = canary.quantile(0.99), baseline.quantile(0.99)
    assert c99 is not None and b99 is not None
    allowed = max(b99 * ratio, b99 + slack)
    p = mann_whitney_greater(canary.latency, baseline.latency)
    figures = {
        "value": round(c99 / b99, 3) if b99 > 0 else None,
        "limit": ratio,
        "canary_p99_ms": _ms(c99),
        "baseline_p99_ms": _ms(b99),
        "p_value": _p(p),
    }
    text = (
        f"p99 {_ms(c99)} ms vs baseline {_ms(b99)} ms "
        f"(allowed {_ms(allowed)} ms: x{ratio} or +{_ms(slack)} ms)"
    )
    return _decide("latency_ratio", text, figures, c99 > allowed, p, "Mann-Whitney ", gates)


def judge(canary: Sample, baseline: Sample, gates: Gates) -> Verdict:
    """The verdict on one window: every configured check, then the worst result."""
    if canary.requests < gates.min_requests:
        reason = f"{canary.requests} canary requests, fewer than min_requests {gates.min_requests}"
        return Verdict(INCONCLUSIVE, reason, canary, baseline, ())
    checks: list[Check] = []
    if gates.max_error_rate is not None:
        checks.append(check_error_rate(canary, gates.max_error_rate, gates))
    if gates.max_p99_latency is not None:
        checks.append(check_p99(canary, gates.max_p99_latency, gates))
    relative = gates.max_error_rate_increase is not None or gates.max_latency_ratio is not None
    if relative and baseline.requests < gates.min_requests:
        reason = f"{baseline.requests} baseline requests, fewer than min_requests"
        checks.append(Check("relative", SKIPPED, reason))
    else:
        if gates.max_error_rate_increase is not None:
            checks.append(
                check_error_increase(canary, baseline, gates.max_error_rate_increase, gates)
            )
        if gates.max_latency_ratio is not None:
            checks.append(check_latency_ratio(canary, baseline, gates.max_latency_ratio, gates))
    for result in (FAIL, INCONCLUSIVE):
        hits = [check for check in checks if check.result == result]
        if hits:
            return Verdict(
                result,
                "; ".join(f"{c.name}: {c.reason}" for c in hits),
                canary,
                baseline,
                tuple(checks),
            )
    return Verdict(PASS, "every check passed", canary, baseline, tuple(checks))
