"""Prometheus metrics, read at scrape time from the plain counters the data path keeps.

The data path never calls prometheus-client: per request it bumps a dict entry
on the backend (``Backend.codes``, ``Backend.upstream_errors``), ``in_flight``
and its pool's ``PoolStats`` (histogram, sum, count). ``ZdproxyCollector``
turns those into metric families when ``GET /metrics`` is scraped, so metrics
cost nothing per request beyond counters that rollout analysis needs anyway,
and nothing per label lookup or lock.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector, CollectorRegistry

from zdproxy.balancing.model import BackendState
from zdproxy.balancing.stats import LATENCY_BUCKETS
from zdproxy.control.rollout import ROLLBACK_BUCKETS, RolloutController
from zdproxy.control.runtime import Runtime

__all__ = [
    "CONTENT_TYPE_LATEST",
    "DataPathCounts",
    "RolloutCollector",
    "ZdproxyCollector",
    "build_registry",
    "render",
]

_BUCKET_LABELS = (*(repr(float(bound)) for bound in LATENCY_BUCKETS), "+Inf")


class DataPathCounts(NamedTuple):
    """Connection figures of the data path at scrape time."""

    client_connections: int = 0
    upstream_connections: int = 0
    tunnels: int = 0
    connections_accepted: int = 0
    retries: int = 0
    tunnels_total: int = 0


class ZdproxyCollector(Collector):
    """Every zdproxy metric, built from the runtime and the data path's counters."""

    def __init__(
        self,
        runtime: Runtime,
        data_path: Callable[[], DataPathCounts],
        services: dict[str, Runtime] | None = None,
    ) -> None:
        self.runtime = runtime
        self.data_path = data_path
        #: with several services: their runtimes, and every metric with a pool label
        #: gets a ``service`` label too (None: one service, labels as before)
        self.services = services

    def describe(self) -> list[Metric]:
        # no up-front description: the registry must not call collect() at register time
        return []

    def _runtimes(self) -> list[tuple[list[str], Runtime]]:
        """(extra label values, runtime) per service."""
        if self.services is None:
            return [([], self.runtime)]
        return [([name], runtime) for name, runtime in self.services.items()]

    def collect(self) -> Iterator[Metric]:
        runtime = self.runtime
        runtimes = self._runtimes()
        svc = [] if self.services is None else ["service"]

        requests = CounterMetricFamily(
            "zdproxy_requests",
            "Responses sent to clients, by pool, backend and status code.",
            labels=["pool", "backend", "code", *svc],
        )
        errors = CounterMetricFamily(
            "zdproxy_upstream_errors",
            "Failures talking to backends, by kind.",
            labels=["pool", "backend", "kind", *svc],
        )
        up = GaugeMetricFamily(
            "zdproxy_backend_up",
            "1 when the backend's state is up.",
            labels=["pool", "backend", *svc],
        )
        state = GaugeMetricFamily(
            "zdproxy_backend_state",
            "1 for the backend's current state (up, down, starting, draining, drained, disabled).",
            labels=["pool", "backend", "state", *svc],
        )
        ejected = GaugeMetricFamily(
            "zdproxy_backend_ejected",
            "1 while outlier detection keeps the backend out of rotation.",
            labels=["pool", "backend", *svc],
        )
        in_flight = GaugeMetricFamily(
            "zdproxy_backend_in_flight",
            "Requests (and tunnels) in progress on the backend.",
            labels=["pool", "backend", *svc],
        )
        for extra, service_runtime in runtimes:
            for backend in list(service_runtime.backends.values()):
                labels = [backend.pool, backend.id, *extra]
                pb = labels[:2]
                for code, count in list(backend.codes.items()):
                    requests.add_metric([*pb, str(code), *extra], count)
                for kind, count in list(backend.upstream_errors.items()):
                    errors.add_metric([*pb, kind, *extra], count)
                up.add_metric(labels, 1 if backend.state is BackendState.UP else 0)
                for value in BackendState:
                    on = 1 if backend.state is value else 0
                    state.add_metric([*pb, value.value, *extra], on)
                ejected.add_metric(labels, 1 if backend.ejected else 0)
                in_flight.add_metric(labels, backend.in_flight)
        yield requests
        yield errors
        yield up
        yield state
        yield ejected
        yield in_flight

        duration = HistogramMetricFamily(
            "zdproxy_request_duration_seconds",
            "Time from the start of a request to the end of its response, by pool.",
            labels=["pool", *svc],
        )
        weight = GaugeMetricFamily(
            "zdproxy_pool_weight", "Percent of new traffic sent to the pool.", labels=["pool", *svc]
        )
        for extra, service_runtime in runtimes:
            for pool, stats in service_runtime.pool_stats.items():
                running = 0
                buckets: list[tuple[str, float]] = []
                for label, count in zip(_BUCKET_LABELS, stats.histogram, strict=True):
                    running += count
                    buckets.append((label, running))
                duration.add_metric([pool, *extra], buckets, sum_value=stats.latency_sum)
            for pool, percent in service_runtime.pool_weights.items():
                weight.add_metric([pool, *extra], percent)
        yield duration
        yield weight

        counts = self.data_path()
        connections = GaugeMetricFamily(
            "zdproxy_connections",
            "Open connections: client (downstream), upstream (to backends), tunnel.",
            labels=["side"],
        )
        connections.add_metric(["client"], counts.client_connections)
        connections.add_metric(["upstream"], counts.upstream_connections)
        connections.add_metric(["tunnel"], counts.tunnels)
        yield connections
        yield CounterMetricFamily(
            "zdproxy_connections_accepted",
            "Client connections accepted.",
            value=counts.connections_accepted,
        )
        yield CounterMetricFamily(
            "zdproxy_retries", "Requests retried on another backend.", value=counts.retries
        )
        yield CounterMetricFamily(
            "zdproxy_tunnels",
            "Upgraded connections (WebSocket) tunnelled.",
            value=counts.tunnels_total,
        )

        rollouts = CounterMetricFamily(
            "zdproxy_rollouts", "Finished rollouts, by result.", labels=["result", *svc]
        )
        for extra, service_runtime in runtimes:
            for result, count in service_runtime.rollout_results.items():
                rollouts.add_metric([result, *extra], count)
        yield rollouts
        reloads = CounterMetricFamily(
            "zdproxy_config_reloads", "Config reloads (SIGHUP), by result.", labels=["result"]
        )
        for result, count in runtime.config_reloads.items():
            reloads.add_metric([result], count)
        yield reloads
        upgrades = CounterMetricFamily(
            "zdproxy_upgrades",
            "Hot upgrades (SIGUSR2), by result: ok counts in the new process.",
            labels=["result"],
        )
        for result, count in runtime.upgrades.items():
            upgrades.add_metric([result], count)
        yield upgrades


