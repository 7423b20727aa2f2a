"""The configuration schema: frozen, typed value objects.

Every model forbids unknown keys, because a typo in a proxy config must never be
silently ignored. Durations are stored as float seconds, addresses as
``Address`` (host, port). The loader (``loader.py``) turns YAML into these and
maps validation errors back to file lines.
"""

from __future__ import annotations

import ipaddress
import re
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    field_validator,
    model_validator,
)

_DURATION_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*$")
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}


def parse_duration(value: Any) -> float:
    """``500ms``, ``2s``, ``1m``, ``1h`` or a plain number of seconds -> seconds."""
    if isinstance(value, bool):
        raise ValueError("expected a duration such as 500ms, 2s or 1m")
    if isinstance(value, int | float):
        if value < 0:
            raise ValueError("a duration cannot be negative")
        return float(value)
    if isinstance(value, str):
        match = _DURATION_RE.match(value)
        if match:
            return float(match.group(1)) * _UNIT_SECONDS[match.group(2)]
    raise ValueError(f"invalid duration {value!r}: use a number with a unit, like 500ms, 2s or 1m")


Duration = Annotated[float, BeforeValidator(parse_duration)]


class Address(BaseModel):
    """``host:port``; IPv6 hosts in brackets (``[::1]:8080``)."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def parse_address(value: Any) -> Any:
    if isinstance(value, Address | dict):
        return value
    if not isinstance(value, str):
        raise ValueError("expected an address as a string host:port")
    text = value.strip()
    if text.startswith("["):
        host, sep, port = text[1:].partition("]:")
    else:
        host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ValueError(f"invalid address {value!r}: expected host:port")
    port_number = int(port)
    if not 0 < port_number < 65536:
        raise ValueError(f"invalid port {port_number} in {value!r}: must be 1-65535")
    if any(c in host for c in " /\\@?#"):
        raise ValueError(f"invalid host in {value!r}")
    return {"host": host, "port": port_number}


HostPort = Annotated[Address, BeforeValidator(parse_address)]


class _Model(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class AdminToken(_Model):
    """A named admin token: its secret comes from an environment variable or a file."""

    name: str = Field(min_length=1)
    role: Literal["read", "write"] = "write"
    env: str | None = None
    file: str | None = None

    @model_validator(mode="after")
    def _one_source(self) -> AdminToken:
        if (self.env is None) == (self.file is None):
            raise ValueError("a token needs exactly one of env or file")
        return self


class AdminConfig(_Model):
    listen: HostPort = Field(default_factory=lambda: Address(host="127.0.0.1", port=9901))
    enabled: bool = True
    token_env: str | None = "ZDPROXY_ADMIN_TOKEN"
    token_file: str | None = None
    tokens: tuple[AdminToken, ...] = ()
    max_body_bytes: int = Field(default=65536, gt=0)
    events_ring: int = Field(default=1000, gt=0)


class EtcdConfig(_Model):
    endpoints: tuple[str, ...] = ("127.0.0.1:2379",)
    prefix: str = "/zdproxy/"


class StateConfig(_Model):
    path: str | None = "./zdproxy-state.json"
    etcd: EtcdConfig | None = None


class HealthCheckConfig(_Model):
    """Active health checks. Set on the top level, per pool, or per backend
    (the nearer one wins for the keys it sets)."""

    enabled: bool = True
    path: str = "/healthz"
    host: str | None = None
    interval: Duration = 2.0
    jitter: float = Field(default=0.1, ge=0.0, le=1.0)
    timeout: Duration = 1.0
    rise: int = Field(default=2, ge=1)
    fall: int = Field(default=3, ge=1)
    expected_statuses: tuple[int, ...] = (200, 204)

    @field_validator("path")
    @classmethod
    def _path_starts_with_slash(cls, value: str) -> str:
        if not value.startswith("/"):
            raise ValueError("path must start with /")
        return value


class HealthCheckOverride(_Model):
    """Per-pool or per-backend health-check keys; unset keys are inherited."""

    enabled: bool | None = None
    path: str | None = None
    host: str | None = None
    interval: Duration | None = None
    jitter: float | None = Field(default=None, ge=0.0, le=1.0)
    timeout: Duration | None = None
    rise: int | None = Field(default=None, ge=1)
    fall: int | None = Field(default=None, ge=1)
    expected_statuses: tuple[int, ...] | None = None


class BackendConfig(_Model):
    id: str | None = Field(default=None, min_length=1, pattern=r"^[A-Za-z0-9_.:-]+$")
    address: HostPort
    weight: int = Field(default=1, ge=0, le=1000)
    health_check: HealthCheckOverride | None = None


class PoolConfig(_Model):
    weight: int = Field(default=0, ge=0, le=100)
    backends: tuple[BackendConfig, ...] = ()
    health_check: HealthCheckOverride | None = None


class OutlierConfig(_Model):
    """Passive health: eject a backend after consecutive failures (Envoy-style)."""

    enabled: bool = True
    consecutive_5xx: int = Field(default=5, ge=1)
    consecutive_connect_failures: int = Field(default=3, ge=1)
    base_ejection_time: Duration = 10.0
    max_ejection_time: Duration = 300.0
    max_ejection_percent: int = Field(default=50, ge=0, le=100)


class SlowStartConfig(_Model):
    window: Duration = 0.0


class StickyConfig(_Model):
    mode: Literal["off", "pool", "backend", "hash"] = "off"
    cookie: str = Field(default="zd_affinity", pattern=r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")
    max_age: Duration = 3600.0
    secret_env: str | None = None
    # when mode is hash: "client_ip" or "header:NAME"
    hash_on: str = "client_ip"
    # when a pinned pool's weight goes to zero: move at once, or after draining.timeout
    on_pool_zero: Literal["move", "drain_timeout"] = "move"

    @field_validator("hash_on")
    @classmethod
    def _hash_on(cls, value: str) -> str:
        if value != "client_ip" and not (value.startswith("header:") and len(value) > 7):
            raise ValueError("hash_on must be client_ip or header:NAME")
        return value


class OverrideConfig(_Model):
    enabled: bool = True
    name: str = Field(min_length=1, pattern=r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")


class RoutingConfig(_Model):
    header: OverrideConfig = OverrideConfig(name="X-Zdproxy-Pool")
    cookie: OverrideConfig = OverrideConfig(name="zd_pool")


class DrainingConfig(_Model):
    timeout: Duration = 30.0
    # whether affinity-bound clients may keep reaching a draining backend until the timeout
    sticky_until_timeout: bool = False


class RetriesConfig(_Model):
    attempts: int = Field(default=2, ge=0, le=10)
    budget_percent: float = Field(default=20.0, ge=0.0, le=100.0)
    buffer_body_bytes: int = Field(default=65536, ge=0)


class TimeoutsConfig(_Model):
    connect: Duration = 2.0
    request_header: Duration = 10.0
    request_body: Duration = 30.0
    upstream_response: Duration = 30.0
    idle: Duration = 60.0
    upstream_idle: Duration = 30.0
    tunnel_idle: Duration = 300.0


class LimitsConfig(_Model):
    max_header_bytes: int = Field(default=65536, ge=1024)
    max_headers: int = Field(default=100, ge=1)
    max_body_bytes: int = Field(default=0, ge=0)
    max_connections: int = Field(default=10000, ge=1)
    max_idle_upstream_per_backend: int = Field(default=64, ge=0)


class HttpConfig(_Model):
    # strict: Ambiguous requests get 400; lenient: forwarded, then both connections closed
    strictness: Literal["strict", "lenient"] = "strict"
    trusted_proxies: tuple[str, ...] = ()
    pool_response_header: bool = True
    pool_response_header_name: str = "X-Zdproxy-Pool"

    @field_validator("trusted_proxies")
    @classmethod
    def _cidrs(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for item in value:
            try:
                ipaddress.ip_network(item, strict=False)
            except ValueError as exc:
                raise ValueError(f"invalid network {item!r}") from exc
        return value


class LogConfig(_Model):
    level: Literal["debug", "info", "warning", "error"] = "info"
    format: Literal["text", "json"] = "text"
    access_log: bool = False


class Config(_Model):
    listen: tuple[HostPort, ...] = Field(min_length=1)
    admin: AdminConfig = AdminConfig()
    state: StateConfig = StateConfig()
    pools: dict[str, PoolConfig] = Field(min_length=1)
    health_check: HealthCheckConfig = HealthCheckConfig()
    outlier_detection: OutlierConfig = OutlierConfig()
    slow_start: SlowStartConfig = SlowStartConfig()
    sticky: StickyConfig = StickyConfig()
    routing: RoutingConfig = RoutingConfig()
    draining: DrainingConfig = DrainingConfig()
    retries: RetriesConfig = RetriesConfig()
    timeouts: TimeoutsConfig = TimeoutsConfig()
    limits: LimitsConfig = LimitsConfig()
    http: HttpConfig = HttpConfig()
    log: LogConfig = LogConfig()
    shutdown_timeout: Duration = 30.0

    @field_validator("listen", mode="before")
    @classmethod
    def _listen_list(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value

    @field_validator("pools")
    @classmethod
    def _pool_names(cls, value: dict[str, PoolConfig]) -> dict[str, PoolConfig]:
        for name in value:
            if not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
                raise ValueError(f"invalid pool name {name!r}: use letters, digits, _ . -")
        return value

    @model_validator(mode="after")
    def _weights_sum_to_100(self) -> Config:
        total = sum(pool.weight for pool in self.pools.values())
        if total != 100:
            raise ValueError(f"pool weights must sum to 100, got {total}")
        return self

    def backend_ids(self) -> list[tuple[str, str, BackendConfig]]:
        """(pool, id, backend) in file order, with default ids ``<pool>-<n>`` filled in."""
        out = []
        for pool_name, pool in self.pools.items():
            for n, backend in enumerate(pool.backends, start=1):
                out.append((pool_name, backend.id or f"{pool_name}-{n}", backend))
        return out

    @model_validator(mode="after")
    def _unique_backend_ids(self) -> Config:
        seen: set[str] = set()
        for _pool, backend_id, _backend in self.backend_ids():
            if backend_id in seen:
                raise ValueError(f"duplicate backend id {backend_id!r}")
            seen.add(backend_id)
        return self
