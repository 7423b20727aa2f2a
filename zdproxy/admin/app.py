"""The admin API: an aiohttp application on its own listener (never the data port).

It talks to the control plane only: reads come from the runtime, changes go
through the runtime's mutation methods, which validate everything and raise
``ControlError`` (mapped here to its HTTP status). A mutation is answered once
its new state and audit record are on disk.

``build_control_plane(host)`` builds it against ``AdminHost``, the narrow view
of the process it needs (loading the tokens, refusing to start on a
non-loopback address without one). The composition root (``server.wire``)
chooses the admin socket (handed over by a hot upgrade or freshly bound),
restores the saved state before traffic is served and registers the
start/retire/stop hooks; drain progress is its ``RuntimeTicker``, not this
package's.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from importlib import resources
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

from zdproxy import __version__
from zdproxy.admin.auth import (
    Authenticator,
    AuthError,
    Token,
    TokenConfigError,
    is_loopback,
    load_tokens,
)
from zdproxy.admin.figures import TrafficFigures
from zdproxy.admin.figures import read as read_figures
from zdproxy.admin.openapi import build_spec
from zdproxy.admin.requests import (
    AddBackendBody,
    FlipBody,
    NoBody,
    RollingBody,
    RollingPoolBody,
    RolloutBody,
    SplitBody,
    parse,
)
from zdproxy.balancing.model import Backend, flag_names
from zdproxy.buildinfo import build
from zdproxy.config.schema import DEFAULT_SERVICE, AdminConfig, Config
from zdproxy.control.commands import (
    AddBackend,
    Command,
    Disable,
    Drain,
    Enable,
    Flip,
    RemoveBackend,
    SetWeights,
)
from zdproxy.control.events import Event, describe, events_path, iso_time
from zdproxy.control.rolling import RollingUpdates
from zdproxy.control.rollout import RolloutController
from zdproxy.control.runtime import Runtime
from zdproxy.control.shadow import ShadowControl
from zdproxy.control.shared import Cluster, EtcdSettingsError, ServiceState
from zdproxy.control.store import FileStore, Persistence
from zdproxy.errors import ControlError
from zdproxy.metrics import (
    CONTENT_TYPE_LATEST,
    DataPathCounts,
    EtcdCollector,
    RolloutCollector,
    ShadowCollector,
    build_registry,
    render,
)
from zdproxy.services import Service, primary_name, service_state_path

if TYPE_CHECKING:
    import socket

    from zdproxy.reload import ReloadResult
    from zdproxy.upgrade import UpgradeResult

log = logging.getLogger("zdproxy.admin")

#: how often the live traffic figures read the counters, seconds
FIGURES_SECONDS = 1.0
MUTATING_METHODS = frozenset({"POST", "PUT", "DELETE", "PATCH"})
_TOKEN = web.RequestKey("zdproxy_token", Token)
_STATIC = resources.files("zdproxy.admin") / "static"
_CONTENT_TYPES = {"html": "text/html", "js": "text/javascript", "css": "text/css"}

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
_T = TypeVar("_T")

#: headers of the dashboard (page and assets): its own files only, no framing
DASHBOARD_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self'; "
        "connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'none'; "
        "frame-ancestors 'none'"
    ),
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}
#: headers of every other answer (API, metrics, errors): never cached, never sniffed
API_HEADERS = {"X-Content-Type-Options": "nosniff", "Cache-Control": "no-store"}


class RedactParseErrors(logging.Filter):
    """aiohttp logs a request it cannot parse with a traceback that quotes the
    offending bytes: an over-long ``Authorization`` header puts the bearer token
    in the log. Such records become one line naming the error, without them."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, HttpProcessingError):
            remote = record.args[0] if isinstance(record.args, tuple) and record.args else "?"
            record.msg = "admin API: refused a malformed request from %s (%s, status %d)"
            record.args = (remote, type(exc).__name__, exc.code)
            record.levelno, record.levelname = logging.WARNING, "WARNING"
            record.exc_info = None
            record.exc_text = None
        return True


def _redact_aiohttp_parse_errors() -> None:
    logger = logging.getLogger("aiohttp.server")
    if not any(isinstance(f, RedactParseErrors) for f in logger.filters):
        logger.addFilter(RedactParseErrors())