class ShadowCollector(Collector):
    """Shadow traffic figures (``proxy.shadow.ShadowSender.figures``) at scrape time."""

    def __init__(self, figures: Callable[[], dict[str, Any]]) -> None:
        self.figures = figures

    def describe(self) -> list[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        figures = self.figures()
        if not figures:
            return
        requests = CounterMetricFamily(
            "zdproxy_shadow_requests",
            "Shadow copies of live requests, by result (match, status_mismatch, "
            "body_mismatch, error, timeout, dropped, too_large, no_backend, skipped).",
            labels=["result"],
        )
        for result, count in figures["results"].items():
            requests.add_metric([result], count)
        yield requests
        yield CounterMetricFamily(
            "zdproxy_shadow_sent", "Shadow copies sent.", value=figures["sent"]
        )
        yield GaugeMetricFamily(
            "zdproxy_shadow_in_flight", "Shadow copies in flight.", value=figures["in_flight"]
        )
        latency = CounterMetricFamily(
            "zdproxy_shadow_latency_seconds",
            "Summed latency of the compared shadow copies and of their live requests.",
            labels=["side"],
        )
        latency.add_metric(["live"], figures["live_latency_seconds_sum"])
        latency.add_metric(["shadow"], figures["shadow_latency_seconds_sum"])
        yield latency


class RolloutCollector(Collector):
    """The rollout engine's figures: rollback times and the current rollout.
    (``zdproxy_rollouts_total`` comes from the runtime's counters, above.)
    With several services (``services``), each figure has a ``service`` label."""

    def __init__(
        self,
        controller: RolloutController,
        services: dict[str, RolloutController] | None = None,
    ) -> None:
        self.controller = controller
        self.services = services

    def describe(self) -> list[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        svc = [] if self.services is None else ["service"]
        controllers: list[tuple[list[str], RolloutController]] = (
            [([], self.controller)]
            if self.services is None
            else [([name], c) for name, c in self.services.items()]
        )
        histogram = HistogramMetricFamily(
            "zdproxy_rollout_rollback_seconds",
            "Time from a failing verdict to the canary pool serving nothing (weights back "
            "and its in-flight requests finished).",
            labels=svc,
        )
        step = GaugeMetricFamily(
            "zdproxy_rollout_step",
            "Current step (1-based) of the rollout in progress; 0: none.",
            labels=svc,
        )
        weight = GaugeMetricFamily(
            "zdproxy_rollout_weight",
            "Target pool's weight set by the rollout in progress.",
            labels=["pool", *svc],
        )
        phase = GaugeMetricFamily(
            "zdproxy_rollout_phase", "1 for the latest rollout's phase.", labels=["phase", *svc]
        )
        labels = (*(repr(float(b)) for b in ROLLBACK_BUCKETS), "+Inf")
        for extra, controller in controllers:
            running = 0
            buckets: list[tuple[str, float]] = []
            for label, count in zip(labels, controller.rollback_counts, strict=True):
                running += count
                buckets.append((label, running))
            histogram.add_metric(extra, buckets, sum_value=controller.rollback_sum)
            rollout = controller.current
            active = rollout is not None and rollout.active
            step.add_metric(extra, rollout.step + 1 if rollout is not None and active else 0)
            if rollout is not None:
                if active:
                    weight.add_metric([rollout.plan.to, *extra], rollout.target_weight)
                phase.add_metric([rollout.phase.value, *extra], 1)
        yield histogram
        yield step
        yield weight
        yield phase


def build_registry(
    runtime: Runtime,
    data_path: Callable[[], DataPathCounts],
    services: dict[str, Runtime] | None = None,
) -> CollectorRegistry:
    """A registry of its own (not the global one): several servers in one process
    (tests, the demo) each export their own figures. Process metrics included."""
    from prometheus_client import PlatformCollector, ProcessCollector

    registry = CollectorRegistry(auto_describe=False)
    registry.register(ZdproxyCollector(runtime, data_path, services))
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    return registry


def render(registry: CollectorRegistry) -> bytes:
    """The text exposition format."""
    return generate_latest(registry)


class EtcdCollector(Collector):
    """The link to etcd (``state.etcd``, ``control.shared.Cluster.figures``)."""

    def __init__(self, figures: Callable[[], dict[str, Any]]) -> None:
        self.figures = figures

    def describe(self) -> list[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        figures = self.figures()
        yield GaugeMetricFamily(
            "zdproxy_etcd_connected",
            "1 while etcd answers (changes are refused with 503 otherwise).",
            value=1 if figures["connected"] else 0,
        )
        yield GaugeMetricFamily(
            "zdproxy_etcd_leader",
            "1 while this instance is the rollout leader.",
            value=1 if figures["leader"] else 0,
        )
        for name, key, text in (
            ("zdproxy_etcd_commits", "commits", "State changes written to etcd, by service."),
            (
                "zdproxy_etcd_conflicts",
                "conflicts",
                "Commands rerun because another instance changed the state first, by service.",
            ),
        ):
            family = CounterMetricFamily(name, text, labels=["service"])
            for service, counts in figures["services"].items():
                family.add_metric([service], counts[key])
            yield family
