"""Reload in place (SIGHUP, ``POST /api/v1/reload``, ``zdproxy ctl reload``).

The file is read and validated whole by the loader ``zdproxy check`` uses; an
invalid one is refused whole (each problem logged at ERROR, the running config
stays). A valid one is compared with the previously loaded file
(``config.diff``) and the difference applied in place: the runtime's pools and
backends in one snapshot swap, then health checks, stickiness, the data path's
settings, the log level and shadow traffic. What only a restart can change is
reported and left alone. One reload at a time.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from zdproxy import heap
from zdproxy.balancing.retry import RetryBudget
from zdproxy.config.diff import ConfigDiff, diff
from zdproxy.config.loader import ConfigError, load_config, summary
from zdproxy.config.schema import Config
from zdproxy.proxy.settings import DataPathSettings
from zdproxy.proxy.upstream_tls import tls_changed
from zdproxy.services import route_table

if TYPE_CHECKING:
    from zdproxy.server import ProxyServer

log = logging.getLogger("zdproxy.error")


@dataclass
class ReloadResult:
    #: "ok", "invalid" (refused, nothing changed) or "error" (failed while applying)
    result: str
    problems: list[str] = field(default_factory=list)
    plan: ConfigDiff | None = None
    event: dict[str, Any] | None = None

    def to_json(self) -> dict[str, Any]:
        plan = self.plan
        return {
            "result": self.result,
            "changed": plan is not None and not plan.empty,
            "changes": plan.lines() if plan is not None else [],
            "diff": plan.to_json() if plan is not None else None,
            "restart_needed": list(plan.restart_needed) if plan is not None else [],
            "event": self.event,
        }


class Reloader:
    def __init__(self, server: ProxyServer) -> None:
        self.server = server
        self._lock = asyncio.Lock()

    async def reload(self, actor: str) -> ReloadResult:
        """Re-read the config file and apply it; reloads queue behind each other."""
        await self.server.started.wait()
        async with self._lock:
            result = self._reload(actor)
            self.server.runtime.record_config_reload(result.result)
            return result

    def _reload(self, actor: str) -> ReloadResult:
        path = self.server.config_path
        if path is None:
            message = "no config file to reload (the process was not started with one)"
            log.error("config reload refused: %s", message)
            return ReloadResult("invalid", [message])
        log.info("config reload by %s: reading %s", actor, path)
        try:
            new = load_config(path)
        except ConfigError as exc:
            problems = [str(problem) for problem in exc.problems]
            log.error("config reload refused, the running config stays: %s", path)
            for line in problems:
                log.error("%s", line)
            return ReloadResult("invalid", problems)
        old = self.server.config
        if new.service_names() != old.service_names():
            message = (
                f"adding, removing or reordering services needs a restart (serving "
                f"{', '.join(old.service_names())}; the file says {', '.join(new.service_names())})"
            )
            log.error("config reload refused, the running config stays: %s", message)
            return ReloadResult("invalid", [f"{path}: services: {message}"])
        plan = diff(old, new)
        for message in plan.restart_needed:
            log.warning("config reload: %s", message)
        try:
            event = self._apply(old, new, plan, actor)
        except Exception as exc:
            log.exception("config reload failed while applying %s", path)
            return ReloadResult("error", [f"failed while applying: {exc}"], plan)
        if self.server.workers is not None:
            # the workers' data-path settings (timeouts, limits, routes...)
            self.server.workers.reloaded()
        heap.settle()
        log.info("config reload by %s: %s", actor, "; ".join(plan.lines()) or "nothing changed")
        return ReloadResult("ok", [], plan, event)

    def _apply(self, old: Config, new: Config, plan: ConfigDiff, actor: str) -> dict[str, Any]:
        server = self.server
        # what needs a restart stays as it is serving
        # (listeners too, but for the TLS settings of the same address: the files are
        # re-read first, so that a certificate that fails now changes nothing)
        listen = server.tls.merge(old.listen, new.listen)
        kept = new.model_copy(update={"listen": listen, "admin": old.admin, "state": old.state})
        log_config = new.log.model_copy(
            update={
                "format": old.log.format,
                "access_log": old.log.access_log,
                "access_log_path": old.log.access_log_path,
            }
        )
        kept = kept.model_copy(update={"log": log_config})
        ctx = server.ctx
        # the data path's new settings and routes, built before anything changes: one
        # that cannot be built (an upstream CA file unreadable) leaves all as it was
        settings = DataPathSettings.from_config(kept, ctx.fd_cap) if ctx is not None else None
        routes = route_table(kept, server.services)
        reloaded = server.tls.reload(listen)
        if reloaded:
            log.info("config reload: certificates re-read for %s", ", ".join(reloaded))
        before = {"summary": summary(old)}
        after = {"summary": summary(kept), **plan.to_json()}
        event = None
        for name, service in server.services.items():
            # each service's pools and settings, as its own runtime took them at start
            service_old, service_new = old.service_config(name), kept.service_config(name)
            service_plan = plan if service_new is kept else diff(service_old, service_new)
            applied = service.runtime.apply_config(service_new, service_plan, actor, before, after)
            if service.runtime is server.runtime:
                event = applied
            for spec in service_plan.backends_replaced:
                # pooled connections are by backend id: the old address's go
                server.upstreams.close_backend(spec.id)
            service.config = service_new
            if service.health is not None:
                service.health.reconfigure(service_new)
            if service.sticky_key is not None:
                service.sticky_key.reconfigure(service_new)
        assert event is not None
        server.config = kept
        server.upstreams.max_idle = kept.limits.max_idle_upstream_per_backend
        if ctx is not None and settings is not None:
            old_tls = ctx.upstream_tls
            # swapped whole, with no await in between: no request sees half of it
            ctx.install(settings)
            ctx.routes = routes
            ctx.retry_policy = RetryBudget(kept.retries.budget_percent)
            # pooled connections made with other TLS settings (plain, or another CA
            # or name) are not reused
            backends = (
                (b.id, b.pool, b.service)
                for service in server.services.values()
                for b in service.runtime.backends.values()
            )
            for backend_id in tls_changed(old_tls, ctx.upstream_tls, backends):
                server.upstreams.close_backend(backend_id)
        logging.getLogger().setLevel(kept.log.level.upper())
        server.shadow.reconfigure(kept.shadow, actor)
        return event.to_json()