class ApiError(Exception):
    def __init__(self, status: int, message: str, extra: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.status = status
        #: more keys of the error answer (a refusal on shared state: the current state)
        self.extra = extra


def json_response(data: Any, status: int = 200) -> web.Response:
    return web.Response(
        text=json.dumps(data, separators=(",", ":")),
        status=status,
        content_type="application/json",
    )


def error_response(
    status: int, message: str, headers: dict[str, str] | None = None
) -> web.Response:
    response = json_response({"error": message}, status)
    if headers:
        response.headers.update(headers)
    return response


def _http_error_message(exc: web.HTTPException, request: web.Request, max_body: int) -> str:
    if exc.status == 404:
        return f"no such endpoint: {request.method} {request.path}"
    if exc.status == 405:
        allowed = exc.headers.get("Allow", "")
        return f"method {request.method} not allowed on {request.path} (allowed: {allowed})"
    if exc.status == 413:
        return f"request body too large (at most {max_body} bytes)"
    return exc.reason


#: the one change taken while a hot upgrade is in progress (it answers 409 itself)
_UPGRADE = "/api/v1/upgrade"


@dataclass(frozen=True, slots=True)
class ServiceApi:
    """What the API needs of one service's control plane."""

    name: str
    runtime: Runtime
    persistence: Persistence
    rolling: RollingUpdates | None = None
    rollouts: RolloutController | None = None
    #: ``state.etcd``: the service's state shared with the other instances
    shared: ServiceState | None = None


class AdminApi:
    """Request handlers; everything they need is passed in, nothing is global."""

    def __init__(
        self,
        runtime: Runtime,
        persistence: Persistence,
        auth: Authenticator,
        *,
        max_body: int,
        data_path: Callable[[], DataPathCounts],
        closing: Callable[[], bool],
        frozen: Callable[[], str | None] | None = None,
        rolling: RollingUpdates | None = None,
        shadow: ShadowControl | None = None,
        rollouts: RolloutController | None = None,
        reload: Callable[[str], Awaitable[ReloadResult]] | None = None,
        services: dict[str, ServiceApi] | None = None,
        upgrade: Callable[[str], Awaitable[UpgradeResult]] | None = None,
    ) -> None:
        self.runtime = runtime
        #: the control plane of each service; without ``services``, one named default
        self.named = services is not None
        self.primary = ServiceApi(DEFAULT_SERVICE, runtime, persistence, rolling, rollouts)
        if services is not None:
            self.primary = next(s for s in services.values() if s.runtime is runtime)
        self.services = services if services is not None else {DEFAULT_SERVICE: self.primary}
        self.reload_config = reload
        self.upgrade_process = upgrade
        #: ``workers`` > 1: each worker's pid and figures, for the state answer
        self.workers: Callable[[], list[dict[str, Any]]] | None = None
        self.workers_synced: Callable[[], Awaitable[None]] | None = None
        self.rolling = rolling
        self.shadow = shadow
        self.rollout_controller = rollouts
        self.persistence = persistence
        self.auth = auth
        self.max_body = max_body
        self.closing = closing
        #: requests/s, error rate, p99 per pool and backend, by service (fed by the
        #: control plane)
        self.figures = {name: TrafficFigures() for name in self.services}
        #: changes are refused while this says why (a hot upgrade hands the state over)
        self.frozen = frozen
        #: one operator change at a time: each is saved (or undone) before the next
        self._mutating = asyncio.Lock()
        runtimes = {name: svc.runtime for name, svc in self.services.items()}
        self.registry = build_registry(runtime, data_path, runtimes if self.named else None)
        if shadow is not None:
            # late-bound: the data path's sender is installed when the server starts
            self.registry.register(ShadowCollector(lambda: shadow.figures()))
        if rollouts is not None:
            controllers = {n: svc.rollouts for n, svc in self.services.items() if svc.rollouts}
            self.registry.register(RolloutCollector(rollouts, controllers if self.named else None))
        self.spec = json.dumps(build_spec(__version__)).encode()
        self.page = (_STATIC / "index.html").read_bytes()
        #: the dashboard's assets, read once: name -> (body, content type)
        self.assets = {
            item.name: (item.read_bytes(), _CONTENT_TYPES[item.name.rpartition(".")[2]])
            for item in _STATIC.iterdir()
            if item.name.rpartition(".")[2] in _CONTENT_TYPES
        }

    def build_app(self) -> web.Application:
        app = web.Application(middlewares=[self._middleware], client_max_size=self.max_body)
        app.on_response_prepare.append(_security_headers)
        r = app.router
        r.add_get("/healthz", self.healthz)
        r.add_get("/", self.dashboard)
        r.add_get("/static/{name}", self.asset)
        r.add_get("/metrics", self.metrics)
        r.add_get("/api/v1/openapi.json", self.openapi)
        r.add_get("/api/v1/services", self.list_services)
        # each service's endpoints; the un-prefixed ones act on the service "default"
        for base in ("/api/v1", "/api/v1/services/{svc}"):
            self._service_routes(r, base)
        r.add_get("/api/v1/shadow", self.shadow_status)
        r.add_put("/api/v1/shadow", self.shadow_set)
        r.add_delete("/api/v1/shadow", self.shadow_clear)
        r.add_post("/api/v1/reload", self.reload)
        r.add_post("/api/v1/upgrade", self.upgrade)
        return app

    def _service_routes(self, r: web.UrlDispatcher, base: str) -> None:
        r.add_get(f"{base}/state", self.state)
        r.add_get(f"{base}/events", self.events)
        r.add_put(f"{base}/split", self.split)
        r.add_post(f"{base}/flip", self.flip)
        r.add_post(f"{base}/backends", self.add_backend)
        r.add_delete(f"{base}/backends/{{id}}", self.remove_backend)
        for action in ("drain", "disable", "enable"):
            r.add_post(f"{base}/backends/{{id}}/{action}", self._backend_action(action))
        r.add_post(f"{base}/pools/{{pool}}/rolling", self.rolling_start)
        r.add_get(f"{base}/pools/{{pool}}/rolling", self.rolling_status)
        r.add_get(f"{base}/rolling", self.rolling_status)
        for verb in ("next", "abort"):
            r.add_post(f"{base}/pools/{{pool}}/rolling/{verb}", self._rolling_action(verb))
            r.add_post(f"{base}/rolling/{verb}", self._rolling_action(verb))
        r.add_post(f"{base}/rollouts", self.start_rollout)
        r.add_get(f"{base}/rollouts", self.rollout_history)
        r.add_get(f"{base}/rollouts/current", self.current_rollout)
        for action in ("pause", "resume", "promote", "abort"):
            r.add_post(f"{base}/rollouts/current/{action}", self._rollout_action(action))

    def _service(self, request: web.Request) -> ServiceApi:
        """The service a request acts on: the one its path names, else ``default``."""
        name = request.match_info.get("svc")
        services = self.services
        if name is None:
            svc = services.get(DEFAULT_SERVICE)
            if svc is None:
                known = ", ".join(services)
                raise ApiError(
                    400,
                    f"several services and none named default: use /api/v1/services/SERVICE"
                    f"{request.path.removeprefix('/api/v1')} (services: {known})",
                )
            return svc
        svc = services.get(name)
        if svc is None:
            raise ApiError(404, f"no service named {name!r} (services: {', '.join(services)})")
        return svc

    async def list_services(self, request: web.Request) -> web.Response:
        return json_response(
            {
                "pid": os.getpid(),
                "version": __version__,
                "default": DEFAULT_SERVICE if DEFAULT_SERVICE in self.services else None,
                "services": [
                    {
                        "name": name,
                        "weights": dict(svc.runtime.pool_weights),
                        "backends": len(svc.runtime.backends),
                        "generation": svc.runtime.version,
                    }
                    for name, svc in self.services.items()
                ],
            }
        )

    # ---- cross-cutting: auth, body size, errors ----------------------------

    @web.middleware
    async def _middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        path = request.path
        if path.startswith("/api/") or path == "/metrics":
            try:
                request[_TOKEN] = self.auth.check(
                    request.headers.get("Authorization"), request.method in MUTATING_METHODS
                )
            except AuthError as exc:
                headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None
                return error_response(exc.status, str(exc), headers)
        if request.method in MUTATING_METHODS and self.frozen is not None and path != _UPGRADE:
            reason = self.frozen()
            if reason is not None:
                return error_response(503, reason, {"Retry-After": "1"})
        length = request.content_length
        if length is not None and length > self.max_body:
            return error_response(413, f"request body too large (at most {self.max_body} bytes)")
        try:
            response = await handler(request)
            if self.workers_synced is not None and request.method in MUTATING_METHODS:
                # workers: the change is in every worker before the answer, so that
                # a request sent after the answer sees it (as with one process)
                await self.workers_synced()
            return response
        except ApiError as exc:
            if exc.extra:
                return json_response({"error": str(exc), **exc.extra}, exc.status)
            return error_response(exc.status, str(exc))
        except ControlError as exc:
            return error_response(exc.status, str(exc))
        except web.HTTPException as exc:
            if exc.status < 400:
                raise
            headers = {"Allow": exc.headers["Allow"]} if "Allow" in exc.headers else None
            message = _http_error_message(exc, request, self.max_body)
            return error_response(exc.status, message, headers)
        except Exception:
            log.exception("admin API: %s %s failed", request.method, path)
            return error_response(500, "internal error (see the zdproxy log)")

    async def _body(self, request: web.Request, allowed: frozenset[str] | None) -> dict[str, Any]:
        """The JSON object body; ``allowed`` keys only (None: any key)."""
        raw = await request.read()
        if not raw.strip():
            if allowed is not None and not allowed:
                return {}
            raise ApiError(400, "expected a JSON object body")
        try:
            data = json.loads(raw)
        except ValueError as exc:
            raise ApiError(400, f"invalid JSON body: {exc}") from None
        except RecursionError:
            raise ApiError(400, "invalid JSON body: nested too deeply") from None
        if not isinstance(data, dict):
            raise ApiError(400, "expected a JSON object body")
        if allowed is not None:
            unknown = sorted(set(data) - allowed)
            if unknown:
                expected = ", ".join(sorted(allowed)) or "none"
                raise ApiError(400, f"unknown key {unknown[0]!r} (expected: {expected})")
        return data

    # ---- reads --------------------------------------------------------------

    async def healthz(self, request: web.Request) -> web.Response:
        if self.closing():
            return error_response(503, "shutting down")
        return json_response({"status": "ok"})

    async def dashboard(self, request: web.Request) -> web.StreamResponse:
        return web.Response(body=self.page, content_type="text/html", charset="utf-8")

    async def asset(self, request: web.Request) -> web.Response:
        asset = self.assets.get(request.match_info["name"])
        if asset is None:
            raise ApiError(404, f"no such file: {request.path}")
        body, content_type = asset
        return web.Response(body=body, content_type=content_type, charset="utf-8")

    async def metrics(self, request: web.Request) -> web.Response:
        body = render(self.registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def openapi(self, request: web.Request) -> web.Response:
        return web.Response(body=self.spec, content_type="application/json")

    async def state(self, request: web.Request) -> web.Response:
        svc = self._service(request)
        view = state_view(
            svc.runtime,
            svc.persistence,
            svc.rolling,
            self.shadow if svc.runtime is self.runtime else None,
            svc.rollouts,
            self.figures.get(svc.name),
        )
        if svc.shared is not None:
            view["persistence"]["etcd"] = {**svc.shared.cluster.view(), **svc.shared.view()}
        # who asks: the dashboard greys out its buttons for a read token
        token = request[_TOKEN]
        view["token"] = {"name": token.name, "role": token.role}
        if self.workers is not None:
            view["workers"] = self.workers()
        if self.named:
            view["service"] = svc.name
            view["services"] = list(self.services)
        return json_response(view)

    def read_figures(self, now: float) -> None:
        """Read the traffic counters once (the control plane calls this each second)."""
        for name, svc in self.services.items():
            runtime = svc.runtime
            self.figures[name].add(
                read_figures(
                    now,
                    ((pool, stats.totals()) for pool, stats in runtime.pool_stats.items()),
                    ((backend.id, backend.codes) for backend in runtime.backends.values()),
                )
            )

    async def events(self, request: web.Request) -> web.Response:
        svc = self._service(request)
        unknown = sorted(set(request.query) - {"since", "limit"})
        if unknown:
            raise ApiError(400, f"unknown query parameter {unknown[0]!r} (expected: limit, since)")
        since = _int_param(request, "since", 0, 0, None)
        limit = _int_param(request, "limit", None, 1, 10000)
        return json_response({"events": svc.runtime.events.list(since, limit)})

    # ---- rollouts -------------------------------------------------------------

    def _controller(self, svc: ServiceApi) -> RolloutController:
        if svc.rollouts is None:
            raise ApiError(501, "rollouts are not available in this process")
        return svc.rollouts

    async def start_rollout(self, request: web.Request) -> web.Response:
        svc = self._service(request)
        controller = self._controller(svc)
        data = parse(RolloutBody, await self._body(request, None)).plan_data()
        rollout = await self._mutate(svc, lambda: controller.start(data, request[_TOKEN].name))
        return json_response({"rollout": controller.status(rollout)}, 201)

    async def current_rollout(self, request: web.Request) -> web.Response:
        svc = self._service(request)
        controller = self._controller(svc)
        rollout = controller.current
        if rollout is None:
            raise ApiError(404, "no rollout yet (start one with POST /api/v1/rollouts)")
        return json_response({"rollout": controller.status(rollout)})

    async def rollout_history(self, request: web.Request) -> web.Response:
        svc = self._service(request)
        return json_response(self._controller(svc).history_view())

    def _rollout_action(self, action: str) -> Handler:
        async def handle(request: web.Request) -> web.StreamResponse:
            svc = self._service(request)
            controller = self._controller(svc)
            await self._no_body(request)
            actor = request[_TOKEN].name
            act = {
                "pause": controller.pause,
                "resume": controller.resume,
                "promote": controller.promote,
                "abort": controller.abort,
            }[action]
            rollout = await self._mutate(svc, lambda: act(actor))
            return json_response(
                {"rollout": controller.status(rollout), "event": svc.runtime.events.last()}
            )

        return handle

    # ---- rolling updates ------------------------------------------------------

    def _rolling(self, svc: ServiceApi) -> RollingUpdates:
        if svc.rolling is None:
            raise ApiError(501, "rolling updates are not available")
        return svc.rolling

    async def _optional_body(self, request: web.Request) -> dict[str, Any]:
        """A JSON object body, or {} when there is none."""
        if not (await request.read()).strip():
            return {}
        return await self._body(request, None)

    async def rolling_start(self, request: web.Request) -> web.Response:
        svc = self._service(request)
        rolling = self._rolling(svc)
        body = parse(RollingBody, await self._optional_body(request)).plan_data()
        pool, actor = request.match_info["pool"], request[_TOKEN].name
        update = await self._mutate(svc, lambda: rolling.start(pool, body, actor))
        result = {"rolling": update.to_json(svc.runtime, svc.runtime.clock())}
        return json_response(result, 201)

    async def rolling_status(self, request: web.Request) -> web.Response:
        svc = self._service(request)
        rolling = self._rolling(svc)
        pool = request.match_info.get("pool")
        if pool is not None:
            rolling.find(pool)  # 404 for an unknown pool or one never updated
        return json_response(rolling.view(pool))

    def _rolling_action(self, verb: str) -> Handler:
        async def handle(request: web.Request) -> web.StreamResponse:
            svc = self._service(request)
            rolling = self._rolling(svc)
            pool = request.match_info.get("pool")
            if pool is None:
                pool = parse(RollingPoolBody, await self._optional_body(request)).pool
            else:
                await self._no_body(request)
            actor = request[_TOKEN].name
            act = rolling.next if verb == "next" else rolling.abort
            update = await self._mutate(svc, lambda: act(pool, actor))
            return json_response({"rolling": update.to_json(svc.runtime, svc.runtime.clock())})

        return handle

    # ---- shadow traffic -------------------------------------------------------

    def _shadow(self) -> ShadowControl:
        if self.shadow is None:
            raise ApiError(501, "shadow traffic is not available")
        return self.shadow

    async def shadow_status(self, request: web.Request) -> web.Response:
        return json_response(self._shadow().view())

    async def shadow_set(self, request: web.Request) -> web.Response:
        svc = self.primary
        shadow = self._shadow()
        body = await self._body(request, None)
        event = await self._mutate(svc, lambda: shadow.set(body, request[_TOKEN].name))
        return json_response(self._shadow_result(shadow, event))

    async def shadow_clear(self, request: web.Request) -> web.Response:
        svc = self.primary
        shadow = self._shadow()
        await self._no_body(request)
        event = await self._mutate(svc, lambda: shadow.clear(request[_TOKEN].name))
        return json_response(self._shadow_result(shadow, event))

    @staticmethod
    def _shadow_result(shadow: ShadowControl, event: Event | None) -> dict[str, Any]:
        return {
            **shadow.view(),
            "changed": event is not None,
            "event": event.to_json() if event is not None else None,
        }

    # ---- config reload -------------------------------------------------------

    async def reload(self, request: web.Request) -> web.Response:
        """Re-read the config file, as SIGHUP: 200 with what changed, 400 with the
        ``zdproxy check`` lines when the file is invalid (nothing changed)."""
        if self.reload_config is None:
            raise ApiError(501, "config reload is not available")
        await self._no_body(request)
        async with self._mutating:
            services = list(self.services.values())
            marks = [svc.persistence.mark() for svc in services]
            outcome = await self.reload_config(request[_TOKEN].name)
            problem = None
            for svc, mark in zip(services, marks, strict=True):
                problem = await svc.persistence.commit(mark) or problem
        if outcome.result == "invalid":
            message = "the config file is invalid; the running config stays"
            return json_response({"error": message, "problems": outcome.problems}, 400)
        if outcome.result != "ok":
            message = "; ".join(outcome.problems) or "the reload failed"
            return json_response({"error": message, "problems": outcome.problems}, 500)
        answer = outcome.to_json()
        # applied and served; a state file that could not be written is said, not undone
        answer["saved"] = problem is None
        if problem is not None:
            answer["save_error"] = problem
        return json_response(answer)

    # ---- hot upgrade ------------------------------------------------------------

    async def upgrade(self, request: web.Request) -> web.Response:
        """A hot upgrade, as SIGUSR2: 200 once the new process serves (this one
        then drains), 409 when one is in progress, 500 when it failed."""
        if self.upgrade_process is None:
            raise ApiError(501, "hot upgrade is not available")
        await self._no_body(request)
        outcome = await self.upgrade_process(request[_TOKEN].name)
        if outcome.result == "refused":
            raise ApiError(409, outcome.reason)
        if outcome.result != "ok":
            return json_response({"error": outcome.reason, "problems": outcome.problems}, 500)
        return json_response({"result": "ok", "pid": outcome.pid, "previous_pid": os.getpid()})

    # ---- mutations ----------------------------------------------------------

    async def _mutate(self, svc: ServiceApi, change: Callable[[], _T]) -> _T:
        """Apply ``change`` (a runtime mutation) and wait until it is saved. When it
        cannot be saved it is undone, so that what is served is what a restart
        would restore, and the caller gets 503 with the cause."""
        async with self._mutating:
            checkpoint = svc.runtime.checkpoint()
            # the controllers keep state of their own beside the runtime's
            shadow = self.shadow if svc.runtime is self.runtime else None
            controllers = [c for c in (svc.rollouts, svc.rolling, shadow) if c]
            if svc.shared is not None:
                # etcd: a compare-and-swap commit, retried against fresh state; a
                # command that no longer applies there says what the state is now
                try:
                    return await svc.shared.mutate(change, controllers)
                except ControlError as exc:
                    if exc.status not in (404, 409):
                        raise
                    current = {"current": svc.shared.current()}
                    raise ApiError(exc.status, str(exc), current) from None
            saved = [(c, c.checkpoint()) for c in controllers]
            mark = svc.persistence.mark()
            result = change()
            problem = await svc.persistence.commit(mark)
            if problem is not None:
                for controller, point in saved:
                    controller.rollback(point)
                svc.runtime.rollback(checkpoint)
                log.error("the change was undone: %s", problem)
                raise ApiError(503, f"the change was not applied: {problem}")
            return result

    @staticmethod
    def _weights_result(svc: ServiceApi, event: Event | None) -> dict[str, Any]:
        return {
            "weights": dict(svc.runtime.pool_weights),
            "changed": event is not None,
            "event": event.to_json() if event is not None else None,
        }

    async def _apply(self, svc: ServiceApi, command: Command, request: web.Request) -> Event | None:
        """Apply one runtime command as the request's token, saved (or undone)."""
        actor = request[_TOKEN].name
        return await self._mutate(svc, lambda: svc.runtime.apply(command, actor))

    async def _no_body(self, request: web.Request) -> None:
        parse(NoBody, await self._body(request, frozenset()))

    async def split(self, request: web.Request) -> web.Response:
        svc = self._service(request)
        body = SplitBody.parse(await self._body(request, None), svc.runtime.pool_weights)
        event = await self._apply(svc, SetWeights(body.weights, body.force), request)
        return json_response(self._weights_result(svc, event))

    async def flip(self, request: web.Request) -> web.Response:
        svc = self._service(request)
        body = parse(FlipBody, await self._body(request, None))
        event = await self._apply(svc, Flip(body.to, body.force), request)
        return json_response(self._weights_result(svc, event))

    async def add_backend(self, request: web.Request) -> web.Response:
        svc = self._service(request)
        body = parse(AddBackendBody, await self._body(request, None))
        command = AddBackend(body.pool, body.address, body.id, body.weight)
        event = await self._apply(svc, command, request)
        assert event is not None  # an added backend is always a change
        return json_response(
            {
                "backend": backend_view(svc.runtime, svc.runtime.backends[event.target]),
                "changed": True,
                "event": event.to_json(),
            },
            201,
        )

    async def remove_backend(self, request: web.Request) -> web.Response:
        svc = self._service(request)
        await self._no_body(request)
        backend_id = request.match_info["id"]
        backend = svc.runtime.backends.get(backend_id)
        event = await self._apply(svc, RemoveBackend(backend_id), request)
        assert backend is not None and event is not None  # else NotFound was raised
        removed = event.after is None
        return json_response(
            {
                "backend": backend_view(svc.runtime, backend),
                "removed": removed,
                "event": event.to_json(),
            },
            200 if removed else 202,
        )

    def _backend_action(self, action: str) -> Handler:
        commands: dict[str, Callable[[str], Command]] = {
            "drain": Drain,
            "disable": Disable,
            "enable": Enable,
        }
        command_type = commands[action]

        async def handle(request: web.Request) -> web.StreamResponse:
            svc = self._service(request)
            await self._no_body(request)
            backend_id = request.match_info["id"]
            event = await self._apply(svc, command_type(backend_id), request)
            backend = svc.runtime.backends[backend_id]
            return json_response(
                {
                    "backend": backend_view(svc.runtime, backend),
                    "changed": event is not None,
                    "event": event.to_json() if event is not None else None,
                }
            )

        return handle


async def _security_headers(request: web.Request, response: web.StreamResponse) -> None:
    path = request.path
    dashboard = path == "/" or path.startswith("/static/")
    response.headers.update(DASHBOARD_HEADERS if dashboard else API_HEADERS)


def _int_param(
    request: web.Request, name: str, default: int | None, low: int, high: int | None
) -> Any:
    raw = request.query.get(name)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ApiError(400, f"{name} must be an integer, got {raw!r}") from None
    if value < low or (high is not None and value > high):
        bounds = f"{low}-{high}" if high is not None else f">= {low}"
        raise ApiError(400, f"{name} must be {bounds}, got {value}")
    return value


# ---- views ------------------------------------------------------------------


def backend_view(runtime: Runtime, backend: Backend) -> dict[str, Any]:
    started = runtime.drain_started.get(backend.id)
    drain_started_at = None
    if started is not None:
        drain_started_at = iso_time(time.time() - (runtime.clock() - started))
    info = runtime.health_info.get(backend.id)
    return {
        "id": backend.id,
        "address": backend.address,
        "pool": backend.pool,
        "state": backend.state.value,
        "admin": backend.admin.value,
        "health": backend.health.value,
        "ejected": backend.ejected,
        # why it is out of rotation, one name per cause ([] when it takes traffic)
        "flags": flag_names(backend.flags),
        "in_flight": backend.in_flight,
        "weight": backend.weight,
        "effective_weight": runtime.effective_weight.get(backend.id, backend.weight),
        "removing": backend.id in runtime.removing,
        "added": backend.id in runtime.added,
        "drain_started_at": drain_started_at,
        "failures": backend.failures,
        "requests": sum(backend.codes.values()),
        "health_checks": dict(info) if info is not None else None,
    }


def state_view(
    runtime: Runtime,
    persistence: Persistence | None = None,
    rolling: RollingUpdates | None = None,
    shadow: ShadowControl | None = None,
    rollouts: RolloutController | None = None,
    figures: TrafficFigures | None = None,
) -> dict[str, Any]:
    pools: dict[str, Any] = {
        name: {"weight": weight, "usable": runtime.usable(name), "backends": []}
        for name, weight in runtime.pool_weights.items()
    }
    for backend in runtime.backends.values():
        # a pool a reload removed lists its backends until they have drained
        view = pools.setdefault(backend.pool, {"weight": 0, "usable": False, "backends": []})
        backend_json = backend_view(runtime, backend)
        if figures is not None:
            backend_json["traffic"] = figures.backend(backend.id)
        view["backends"].append(backend_json)
    if figures is not None:
        for name, view in pools.items():
            stats = runtime.pool_stats.get(name)
            view["traffic"] = {
                **figures.pool(name),
                "requests_total": stats.count if stats is not None else 0,
            }
    store = persistence.store if persistence is not None else None
    return {
        "pid": os.getpid(),
        "version": __version__,
        "build": build(),
        "generation": runtime.version,
        "pools": pools,
        "rolling": rolling.view()["updates"] if rolling is not None else [],
        "shadow": shadow.view() if shadow is not None else None,
        "rollout": _rollout_brief(rollouts),
        "persistence": {
            "path": store.path if isinstance(store, FileStore) else None,
            "last_error": persistence.last_error if persistence is not None else None,
        },
    }


def _rollout_brief(rollouts: RolloutController | None) -> dict[str, Any] | None:
    """The rollout in progress, in short, for the state view (None: none runs)."""
    if rollouts is None or rollouts.current is None or not rollouts.current.active:
        return None
    status = rollouts.status(rollouts.current)
    keys = ("id", "to", "from", "phase", "step", "steps", "step_weight", "waiting", "reason")
    return {key: status[key] for key in keys}


# ---- lifecycle --------------------------------------------------------------


class Reloading(Protocol):
    async def reload(self, actor: str) -> ReloadResult:
        """Re-read the config file and apply it (``reload.Reloader``)."""


class Upgrading(Protocol):
    #: a hot upgrade is in progress (changes are refused meanwhile)
    busy: bool

    async def upgrade(self, actor: str) -> UpgradeResult:
        """Hand over to a new process (``upgrade.Upgrader``)."""


class WorkerView(Protocol):
    def describe(self) -> list[dict[str, Any]]:
        """Each worker's pid and figures, for the state answer."""

    async def synced(self) -> None:
        """Wait until every worker has the latest change."""


class AdminHost(Protocol):
    """What the admin package reads of the process it serves, and nothing else:
    the composition root (``server.wire``) passes the server as this. The data
    path is seen only through ``data_path_closed`` and ``data_path_counts``."""

    @property
    def config(self) -> Config: ...

    #: each service's control parts (runtime, rolling updates, rollouts)
    @property
    def services(self) -> Mapping[str, Service]: ...

    @property
    def shadow(self) -> ShadowControl: ...

    @property
    def reloader(self) -> Reloading: ...

    @property
    def upgrader(self) -> Upgrading: ...

    #: ``workers`` > 1: the worker processes; None in a single process
    @property
    def workers(self) -> WorkerView | None: ...

    @property
    def data_path_closed(self) -> bool:
        """Not serving (yet, or any more): ``/healthz`` answers 503."""
        ...

    def data_path_counts(self) -> DataPathCounts:
        """Connection and retry counters of the data path, for the metrics."""
        ...


def _log_event(event: Event) -> None:
    log.info("%s", describe(event))


class ControlPlane:
    """The admin API and the persistence of the services' state. Built by the
    composition root, which also registers ``start``/``retire``/``stop`` (and the
    etcd ``cluster``'s hooks) with the server's lifecycle."""

    def __init__(self, host: AdminHost, tokens: list[Token]) -> None:
        self.host = host
        config = host.config
        state = config.state
        #: ``state.etcd``: this instance's link to the shared state
        self.cluster: Cluster | None = None
        if state.etcd is not None:
            try:
                self.cluster = Cluster(state.etcd)
            except EtcdSettingsError as exc:
                log.error("cannot start: %s", exc)
                raise SystemExit(1) from None
        path = state.path if state.etcd is None else None
        named = bool(config.services)
        self.services: dict[str, ServiceApi] = {}
        for name, service in host.services.items():
            # the process log shows every change too, one readable line each
            service.runtime.events.subscribe(_log_event)
            # the default service keeps state.path; another one a file of its own
            own = service_state_path(path, name) if path is not None and named else path
            self.services[name] = ServiceApi(
                name,
                service.runtime,
                Persistence(
                    service.runtime,
                    FileStore(own) if own is not None else None,
                    events_path(own) if own is not None else None,
                ),
                service.rolling,
                service.rollouts,
                (
                    self.cluster.add_service(name, service.runtime, service.rollouts)
                    if self.cluster is not None
                    else None
                ),
            )
        primary = self.services[primary_name(config)]
        self.persistence = primary.persistence
        upgrader = host.upgrader
        self.api = AdminApi(
            primary.runtime,
            self.persistence,
            Authenticator(tokens),
            max_body=config.admin.max_body_bytes,
            data_path=host.data_path_counts,
            closing=lambda: host.data_path_closed,
            frozen=self._frozen,
            rolling=primary.rolling,
            shadow=host.shadow,
            rollouts=primary.rollouts,
            reload=host.reloader.reload,
            services=self.services if named else None,
            upgrade=upgrader.upgrade,
        )
        if self.cluster is not None:
            self.api.registry.register(EtcdCollector(self.cluster.figures))
        if not named:
            # one service: the API's record of it is this one (with its shared state)
            only = next(iter(self.services.values()))
            self.api.primary = self.api.services[only.name] = only
        workers = host.workers
        if workers is not None:
            self.api.workers = workers.describe
            self.api.workers_synced = workers.synced
        self._runner: web.AppRunner | None = None
        self._sampler: asyncio.Task[None] | None = None

    @property
    def persistences(self) -> list[Persistence]:
        """Each service's persistence (a hot upgrade flushes and pauses them)."""
        return [svc.persistence for svc in self.services.values()]

    def restore(self, handed: Callable[[str], Mapping[str, Any] | None]) -> None:
        """Load each service's saved state (``handed(name)``: a hot upgrade's
        hand-over, None: the state file alone), then save every change."""
        for svc in self.services.values():
            svc.persistence.restore(handed(svc.name))
            svc.persistence.attach()

    def _frozen(self) -> str | None:
        """Why changes are refused now (None: they are not)."""
        if self.host.upgrader.busy:
            return "a hot upgrade is in progress: retry in a moment (the new process answers)"
        return None

    async def start(self, sock: socket.socket | None) -> None:
        """Serve the API on ``sock`` (listening; None: ``admin.enabled`` is off)."""
        _redact_aiohttp_parse_errors()
        loop = asyncio.get_running_loop()
        if sock is not None:
            # the figures are for the state API only: no listener, no reading
            self._sampler = loop.create_task(self._sample())
            runner = web.AppRunner(self.api.build_app(), access_log=None, shutdown_timeout=2.0)
            await runner.setup()
            await web.SockSite(runner, sock, shutdown_timeout=2.0).start()
            self._runner = runner
            log.info("admin API on http://%s/", self.host.config.admin.listen)

    async def retire(self) -> None:
        """A hot upgrade succeeded: new admin connections go to the new process
        (the listening socket stays open there), this one's requests finish."""
        if self._runner is not None:
            for site in list(self._runner.sites):
                await site.stop()

    async def stop(self) -> None:
        if self._sampler is not None:
            self._sampler.cancel()
            self._sampler = None
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        for svc in self.services.values():
            await svc.persistence.close()

    async def _sample(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                # the loop's clock: the one the data path stamps its statistics with
                self.api.read_figures(loop.time())
            except Exception:
                log.exception("reading the traffic figures failed")
            await asyncio.sleep(FIGURES_SECONDS)


def admin_tokens(admin: AdminConfig) -> list[Token]:
    """The admin tokens. Exits the process with status 1, after logging why, when
    the admin listener would be reachable from other hosts without a token or
    when a configured token cannot be read."""
    try:
        tokens = load_tokens(admin) if admin.enabled else []
    except TokenConfigError as exc:
        log.error("cannot start the admin API: %s", exc)
        raise SystemExit(1) from None
    if admin.enabled and not tokens:
        if not is_loopback(admin.listen.host):
            log.error(
                "refusing to start: the admin API would listen on %s, which is not a loopback "
                "address, without a token. Set the ZDPROXY_ADMIN_TOKEN environment variable "
                "(admin.token_env), admin.token_file or admin.tokens, or listen on 127.0.0.1",
                admin.listen,
            )
            raise SystemExit(1)
        log.warning(
            "no admin token configured: the admin API answers 401 to every call until one is "
            "set (ZDPROXY_ADMIN_TOKEN, admin.token_file or admin.tokens)"
        )
    return tokens


def build_control_plane(host: AdminHost) -> ControlPlane:
    """The control plane of ``host`` (before it starts); nothing is bound or read
    from disk yet (``ControlPlane.restore`` and ``start`` do that). Exits as
    ``admin_tokens`` says."""
    return ControlPlane(host, admin_tokens(host.config.admin))
