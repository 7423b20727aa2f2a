"""The OpenAPI 3.0 description of the admin API (``GET /api/v1/openapi.json``).

Written by hand next to the handlers, and checked against the running API by a
schemathesis test: every status an operation can answer is listed, and every
answer matches its schema.
"""

from __future__ import annotations

from typing import Any

from zdproxy.balancing.model import Admin, BackendState, Flag, Health

_ID_PATTERN = r"^[A-Za-z0-9_.:-]{1,128}$"


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _json(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _error(description: str) -> dict[str, Any]:
    return _json(_ref("Error"), description)


_AUTH_ERRORS = {
    "401": _error("No bearer token, or no token configured"),
    "403": _error("Wrong token, or a read token on a mutation"),
}

_MUTATION_ERRORS = {
    "400": _error("Invalid request body; nothing was changed"),
    **_AUTH_ERRORS,
    "404": _error("No such pool or backend"),
    "405": _error("Method not allowed on this path"),
    "409": _error("Refused in the current state; nothing was changed"),
    "413": _error("Request body larger than admin.max_body_bytes"),
    "503": _error("The change could not be saved to state.path; it was undone"),
}

_BACKEND_ID_PARAM = {
    "name": "id",
    "in": "path",
    "required": True,
    "description": "Backend id",
    "schema": {"type": "string", "pattern": _ID_PATTERN},
}

_EMPTY_BODY = {
    "required": False,
    "content": {
        "application/json": {
            "schema": {"type": "object", "additionalProperties": False, "properties": {}}
        }
    },
}

#: pool name -> percent of new traffic
_WEIGHTS: dict[str, Any] = {
    "type": "object",
    "minProperties": 1,
    "additionalProperties": {"type": "integer", "minimum": 0, "maximum": 100},
}

_SCHEMAS: dict[str, Any] = {
    "Error": {
        "type": "object",
        "required": ["error"],
        "properties": {"error": {"type": "string"}},
    },
    "Backend": {
        "type": "object",
        "required": ["id", "address", "pool", "state", "admin", "health", "in_flight", "weight"],
        "properties": {
            "id": {"type": "string"},
            "address": {"type": "string"},
            "pool": {"type": "string"},
            "state": {"type": "string", "enum": [s.value for s in BackendState]},
            "admin": {"type": "string", "enum": [a.value for a in Admin]},
            "health": {"type": "string", "enum": [h.value for h in Health]},
            "ejected": {"type": "boolean"},
            "flags": {
                "type": "array",
                "items": {"type": "string", "enum": [f.name.lower() for f in Flag if f.name]},
                "description": (
                    "why it is out of rotation, one name per cause (empty: it takes new requests)"
                ),
            },
            "in_flight": {"type": "integer"},
            "weight": {"type": "integer"},
            "effective_weight": {"type": "integer"},
            "removing": {"type": "boolean"},
            "added": {"type": "boolean", "description": "added through the API"},
            "drain_started_at": {"type": "string", "nullable": True},
            "failures": {"type": "integer", "description": "consecutive failures"},
            "requests": {"type": "integer", "description": "responses sent"},
            "health_checks": {
                "type": "object",
                "nullable": True,
                "description": (
                    "active health-check counters, when checks run: checked, health, "
                    "consecutive_passes, consecutive_failures, rise, fall, last_status, "
                    "last_error, last_check (Unix time), last_duration_ms, checks_total, "
                    "check_failures_total, ejected, ejections_total, ejected_until, "
                    "slow_start_percent"
                ),
            },
        },
    },
    "Pool": {
        "type": "object",
        "required": ["weight", "backends"],
        "properties": {
            "weight": {"type": "integer", "minimum": 0, "maximum": 100},
            "usable": {"type": "boolean", "description": "a backend takes new requests"},
            "backends": {"type": "array", "items": _ref("Backend")},
        },
    },
    "State": {
        "type": "object",
        "required": ["pid", "version", "pools", "rollout"],
        "properties": {
            "pid": {"type": "integer"},
            "version": {"type": "string"},
            "build": {
                "type": "string",
                "enum": ["compiled", "pure"],
                "description": "the hot modules built with mypyc, or all Python",
            },
            "generation": {"type": "integer", "description": "routing snapshot number"},
            "pools": {"type": "object", "additionalProperties": _ref("Pool")},
            "rollout": {"type": "object", "nullable": True},
            "service": {"type": "string", "description": "with several services: this one"},
            "services": {"type": "array", "items": {"type": "string"}},
            "persistence": {
                "type": "object",
                "properties": {
                    "path": {"type": "string", "nullable": True},
                    "last_error": {"type": "string", "nullable": True},
                    "etcd": {
                        "type": "object",
                        "description": "with state.etcd: the link to the shared state "
                        "(connected, error, instance, leader, revision, commits, conflicts)",
                    },
                },
            },
        },
    },
    "Event": {
        "type": "object",
        "required": ["id", "time", "actor", "action", "target", "before", "after"],
        "properties": {
            "id": {"type": "integer"},
            "time": {"type": "string"},
            "actor": {"type": "string"},
            "action": {"type": "string"},
            "target": {"type": "string"},
            "before": {"nullable": True},
            "after": {"nullable": True},
            "note": {"type": "string", "nullable": True},
            "service": {"type": "string", "description": "with several services"},
            "instance": {
                "type": "string",
                "description": "with state.etcd: the instance that made the change",
            },
        },
    },
    "WeightsResult": {
        "type": "object",
        "required": ["weights", "changed", "event"],
        "properties": {
            "weights": {"type": "object", "additionalProperties": {"type": "integer"}},
            "changed": {"type": "boolean"},
            "event": {"allOf": [_ref("Event")], "nullable": True},
        },
    },
    "BackendResult": {
        "type": "object",
        "required": ["backend", "changed", "event"],
        "properties": {
            "backend": _ref("Backend"),
            "changed": {"type": "boolean"},
            "event": {"allOf": [_ref("Event")], "nullable": True},
        },
    },
    "RemoveResult": {
        "type": "object",
        "required": ["backend", "removed", "event"],
        "properties": {
            "backend": _ref("Backend"),
            "removed": {"type": "boolean", "description": "gone already (else draining)"},
            "event": _ref("Event"),
        },
    },
}


#: live figures over the last seconds (``zdproxy.admin.figures``), in the state view
_RATES: dict[str, Any] = {
    "window_s": {"type": "number", "description": "seconds the figures cover (up to 10)"},
    "requests": {"type": "integer", "description": "responses in the window"},
    "errors": {"type": "integer", "description": "5xx and proxy-side failures in the window"},
    "requests_per_second": {"type": "number"},
    "error_rate": {"type": "number", "minimum": 0, "maximum": 1},
}
_SCHEMAS["BackendTraffic"] = {
    "type": "object",
    "required": list(_RATES),
    "properties": _RATES,
}
_SCHEMAS["PoolTraffic"] = {
    "type": "object",
    "required": [*_RATES, "p50_ms", "p99_ms", "requests_total"],
    "properties": {
        **_RATES,
        "p50_ms": {"type": "number", "nullable": True, "description": "null: no request"},
        "p99_ms": {"type": "number", "nullable": True, "description": "null: no request"},
        "requests_total": {"type": "integer", "description": "responses since the start"},
    },
}
_SCHEMAS["Backend"]["properties"]["traffic"] = _ref("BackendTraffic")
_SCHEMAS["Pool"]["properties"]["traffic"] = _ref("PoolTraffic")
_SCHEMAS["State"]["properties"]["token"] = {
    "type": "object",
    "description": "the token of this request: its name and role (read or write)",
    "required": ["name", "role"],
    "properties": {
        "name": {"type": "string"},
        "role": {"type": "string", "enum": ["read", "write"]},
    },
}


_SCHEMAS["RollingUpdate"] = {
    "type": "object",
    "required": ["id", "pool", "phase", "reason", "plan", "current", "backends", "done", "total"],
    "properties": {
        "id": {"type": "integer"},
        "pool": {"type": "string"},
        "phase": {"type": "string", "enum": ["running", "succeeded", "failed", "aborted"]},
        "reason": {"type": "string", "nullable": True, "description": "why it failed or stopped"},
        "actor": {"type": "string"},
        "plan": {"type": "object"},
        "started_at": {"type": "string"},
        "finished_at": {"type": "string", "nullable": True},
        "current": {
            "type": "array",
            "description": "the backends of the current batch, their step and figures",
            "items": {"type": "object"},
        },
        "waiting_for": {"type": "string", "nullable": True},
        "seconds_in_step": {"type": "number", "nullable": True},
        "batches": {"type": "integer"},
        "backends": {"type": "array", "items": {"type": "object"}},
        "done": {"type": "integer"},
        "total": {"type": "integer"},
        "counts": {"type": "object"},
    },
}
_SCHEMAS["RollingList"] = {
    "type": "object",
    "required": ["updates", "running"],
    "properties": {
        "updates": {"type": "array", "items": _ref("RollingUpdate")},
        "running": {"type": "integer"},
    },
}
_SCHEMAS["RollingResult"] = {
    "type": "object",
    "required": ["rolling"],
    "properties": {"rolling": _ref("RollingUpdate")},
}
_SCHEMAS["State"]["properties"]["rolling"] = {
    "type": "array",
    "items": _ref("RollingUpdate"),
    "description": "the latest rolling update of each pool",
}

_POOL_PARAM = {
    "name": "pool",
    "in": "path",
    "required": True,
    "description": "Pool name",
    "schema": {"type": "string"},
}

_ROLLING_PLAN = {
    "required": False,
    "content": {
        "application/json": {
            "schema": {
                "type": "object",
                "additionalProperties": False,
                "properties": {
                    "batch": {"type": "integer", "minimum": 1, "maximum": 1000},
                    "min_in_rotation": {"type": "integer", "minimum": 0, "maximum": 1000},
                    "wait_replaced": {"type": "boolean"},
                    "healthy_timeout": {"oneOf": [{"type": "string"}, {"type": "number"}]},
                    "replace_timeout": {
                        "oneOf": [{"type": "string"}, {"type": "number"}],
                        "nullable": True,
                    },
                },
            },
            "example": {"batch": 1, "min_in_rotation": 1, "healthy_timeout": "60s"},
        }
    },
}

_SCHEMAS["Rollout"] = {
    "type": "object",
    "required": ["id", "to", "from", "phase", "step", "weights", "plan", "verdicts", "kpis"],
    "properties": {
        "id": {"type": "integer"},
        "to": {"type": "string"},
        "from": {"type": "string"},
        "phase": {
            "type": "string",
            "enum": ["progressing", "paused", "succeeded", "rolled_back", "aborted"],
        },
        "result": {"type": "string", "nullable": True},
        "reason": {"type": "string", "nullable": True},
        "active": {"type": "boolean"},
        "step": {"type": "integer", "description": "current step, 1-based"},
        "steps": {"type": "integer"},
        "step_weight": {"type": "integer"},
        "step_applied": {"type": "boolean"},
        "step_pause_remaining": {"type": "number", "nullable": True},
        "weights": {"type": "object", "additionalProperties": {"type": "integer"}},
        "waiting": {"type": "string", "nullable": True},
        "last_verdict": {"type": "object", "nullable": True},
        "verdicts": {"type": "array", "items": {"type": "object"}},
        "kpis": {"type": "object"},
        "plan": {"type": "object"},
    },
}

_ROLLOUT_BODY = {
    "type": "object",
    "required": ["to", "steps"],
    "properties": {
        "to": {"type": "string"},
        "from": {"type": "string"},
        "steps": {
            "type": "array",
            "minItems": 1,
            "items": {
                "type": "object",
                "required": ["weight"],
                "additionalProperties": False,
                "properties": {
                    "weight": {"type": "integer", "minimum": 1, "maximum": 100},
                    "pause": {"description": "a duration: 30s, 500ms, or seconds"},
                },
            },
        },
        "analysis": {"type": "object"},
        "min_ready": {"type": "integer", "minimum": 1},
        "keep_warm": {"type": "boolean"},
        "enable_target": {"type": "boolean"},
        "webhooks": {"type": "object"},
    },
}


def _rolling_action(verb: str, summary: str, pool: bool) -> dict[str, Any]:
    operation: dict[str, Any] = {
        "operationId": f"{verb}Rolling" + ("OfPool" if pool else ""),
        "summary": summary,
        "responses": {
            "200": _json(_ref("RollingResult"), "The update now"),
            **_MUTATION_ERRORS,
        },
    }
    if pool:
        operation["parameters"] = [_POOL_PARAM]
        operation["requestBody"] = _EMPTY_BODY
    else:
        operation["requestBody"] = {
            "required": False,
            "content": {
                "application/json": {
                    "schema": {
                        "type": "object",
                        "additionalProperties": False,
                        "properties": {"pool": {"type": "string"}},
                    }
                }
            },
        }
    return {"post": operation}


def _rolling_paths() -> dict[str, Any]:
    next_text = "The current backend(s) were replaced (deploy tool): re-enable, wait healthy"
    abort_text = "Stop the update; backends stay as they are"
    return {
        "/api/v1/pools/{pool}/rolling": {
            "post": {
                "operationId": "startRolling",
                "summary": "Rolling update of one pool, backend by backend (or in batches)",
                "description": (
                    "Each backend in turn: drain, wait drained, wait for next (the deploy "
                    "tool replaced it), enable, wait for rise passing health checks and the "
                    "slow start. Never more than batch at once, never fewer than "
                    "min_in_rotation in rotation. One update per pool at a time (409)."
                ),
                "parameters": [_POOL_PARAM],
                "requestBody": _ROLLING_PLAN,
                "responses": {
                    "201": _json(_ref("RollingResult"), "Started"),
                    **_MUTATION_ERRORS,
                },
            },
            "get": {
                "operationId": "getRollingOfPool",
                "summary": "The pool's latest rolling update",
                "parameters": [_POOL_PARAM],
                "responses": {
                    "200": _json(_ref("RollingList"), "Its status"),
                    "404": _error("No such pool, or no update of it yet"),
                    **_AUTH_ERRORS,
                },
            },
        },
        "/api/v1/pools/{pool}/rolling/next": _rolling_action("next", next_text, True),
        "/api/v1/pools/{pool}/rolling/abort": _rolling_action("abort", abort_text, True),
        "/api/v1/rolling": {
            "get": {
                "operationId": "getRolling",
                "summary": "The latest rolling update of each pool",
                "responses": {"200": _json(_ref("RollingList"), "Their status"), **_AUTH_ERRORS},
            }
        },
        "/api/v1/rolling/next": _rolling_action("next", next_text, False),
        "/api/v1/rolling/abort": _rolling_action("abort", abort_text, False),
    }


_SHADOW_PROPERTIES: dict[str, Any] = {
    "pool": {"type": "string", "nullable": True},
    "percent": {"type": "number", "minimum": 0, "maximum": 100},
    "max_body_bytes": {"type": "integer", "minimum": 0},
    "compare_body": {"type": "boolean"},
    "header": {"type": "string"},
    "timeout": {"type": "number", "description": "seconds"},
    "max_concurrent": {"type": "integer", "minimum": 1},
}
_SHADOW_SETTINGS = {"type": "object", "properties": _SHADOW_PROPERTIES}
_SCHEMAS["Shadow"] = {
    "type": "object",
    "required": ["active", "settings", "figures"],
    "properties": {
        "active": {"type": "boolean"},
        "settings": _SHADOW_SETTINGS,
        "figures": {
            "type": "object",
            "description": (
                "sent, in_flight, results by kind (match, status_mismatch, body_mismatch, "
                "error, timeout, dropped, too_large, no_backend, skipped), compared, "
                "mismatch_rate, error_rate, live/shadow average latency and their ratio"
            ),
        },
    },
}
_SCHEMAS["ShadowResult"] = {
    "allOf": [_ref("Shadow")],
    "type": "object",
    "required": ["changed", "event"],
    "properties": {
        "changed": {"type": "boolean"},
        "event": {"allOf": [_ref("Event")], "nullable": True},
    },
}
_SCHEMAS["State"]["properties"]["shadow"] = {"allOf": [_ref("Shadow")], "nullable": True}


def _shadow_paths() -> dict[str, Any]:
    return {
        "/api/v1/shadow": {
            "get": {
                "operationId": "getShadow",
                "summary": "Shadow traffic settings and divergence figures",
                "responses": {"200": _json(_ref("Shadow"), "Settings and figures"), **_AUTH_ERRORS},
            },
            "put": {
                "operationId": "setShadow",
                "summary": "Copy a share of live requests to a pool (fire and forget)",
                "description": (
                    "pool and percent are required; the other keys default to the config "
                    "file's shadow section."
                ),
                "requestBody": {
                    "required": True,
                    "content": {
                        "application/json": {
                            "schema": {
                                "type": "object",
                                "required": ["pool", "percent"],
                                "additionalProperties": False,
                                "properties": {
                                    **_SHADOW_PROPERTIES,
                                    "pool": {"type": "string"},
                                    "timeout": {"oneOf": [{"type": "string"}, {"type": "number"}]},
                                },
                            },
                            "example": {"pool": "green", "percent": 20},
                        }
                    },
                },
                "responses": {"200": _json(_ref("ShadowResult"), "Applied"), **_MUTATION_ERRORS},
            },
            "delete": {
                "operationId": "clearShadow",
                "summary": "Stop shadow traffic",
                "responses": {"200": _json(_ref("ShadowResult"), "Stopped"), **_MUTATION_ERRORS},
            },
        }
    }


def _rollout_answer(description: str) -> dict[str, Any]:
    return _json(
        {
            "type": "object",
            "required": ["rollout"],
            "properties": {"rollout": _ref("Rollout"), "event": {"nullable": True}},
        },
        description,
    )


_SCHEMAS["ReloadResult"] = {
    "type": "object",
    "required": ["result", "changed", "changes", "diff", "restart_needed", "event", "saved"],
    "properties": {
        "result": {"type": "string", "enum": ["ok"]},
        "changed": {"type": "boolean"},
        "changes": {"type": "array", "items": {"type": "string"}},
        "diff": {"type": "object"},
        "restart_needed": {"type": "array", "items": {"type": "string"}},
        "event": {"type": "object"},
        "saved": {"type": "boolean"},
        "save_error": {"type": "string"},
    },
}
_SCHEMAS["ReloadRefused"] = {
    "type": "object",
    "required": ["error"],
    "properties": {
        "error": {"type": "string"},
        "problems": {"type": "array", "items": {"type": "string"}},
    },
}

_SCHEMAS["UpgradeResult"] = {
    "type": "object",
    "required": ["result", "pid", "previous_pid"],
    "properties": {
        "result": {"type": "string", "enum": ["ok"]},
        "pid": {"type": "integer", "description": "the new process, which serves now"},
        "previous_pid": {"type": "integer", "description": "this process, which drains"},
    },
}

_UPGRADE_PATH = {
    "post": {
        "operationId": "upgrade",
        "summary": "Hot upgrade, as SIGUSR2: a new process takes over the listening sockets "
        "and the state; answered once it serves (or failed)",
        "requestBody": _EMPTY_BODY,
        "responses": {
            "200": _json(_ref("UpgradeResult"), "The new process serves; this one drains"),
            **{k: v for k, v in _MUTATION_ERRORS.items() if k in ("400", "401", "403", "405")},
            "409": _error("Refused: an upgrade is already in progress, or shutting down"),
            **{k: v for k, v in _MUTATION_ERRORS.items() if k in ("413",)},
            "500": _json(
                _ref("ReloadRefused"),
                "The new process failed before it was ready (why, and the `zdproxy check` "
                "lines of an invalid config); this process serves on",
            ),
        },
    }
}

_RELOAD_PATH = {
    "post": {
        "operationId": "reload",
        "summary": "Re-read the config file and apply the difference in place, as SIGHUP",
        "requestBody": _EMPTY_BODY,
        "responses": {
            "200": _json(_ref("ReloadResult"), "Applied (what needs a restart is listed)"),
            "400": _json(
                _ref("ReloadRefused"),
                "Invalid file (the `zdproxy check` lines) or body; nothing was changed",
            ),
            **{k: v for k, v in _MUTATION_ERRORS.items() if k in ("401", "403", "405", "413")},
            "500": _json(_ref("ReloadRefused"), "Failed while applying (see the log)"),
        },
    }
}


def _rollout_action(verb: str, summary: str) -> dict[str, Any]:
    return {
        "post": {
            "operationId": f"{verb}Rollout",
            "summary": summary,
            "requestBody": _EMPTY_BODY,
            "responses": {
                "200": _rollout_answer("The rollout now"),
                **_MUTATION_ERRORS,
            },
        }
    }


def _backend_action(verb: str, summary: str) -> dict[str, Any]:
    return {
        "post": {
            "operationId": f"{verb}Backend",
            "summary": summary,
            "parameters": [_BACKEND_ID_PARAM],
            "requestBody": _EMPTY_BODY,
            "responses": {
                "200": _json(_ref("BackendResult"), "The backend now"),
                **_MUTATION_ERRORS,
            },
        }
    }


#: the per-service endpoints, mirrored under /api/v1/services/{svc}/
_SERVICE_PATHS = (
    "/api/v1/state",
    "/api/v1/events",
    "/api/v1/split",
    "/api/v1/flip",
    "/api/v1/backends",
    "/api/v1/backends/{id}",
    "/api/v1/backends/{id}/drain",
    "/api/v1/backends/{id}/disable",
    "/api/v1/backends/{id}/enable",
    "/api/v1/pools/{pool}/rolling",
    "/api/v1/pools/{pool}/rolling/next",
    "/api/v1/pools/{pool}/rolling/abort",
    "/api/v1/rolling",
    "/api/v1/rolling/next",
    "/api/v1/rolling/abort",
    "/api/v1/rollouts",
    "/api/v1/rollouts/current",
    "/api/v1/rollouts/current/pause",
    "/api/v1/rollouts/current/resume",
    "/api/v1/rollouts/current/promote",
    "/api/v1/rollouts/current/abort",
)

_SVC_PARAM = {
    "name": "svc",
    "in": "path",
    "required": True,
    "schema": {"type": "string"},
    "description": "a service name (`default`: the top-level pools)",
}

_SERVICES_PATH = {
    "get": {
        "operationId": "listServices",
        "summary": "The services, their pool weights and backend counts",
        "responses": {
            "200": _json(
                {
                    "type": "object",
                    "required": ["pid", "version", "default", "services"],
                    "properties": {
                        "pid": {"type": "integer"},
                        "version": {"type": "string"},
                        "default": {"type": "string", "nullable": True},
                        "services": {
                            "type": "array",
                            "items": {
                                "type": "object",
                                "properties": {
                                    "name": {"type": "string"},
                                    "weights": {
                                        "type": "object",
                                        "additionalProperties": {"type": "integer"},
                                    },
                                    "backends": {"type": "integer"},
                                    "generation": {"type": "integer"},
                                },
                            },
                        },
                    },
                },
                "The services",
            ),
            **_AUTH_ERRORS,
        },
    }
}


def _service_paths(paths: dict[str, Any]) -> dict[str, Any]:
    """Each service endpoint again under /api/v1/services/{svc}/ (404: no such service)."""
    out: dict[str, Any] = {"/api/v1/services": _SERVICES_PATH}
    for path in _SERVICE_PATHS:
        item: dict[str, Any] = {}
        for method, operation in paths[path].items():
            copied = dict(operation)
            copied["operationId"] = f"{operation['operationId']}OfService"
            copied["parameters"] = [_SVC_PARAM, *operation.get("parameters", ())]
            copied["responses"] = {"404": _error("No such service"), **operation["responses"]}
            item[method] = copied
        out["/api/v1/services/{svc}" + path.removeprefix("/api/v1")] = item
    return out


def build_spec(version: str) -> dict[str, Any]:
    spec = _build_spec(version)
    spec["paths"].update(_service_paths(spec["paths"]))
    return spec


def _build_spec(version: str) -> dict[str, Any]:
    return {
        "openapi": "3.0.3",
        "info": {
            "title": "zdproxy admin API",
            "version": version,
            "description": (
                "Runtime control of zdproxy: traffic split between pools, blue/green flips, "
                "backends. Every change is audited (GET /api/v1/events) and survives "
                'restarts. Errors are JSON {"error": "message"}.'
            ),
        },
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
            "schemas": _SCHEMAS,
        },
        "security": [{"bearer": []}],
        "paths": {
            "/healthz": {
                "get": {
                    "operationId": "healthz",
                    "summary": "200 while the proxy serves, 503 while it stops",
                    "security": [],
                    "responses": {
                        "200": _json(
                            {"type": "object", "properties": {"status": {"type": "string"}}},
                            "Serving",
                        ),
                        "503": _error("Stopping"),
                    },
                }
            },
            "/api/v1/state": {
                "get": {
                    "operationId": "getState",
                    "summary": "Pools, weights, backends and their states",
                    "responses": {"200": _json(_ref("State"), "Current state"), **_AUTH_ERRORS},
                }
            },
            "/api/v1/split": {
                "put": {
                    "operationId": "split",
                    "summary": "Set every pool's percent of new traffic at once",
                    "description": (
                        "Body: pool name -> percent; they sum to 100, pools left out get 0. "
                        "Refused with 409 when a pool with weight > 0 has no usable backend, "
                        'unless "force": true. Two forms: {"weights": {POOL: PCT, ...}, '
                        '"force": BOOL} (any pool names), or the flat {POOL: PCT, ..., '
                        '"force": BOOL}, where "force" is the flag unless a pool is named '
                        "force and the value is an integer."
                    ),
                    "requestBody": {
                        "required": True,
                        "content": {
                            "application/json": {
                                "schema": {
                                    "oneOf": [
                                        {
                                            "type": "object",
                                            "required": ["weights"],
                                            "additionalProperties": False,
                                            "properties": {
                                                "weights": _WEIGHTS,
                                                "force": {"type": "boolean"},
                                            },
                                        },
                                        {
                                            **_WEIGHTS,
                                            "properties": {"force": {"type": "boolean"}},
                                        },
                                    ]
                                },
                                "example": {"weights": {"blue": 90, "green": 10}},
                            }
                        },
                    },
                    "responses": {
                        "200": _json(_ref("WeightsResult"), "Applied"),
                        **_MUTATION_ERRORS,
                    },
                }
            },
            "/api/v1/flip": {
                "post": {
                    "operationId": "flip",
                    "summary": "All new traffic to one pool; the others finish what they have",
                    "requestBody": {
                        "required": True,
                        "content": {
                            "application/json": {
                                "schema": {
                                    "type": "object",
                                    "required": ["to"],
                                    "additionalProperties": False,
                                    "properties": {
                                        "to": {"type": "string"},
                                        "force": {"type": "boolean"},
                                    },
                                },
                                "example": {"to": "green"},
                            }
                        },
                    },
                    "responses": {
                        "200": _json(_ref("WeightsResult"), "Applied"),
                        **_MUTATION_ERRORS,
                    },
                }
            },
            "/api/v1/backends": {
                "post": {
                    "operationId": "addBackend",
                    "summary": "Add a backend; it takes traffic once healthy",
                    "requestBody": {
                        "required": True,
                        "content": {
                            "application/json": {
                                "schema": {
                                    "type": "object",
                                    "required": ["pool", "address"],
                                    "additionalProperties": False,
                                    "properties": {
                                        "pool": {"type": "string"},
                                        "address": {"type": "string"},
                                        "id": {"type": "string", "pattern": _ID_PATTERN},
                                        "weight": {
                                            "type": "integer",
                                            "minimum": 0,
                                            "maximum": 1000,
                                        },
                                    },
                                },
                                "example": {
                                    "pool": "green",
                                    "address": "127.0.0.1:9003",
                                    "id": "green-3",
                                },
                            }
                        },
                    },
                    "responses": {"201": _json(_ref("BackendResult"), "Added"), **_MUTATION_ERRORS},
                }
            },
            "/api/v1/backends/{id}": {
                "delete": {
                    "operationId": "removeBackend",
                    "summary": "Drain a backend, then remove it",
                    "parameters": [_BACKEND_ID_PARAM],
                    "responses": {
                        "200": _json(_ref("RemoveResult"), "Removed (nothing was in flight)"),
                        "202": _json(_ref("RemoveResult"), "Draining; removed when done"),
                        **_MUTATION_ERRORS,
                    },
                }
            },
            "/api/v1/backends/{id}/drain": _backend_action(
                "drain", "No new requests; in-flight ones finish (draining, then drained)"
            ),
            "/api/v1/backends/{id}/disable": _backend_action(
                "disable", "Out of rotation at once (maintenance)"
            ),
            "/api/v1/backends/{id}/enable": _backend_action(
                "enable", "Back into rotation, after health checks pass"
            ),
            **_rolling_paths(),
            **_shadow_paths(),
            "/api/v1/rollouts": {
                "post": {
                    "operationId": "startRollout",
                    "summary": "Start a progressive rollout to a pool (one at a time)",
                    "requestBody": {
                        "required": True,
                        "content": {
                            "application/json": {
                                "schema": _ROLLOUT_BODY,
                                "example": {
                                    "to": "green",
                                    "steps": [
                                        {"weight": 10, "pause": "30s"},
                                        {"weight": 50, "pause": "60s"},
                                        {"weight": 100},
                                    ],
                                    "analysis": {"interval": "5s", "min_requests": 50},
                                },
                            }
                        },
                    },
                    "responses": {"201": _rollout_answer("Started"), **_MUTATION_ERRORS},
                },
                "get": {
                    "operationId": "getRollouts",
                    "summary": "Rollout history (newest first) with KPIs and the success rate",
                    "responses": {
                        "200": _json(
                            {
                                "type": "object",
                                "required": ["rollouts", "success_rate"],
                                "properties": {
                                    "rollouts": {"type": "array", "items": {"type": "object"}},
                                    "finished": {"type": "integer"},
                                    "results": {"type": "object"},
                                    "success_rate": {"type": "number", "nullable": True},
                                },
                            },
                            "History",
                        ),
                        **_AUTH_ERRORS,
                    },
                },
            },
            "/api/v1/rollouts/current": {
                "get": {
                    "operationId": "getCurrentRollout",
                    "summary": "The rollout in progress, or the latest one",
                    "responses": {
                        "200": _rollout_answer("Its status, verdicts and figures"),
                        "404": _error("No rollout yet"),
                        **_AUTH_ERRORS,
                    },
                }
            },
            "/api/v1/reload": _RELOAD_PATH,
            "/api/v1/upgrade": _UPGRADE_PATH,
            "/api/v1/rollouts/current/pause": _rollout_action(
                "pause", "Hold the current step (analysis keeps judging)"
            ),
            "/api/v1/rollouts/current/resume": _rollout_action("resume", "Go on after a pause"),
            "/api/v1/rollouts/current/promote": _rollout_action(
                "promote", "Next step now (or success after the last one)"
            ),
            "/api/v1/rollouts/current/abort": _rollout_action(
                "abort", "Stop; all new traffic back to the baseline pool"
            ),
            "/api/v1/events": {
                "get": {
                    "operationId": "getEvents",
                    "summary": "Audit log of every change, oldest first",
                    "parameters": [
                        {
                            "name": "since",
                            "in": "query",
                            "description": "only events with a greater id",
                            "schema": {"type": "integer", "minimum": 0},
                        },
                        {
                            "name": "limit",
                            "in": "query",
                            "description": "at most this many (the newest)",
                            "schema": {"type": "integer", "minimum": 1, "maximum": 10000},
                        },
                    ],
                    "responses": {
                        "200": _json(
                            {
                                "type": "object",
                                "required": ["events"],
                                "properties": {"events": {"type": "array", "items": _ref("Event")}},
                            },
                            "Events",
                        ),
                        "400": _error("Invalid query parameter"),
                        **_AUTH_ERRORS,
                    },
                }
            },
            "/api/v1/openapi.json": {
                "get": {
                    "operationId": "getOpenApi",
                    "summary": "This document",
                    "responses": {"200": _json({"type": "object"}, "OpenAPI 3.0"), **_AUTH_ERRORS},
                }
            },
            "/metrics": {
                "get": {
                    "operationId": "getMetrics",
                    "summary": "Prometheus text exposition",
                    "responses": {
                        "200": {
                            "description": "Metrics",
                            "content": {"text/plain": {"schema": {"type": "string"}}},
                        },
                        **_AUTH_ERRORS,
                    },
                }
            },
            "/": {
                "get": {
                    "operationId": "dashboard",
                    "summary": "The dashboard page (asks for a token, then calls the API)",
                    "security": [],
                    "responses": {
                        "200": {
                            "description": "HTML",
                            "content": {"text/html": {"schema": {"type": "string"}}},
                        }
                    },
                }
            },
        },
    }
