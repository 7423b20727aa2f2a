"""The OpenAPI 3.0 description of the admin API (``GET /api/v1/openapi.json``).

Written by hand next to the handlers, and checked against the running API by a
schemathesis test: every status an operation can answer is listed, and every
answer matches its schema.
"""

from __future__ import annotations

from typing import Any

from zdproxy.balancing.model import Admin, BackendState, Health

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
                "description": "active health-check counters, when checks run",
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
            "generation": {"type": "integer", "description": "routing snapshot number"},
            "pools": {"type": "object", "additionalProperties": _ref("Pool")},
            "rollout": {"type": "object", "nullable": True},
            "persistence": {
                "type": "object",
                "properties": {
                    "path": {"type": "string", "nullable": True},
                    "last_error": {"type": "string", "nullable": True},
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


def build_spec(version: str) -> dict[str, Any]:
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
                        'unless "force": true.'
                    ),
                    "requestBody": {
                        "required": True,
                        "content": {
                            "application/json": {
                                "schema": {
                                    "type": "object",
                                    "properties": {"force": {"type": "boolean"}},
                                    "additionalProperties": {
                                        "type": "integer",
                                        "minimum": 0,
                                        "maximum": 100,
                                    },
                                },
                                "example": {"blue": 90, "green": 10},
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
