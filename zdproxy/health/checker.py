"""Active health checks, and the health service of one service (checks, outlier
detection, slow start, the tunnel drain deadline).

One probe per checked backend: an HTTP ``GET`` of the configured path with the
configured ``Host``, every ``interval`` (+/- ``jitter``), failed when not
answered within ``timeout`` or answered with a status outside
``expected_statuses``. Results go through the rise/fall state machine
(``zdproxy.balancing.healthsm``); only its transitions reach the runtime
(``Runtime.set_health``).

A probe is one task that awaits its own check before sleeping, so at most one
check per backend is ever in flight, and none outlives ``timeout``: a hung
backend costs one pending check, never a pile. Checks share one aiohttp session
with a keep-alive connector, so a healthy backend is checked over one reused
connection.

Settings merge per backend: the top-level ``health_check``, then the pool's
``health_check`` overrides, then the backend's (the nearest wins per key).
Backends added or removed at runtime get or lose their probe on the next
snapshot; a re-enabled backend (the runtime puts it back in ``starting``)
rises again.

``build_health(services)`` (called by the composition root, ``zdproxy.server``)
builds one ``HealthService`` per service (checks, outlier detection, slow start
and the tunnel drain deadline), each given only the narrow ``HealthHost`` it
needs; the root hooks them into the start and stop and feeds the data path's
passive results to their outlier detectors.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Mapping
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any, Protocol

import aiohttp

from zdproxy.balancing.healthsm import HealthMachine, Result
from zdproxy.balancing.model import Backend, BackendState, Health, Snapshot
from zdproxy.config.schema import (
    Config,
    HealthCheckConfig,
    HealthCheckOverride,
    UpstreamTls,
)
from zdproxy.control.runtime import Runtime
from zdproxy.health.drain import TunnelDrainer
from zdproxy.health.outlier_driver import OutlierDetector
from zdproxy.health.slowstart_driver import SlowStart
from zdproxy.proxy.upstream_tls import UpstreamTlsMap, UpstreamTlsTarget

if TYPE_CHECKING:
    from zdproxy.proxy.context import ProxyContext


class HealthHost(Protocol):
    """What health needs of one service: its runtime and config, and the data
    path's context (its tunnels, for the drain deadline). ``Service`` is one."""

    @property
    def runtime(self) -> Runtime: ...

    @property
    def config(self) -> Config: ...

    @property
    def ctx(self) -> ProxyContext | None: ...


log = logging.getLogger("zdproxy.health")

USER_AGENT = "zdproxy-health-check"
#: a health answer's body is read up to this many bytes (the rest is dropped)
MAX_BODY = 65536


def merge_settings(
    base: HealthCheckConfig, *overrides: HealthCheckOverride | None
) -> HealthCheckConfig:
    """``base`` with the keys each override sets, the last one winning."""
    update: dict[str, Any] = {}
    for override in overrides:
        if override is not None:
            update.update(override.model_dump(exclude_none=True))
    return base.model_copy(update=update) if update else base


def settings_for(config: Config, pool: str, backend_id: str) -> HealthCheckConfig:
    pool_config = config.pools.get(pool)
    pool_override = pool_config.health_check if pool_config is not None else None
    backend_override = None
    if pool_config is not None:
        for _, bid, spec in config.backend_ids():
            if bid == backend_id:
                backend_override = spec.health_check
                break
    return merge_settings(config.health_check, pool_override, backend_override)


def _tls_settings(tls: UpstreamTlsTarget | None) -> UpstreamTls | None:
    return None if tls is None else tls.settings


@dataclass(slots=True)
class CheckOutcome:
    passed: bool
    status: int | None
    error: str | None
    duration: float


class Probe:
    """The checks of one backend."""

    __slots__ = (
        "backend",
        "checks_total",
        "ever_up",
        "failures_total",
        "from_start",
        "last_check",
        "last_duration",
        "last_error",
        "last_status",
        "machine",
        "quick_rise",
        "settings",
        "task",
        "tls",
        "url",
    )

    def __init__(
        self,
        backend: Backend,
        settings: HealthCheckConfig,
        from_start: bool,
        tls: UpstreamTlsTarget | None = None,
    ) -> None:
        self.backend = backend
        self.settings = settings
        #: the pool's (or backend's) TLS to the backend: checks go over it too
        self.tls = tls
        # configured at process start and still starting: in service before the
        # restart, so one passing check brings it up (no 503s while a restarted
        # proxy re-checks everything); a failure asks for the full rise
        self.quick_rise = from_start and backend.health is Health.STARTING
        rise = 1 if self.quick_rise else settings.rise
        self.machine = HealthMachine(rise, settings.fall, backend.health)
        scheme = "http" if tls is None else "https"
        self.url = f"{scheme}://{backend.address}{settings.path}"
        self.task: asyncio.Task[None] | None = None
        #: configured at process start (its first rise does not slow-start)
        self.from_start = from_start
        self.ever_up = backend.health is Health.UP
        self.checks_total = 0
        self.failures_total = 0
        self.last_status: int | None = None
        self.last_error: str | None = None
        self.last_check: float | None = None
        self.last_duration: float | None = None

    def info(self) -> dict[str, Any]:
        machine = self.machine
        return {
            "checked": True,
            "health": machine.state.value,
            "consecutive_passes": machine.passes,
            "consecutive_failures": machine.fails,
            "rise": machine.rise,
            "fall": machine.fall,
            "last_status": self.last_status,
            "last_error": self.last_error,
            "last_check": self.last_check,
            "last_duration_ms": (
                None if self.last_duration is None else round(self.last_duration * 1000, 2)
            ),
            "checks_total": self.checks_total,
            "check_failures_total": self.failures_total,
        }


class HealthChecker:
    def __init__(self, runtime: Runtime, config: Config, slow_start: SlowStart) -> None:
        self.runtime = runtime
        self.config = config
        self.slow_start = slow_start
        self.probes: dict[str, Probe] = {}
        self._session: aiohttp.ClientSession | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._started_ids = set(runtime.backends)
        # built from this service's own config: its pools are the only ones here
        self.upstream_tls = UpstreamTlsMap(config)
        self.on_info: list[Any] = []

    # ---- life cycle ----------------------------------------------------------

    async def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        longest = max([p.settings.interval for p in self.probes.values()] or [2.0])
        connector = aiohttp.TCPConnector(
            limit=0,
            keepalive_timeout=max(5.0, 3 * longest),
            use_dns_cache=True,
        )
        self._session = aiohttp.ClientSession(
            connector=connector,
            cookie_jar=aiohttp.DummyCookieJar(),
            auto_decompress=False,
            skip_auto_headers=("Accept-Encoding",),
            headers={"User-Agent": USER_AGENT},
        )
        self.sync(self.runtime.backends)

    async def first_verdicts(self, timeout: float) -> None:
        """Wait (at most ``timeout``) until every probe has had its first check."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while any(p.checks_total == 0 for p in self.probes.values()):
            if loop.time() >= deadline:
                return
            await asyncio.sleep(0.01)

    async def stop(self) -> None:
        tasks = [p.task for p in self.probes.values() if p.task is not None]
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        self.probes.clear()
        if self._session is not None:
            await self._session.close()
            self._session = None

    def reconfigure(self, config: Config) -> None:
        """New settings (config reload): probes whose settings changed restart."""
        self.config = config
        self.upstream_tls = UpstreamTlsMap(config)
        for backend_id, probe in list(self.probes.items()):
            settings = settings_for(config, probe.backend.pool, backend_id)
            tls = self.upstream_tls.lookup(backend_id, probe.backend.pool)
            if settings != probe.settings or _tls_settings(tls) != _tls_settings(probe.tls):
                self._stop_probe(backend_id)
        self.sync(self.runtime.backends)

    # ---- membership ----------------------------------------------------------

    def sync(self, backends: dict[str, Backend]) -> None:
        """Probes for every checked backend, and none for the others."""
        if self._loop is None:
            return
        for backend_id in [b for b in self.probes if b not in backends]:
            self._stop_probe(backend_id)
            # back later under this id (API, reload): a new backend, full rise
            self._started_ids.discard(backend_id)
        for backend_id, backend in backends.items():
            probe = self.probes.get(backend_id)
            if probe is not None and probe.backend is not backend:
                self._stop_probe(backend_id)  # removed and added again under the same id
                self._started_ids.discard(backend_id)
                probe = None
            if probe is None:
                settings = settings_for(self.config, backend.pool, backend_id)
                if not settings.enabled:
                    continue
                tls = self.upstream_tls.lookup(backend_id, backend.pool)
                probe = Probe(backend, settings, backend_id in self._started_ids, tls)
                self.probes[backend_id] = probe
                probe.task = self._loop.create_task(self._run(probe))
            elif probe.machine.state is not backend.health:
                # the runtime moved it (re-enabled: back to starting; restored state)
                probe.machine.state = backend.health
                probe.machine.passes = probe.machine.fails = 0
                self._publish_info(probe)

    def _stop_probe(self, backend_id: str) -> None:
        probe = self.probes.pop(backend_id, None)
        if probe is not None and probe.task is not None:
            probe.task.cancel()

    # ---- checking ------------------------------------------------------------

    async def _run(self, probe: Probe) -> None:
        settings = probe.settings
        # the first check at once, then on the interval (the jitter spreads them)
        while True:
            outcome = await self.check(probe)
            self.apply(probe, outcome)
            jitter = settings.jitter
            await asyncio.sleep(settings.interval * (1 + random.uniform(-jitter, jitter)))

    async def check(self, probe: Probe) -> CheckOutcome:
        """One check: never longer than the timeout, never raises."""
        settings = probe.settings
        session = self._session
        assert session is not None and self._loop is not None
        headers = {"Host": settings.host} if settings.host else None
        started = self._loop.time()
        status: int | None = None
        error: str | None = None
        try:
            async with asyncio.timeout(settings.timeout):
                tls = probe.tls
                async with session.get(
                    probe.url,
                    headers=headers,
                    allow_redirects=False,
                    ssl=True if tls is None else tls.context,
                    server_hostname=None if tls is None else tls.server_name,
                ) as response:
                    status = response.status
                    await response.content.read(MAX_BODY)
        except TimeoutError:
            error = f"timeout after {settings.timeout:g}s"
        except aiohttp.ClientConnectorCertificateError as exc:
            error = f"tls: {exc.certificate_error}"
        except aiohttp.ClientConnectorError as exc:
            error = f"connect: {exc.os_error.strerror or exc.os_error}"
        except (aiohttp.ClientError, OSError) as exc:
            error = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        duration = self._loop.time() - started
        passed = error is None and status in settings.expected_statuses
        if error is None and not passed:
            error = f"status {status}"
        return CheckOutcome(passed, status, error, duration)

    def apply(self, probe: Probe, outcome: CheckOutcome) -> None:
        """Count one result; move the backend when a threshold is reached."""
        backend = probe.backend
        machine = probe.machine
        if machine.state is not backend.health:
            # the runtime moved it since the last snapshot sync (re-enabled: starting)
            machine.state = backend.health
            machine.passes = machine.fails = 0
        probe.checks_total += 1
        probe.last_check = round(time.time(), 3)
        probe.last_status = outcome.status
        probe.last_error = outcome.error
        probe.last_duration = outcome.duration
        if not outcome.passed:
            probe.failures_total += 1
        before = machine.state
        new = machine.record(Result.PASS if outcome.passed else Result.FAIL)
        if probe.quick_rise and (new is not None or not outcome.passed):
            probe.quick_rise = False
            machine.rise = probe.settings.rise
        if new is not None:
            if new is Health.UP:
                log.info(
                    "backend %s: health %s -> up after %d passing checks",
                    backend.id,
                    before.value,
                    probe.machine.passes,
                )
            else:
                log.warning(
                    "backend %s: health %s -> %s after %d failed checks (%s)",
                    backend.id,
                    before.value,
                    new.value,
                    probe.machine.fails,
                    outcome.error,
                )
            self.runtime.set_health(backend.id, new)
            if new is Health.UP:
                came_back = probe.ever_up or not probe.from_start
                if came_back and backend.state is BackendState.UP:
                    self.slow_start.begin(backend.id)
                probe.ever_up = True
            else:
                self.slow_start.cancel(backend.id)
        self._publish_info(probe)

    def _publish_info(self, probe: Probe) -> None:
        for callback in self.on_info:
            callback(probe.backend.id)


class HealthService:
    """Everything of health in one service: ``service.health``.

    ``state()`` (and ``backend_info(id)``) give, per backend id::

        {"checked": bool, "health": "starting" | "up" | "down",
         "consecutive_passes": int, "consecutive_failures": int, "rise": int, "fall": int,
         "last_status": int | None, "last_error": str | None,
         "last_check": float | None (Unix time), "last_duration_ms": float | None,
         "checks_total": int, "check_failures_total": int,
         "ejected": bool, "ejections_total": int, "ejected_until": float | None (Unix time),
         "slow_start_percent": int | None}

    The same mapping is handed to ``Runtime.set_health_info`` after every
    check and ejection change, for the admin state API.
    """

    def __init__(self, host: HealthHost) -> None:
        self.host = host
        runtime = host.runtime
        config = host.config
        self.runtime = runtime
        self.slow_start = SlowStart(runtime, config.slow_start.window)
        self.checker = HealthChecker(runtime, config, self.slow_start)
        self.checker.on_info.append(self._info_changed)
        self.outlier = OutlierDetector(runtime, config.outlier_detection)
        self.tunnels = TunnelDrainer(host)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._sync_pending = False
        self._ejected_seen: dict[str, bool] = {}
        runtime.subscribe(self._on_snapshot)

    async def start(self, handed: Mapping[str, Any] | None = None) -> None:
        """Start checking; ``handed``: the state a hot upgrade passed on (None: a
        fresh start), whose verdicts and ejections are adopted first."""
        loop = asyncio.get_running_loop()
        self._loop = loop
        self.outlier.start(loop)
        if handed is not None:
            # before the first checks: they continue from the old process's verdicts
            self.adopt(handed)
        self.slow_start.start(loop)
        self.tunnels.start(loop)
        await self.checker.start(loop)
        # serve with the first verdicts in: a restarted proxy does not answer 503
        # while it re-checks backends that were serving a moment ago
        longest = max((p.settings.timeout for p in self.checker.probes.values()), default=0.0)
        await self.checker.first_verdicts(longest + 0.1)
        for backend_id in self.runtime.backends:
            self._info_changed(backend_id)
        log.info(
            "health: %d backend(s) checked, outlier detection %s, slow start %s, sticky %s",
            len(self.checker.probes),
            "on" if self.outlier.policy.config.enabled else "off",
            f"{self.slow_start.window:g}s" if self.slow_start.window > 0 else "off",
            self.host.config.sticky.mode,
        )

    async def stop(self) -> None:
        self.tunnels.stop()
        self.slow_start.stop()
        self.outlier.stop()
        await self.checker.stop()

    def export(self) -> dict[str, Any]:
        """Health verdicts and ejections, for a hot upgrade's hand-over."""
        return {
            "health": {
                backend_id: {"address": backend.address, "health": backend.health.value}
                for backend_id, backend in self.runtime.backends.items()
                if self.runtime.checked.get(backend_id) and backend.health is not Health.STARTING
            },
            "ejections": self.outlier.export(),
        }

    def adopt(self, handed: Mapping[str, Any]) -> None:
        """The old process's verdicts: a backend it found up stays up until ``fall``
        failures, one it found down needs ``rise`` passes (instead of the quick
        single-pass rise of a fresh start)."""
        verdicts = handed.get("health")
        if isinstance(verdicts, dict):
            for backend_id, item in verdicts.items():
                backend = self.runtime.backends.get(backend_id)
                if (
                    backend is None
                    or not isinstance(item, dict)
                    or not self.runtime.checked.get(backend_id)
                ):
                    continue
                if item.get("address") != backend.address:
                    continue
                if item.get("health") in (Health.UP.value, Health.DOWN.value):
                    self.runtime.set_health(backend_id, Health(item["health"]))
        self.outlier.adopt(handed.get("ejections"))

    def reconfigure(self, config: Config) -> None:
        """Apply a reloaded config (after the runtime took its pools and backends)."""
        self.checker.reconfigure(config)
        self.outlier.reconfigure(config.outlier_detection)
        self.slow_start.reconfigure(config.slow_start.window)

    def _on_snapshot(self, snapshot: Snapshot) -> None:
        # runtime calls are not made from inside its own publish: later listeners
        # would get this snapshot after the newer one
        if self._loop is not None and not self._sync_pending:
            self._sync_pending = True
            self._loop.call_soon(self._sync)

    def _sync(self) -> None:
        self._sync_pending = False
        backends = self.runtime.backends
        self.checker.sync(backends)
        self.outlier.sync(backends)
        self.slow_start.sync()
        seen = self._ejected_seen
        for backend_id, backend in backends.items():
            if seen.get(backend_id) is not backend.ejected or backend_id in self.slow_start.ramps:
                seen[backend_id] = backend.ejected
                self._info_changed(backend_id)
        for backend_id in [b for b in seen if b not in backends]:
            del seen[backend_id]

    # ---- for the admin API ---------------------------------------------------

    def backend_info(self, backend_id: str) -> dict[str, Any]:
        probe = self.checker.probes.get(backend_id)
        if probe is not None:
            info = probe.info()
        else:
            backend = self.runtime.backends.get(backend_id)
            info = {"checked": False, "health": backend.health.value if backend else None}
        info.update(self.outlier.info(backend_id))
        info["slow_start_percent"] = self.slow_start.weight_percent(backend_id)
        return info

    def state(self) -> dict[str, dict[str, Any]]:
        return {backend_id: self.backend_info(backend_id) for backend_id in self.runtime.backends}

    def _info_changed(self, backend_id: str) -> None:
        self.runtime.set_health_info(backend_id, self.backend_info(backend_id))


def build_health(hosts: Mapping[str, HealthHost]) -> dict[str, HealthService]:
    """One ``HealthService`` per service (by name). With several services, a
    tunnel drainer leaves the tunnels of other services' backends alone."""
    built = {name: HealthService(host) for name, host in hosts.items()}
    if len(built) > 1:
        for name, health in built.items():
            others = [h.runtime for n, h in built.items() if n != name]
            health.tunnels.foreign = partial(_owned_by_any, others)
    return built


def _owned_by_any(runtimes: list[Runtime], backend: Backend) -> bool:
    return any(runtime.backends.get(backend.id) is backend for runtime in runtimes)
