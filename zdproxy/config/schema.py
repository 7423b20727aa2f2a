"""The configuration schema: frozen, typed value objects.

Every model forbids unknown keys, because a typo in a proxy config must never be
silently ignored. Durations are stored as float seconds, addresses as
``Address`` (host, port). The loader (``loader.py``) turns YAML into these and
maps validation errors back to file lines.
"""

from __future__ import annotations

import ipaddress
import math
import re
from collections.abc import Mapping, Sequence
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

# A location in the config: keys and list indexes from the root, like pydantic's ``loc``.
Loc = tuple[str | int, ...]

_DURATION_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*$")
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}


def parse_duration(value: Any) -> float:
    """``500ms``, ``2s``, ``1m``, ``1h`` or a plain number of seconds -> seconds."""
    if isinstance(value, bool):
        raise ValueError("expected a duration such as 500ms, 2s or 1m")
    if isinstance(value, int | float):
        if not math.isfinite(value):
            raise ValueError("a duration must be a finite number of seconds")
        if value < 0:
            raise ValueError("a duration cannot be negative")
        return float(value)
    if isinstance(value, str):
        match = _DURATION_RE.match(value)
        if match:
            return float(match.group(1)) * _UNIT_SECONDS[match.group(2)]
    raise ValueError(f"invalid duration {value!r}: use a number with a unit, like 500ms, 2s or 1m")


Duration = Annotated[float, BeforeValidator(parse_duration)]
PositiveDuration = Annotated[float, BeforeValidator(parse_duration), Field(gt=0)]
StatusCode = Annotated[int, Field(ge=100, le=599)]


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
    if not sep or not host or not (port.isascii() and port.isdigit()):
        raise ValueError(f"invalid address {value!r}: expected host:port")
    port_number = int(port)
    if not 0 < port_number < 65536:
        raise ValueError(f"invalid port {port_number} in {value!r}: must be 1-65535")
    if ":" in host:
        if not text.startswith("["):
            raise ValueError(f"invalid address {value!r}: write IPv6 hosts in brackets, [::1]:8080")
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(f"invalid IPv6 host in {value!r}") from None
    if any(c in host for c in " /\\@?#[]"):
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

    @field_validator("tokens")
    @classmethod
    def _unique_token_names(cls, value: tuple[AdminToken, ...]) -> tuple[AdminToken, ...]:
        names = [token.name for token in value]
        for name in names:
            if names.count(name) > 1:
                raise ValueError(f"duplicate token name {name!r}")
        return value


class EtcdConfig(_Model):
    endpoints: tuple[str, ...] = ("127.0.0.1:2379",)
    prefix: str = "/zdproxy/"


class StateConfig(_Model):
    path: str | None = "./zdproxy-state.json"
    etcd: EtcdConfig | None = None

    @model_validator(mode="after")
    def _one_store(self) -> StateConfig:
        if self.etcd is not None and "path" in self.model_fields_set and self.path is not None:
            raise ValueError("set either path or etcd, not both")
        return self


class HealthCheckConfig(_Model):
    """Active health checks. Set on the top level, per pool, or per backend
    (the nearer one wins for the keys it sets)."""

    enabled: bool = True
    path: str = "/healthz"
    host: str | None = None
    interval: PositiveDuration = 2.0
    jitter: float = Field(default=0.1, ge=0.0, le=1.0)
    timeout: PositiveDuration = 1.0
    rise: int = Field(default=2, ge=1)
    fall: int = Field(default=3, ge=1)
    expected_statuses: tuple[StatusCode, ...] = Field(default=(200, 204), min_length=1)

    @field_validator("path")
    @classmethod
    def _path_starts_with_slash(cls, value: str) -> str:
        return _check_health_path(value)


def _check_health_path(value: str) -> str:
    if not value.startswith("/"):
        raise ValueError(f"path must start with / (got {value!r})")
    return value


class HealthCheckOverride(_Model):
    """Per-pool or per-backend health-check keys; unset keys are inherited."""

    enabled: bool | None = None
    path: str | None = None
    host: str | None = None
    interval: PositiveDuration | None = None
    jitter: float | None = Field(default=None, ge=0.0, le=1.0)
    timeout: PositiveDuration | None = None
    rise: int | None = Field(default=None, ge=1)
    fall: int | None = Field(default=None, ge=1)
    expected_statuses: tuple[StatusCode, ...] | None = Field(default=None, min_length=1)

    @field_validator("path")
    @classmethod
    def _path_starts_with_slash(cls, value: str | None) -> str | None:
        return None if value is None else _check_health_path(value)


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
    # a file holding the key (wins over secret_env); neither: a generated key,
    # kept in the saved state and passed on by a hot upgrade
    secret_file: str | None = Field(default=None, min_length=1)
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
    #: a backend's response head (its 1xx heads included); over it: 502
    max_response_header_bytes: int = Field(default=65536, ge=1024)
    max_body_bytes: int = Field(default=0, ge=0)
    max_connections: int = Field(default=10000, ge=1)
    max_idle_upstream_per_backend: int = Field(default=64, ge=0)


_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
#: headers the proxy reads or rewrites itself: never a request-ID header
_OWN_HEADERS = frozenset(
    {
        "host",
        "connection",
        "keep-alive",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "content-length",
        "proxy-authorization",
        "upgrade",
        "x-forwarded-for",
        "x-forwarded-proto",
        "x-forwarded-host",
        "cookie",
        "expect",
        "idempotency-key",
        "sec-websocket-key",
    }
)


def _check_header_name(name: str) -> str:
    if not _TOKEN.fullmatch(name):
        raise ValueError(f"invalid header name {name!r}")
    if name.lower() in _OWN_HEADERS:
        raise ValueError(f"{name!r} is a header the proxy handles itself")
    return name


class RequestIdConfig(_Model):
    """``X-Request-Id``: kept when the client sent a valid one (trust_incoming), else
    generated; sent to the backend, returned to the client, written to the access log."""

    enabled: bool = True
    header: Annotated[str, AfterValidator(_check_header_name)] = "X-Request-Id"
    trust_incoming: bool = True


class HttpConfig(_Model):
    # strict: Ambiguous requests get 400; lenient: forwarded, then both connections closed
    strictness: Literal["strict", "lenient"] = "strict"
    trusted_proxies: tuple[str, ...] = ()
    pool_response_header: bool = True
    pool_response_header_name: str = "X-Zdproxy-Pool"
    request_id: RequestIdConfig = RequestIdConfig()

    @field_validator("trusted_proxies")
    @classmethod
    def _cidrs(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for item in value:
            try:
                ipaddress.ip_network(item, strict=False)
            except ValueError as exc:
                raise ValueError(f"invalid network {item!r}") from exc
        return value


class ShadowConfig(_Model):
    """Copies of a share of live requests to a pool that takes no live traffic."""

    #: the pool that gets the copies; None: no shadow traffic
    pool: str | None = None
    #: share of live requests copied, in percent (two decimals count)
    percent: float = Field(default=0.0, ge=0, le=100)
    #: requests with a larger body are not copied
    max_body_bytes: int = Field(default=65536, ge=0, le=16 * 1024 * 1024)
    #: compare a hash of the shadow's response body with the live one's
    compare_body: bool = False
    #: the header that marks a copy (value ``1``)
    header: str = Field(default="X-Zdproxy-Shadow", pattern=r"^[A-Za-z0-9!#$%&'*+.^_`|~-]+$")
    timeout: PositiveDuration = 5.0
    #: copies in flight at most; more are dropped, never queued
    max_concurrent: int = Field(default=64, ge=1, le=10000)


_TRUE_WORDS = frozenset({"true", "yes", "on", "1"})
_FALSE_WORDS = frozenset({"false", "no", "0"})


def _access_log_format(value: Any) -> Any:
    """A boolean (as other switches accept it) means combined (true) or off."""
    if isinstance(value, bool):
        return "combined" if value else "off"
    if isinstance(value, str):
        word = value.lower()
        if word in _TRUE_WORDS:
            return "combined"
        if word in _FALSE_WORDS:
            return "off"
    return value


class LogConfig(_Model):
    level: Literal["debug", "info", "warning", "error"] = "info"
    format: Literal["text", "json"] = "text"
    #: off | combined | json; true means combined, false off
    access_log: Annotated[
        Literal["off", "combined", "json"], BeforeValidator(_access_log_format)
    ] = "off"
    #: a file, opened for append; None: stderr
    access_log_path: str | None = Field(default=None, min_length=1)


def _one_or_many(value: Any) -> Any:
    return [value] if isinstance(value, str) else value


def _check_pool_name(name: str) -> str:
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
        raise ValueError(f"invalid pool name {name!r}: use letters, digits, _ . -")
    return name


# ``listen`` takes one address or a list; ``pools`` maps a name to a pool. Named so that
# the loader can validate these sections on their own for its cross-field checks.
Listeners = Annotated[tuple[HostPort, ...], BeforeValidator(_one_or_many), Field(min_length=1)]
PoolName = Annotated[str, AfterValidator(_check_pool_name)]
Pools = Annotated[dict[PoolName, PoolConfig], Field(min_length=1)]


# The pydantic error type of ``Config``'s cross-field check.
CROSS_FIELD_ERROR = "zdproxy_cross_field"


def _dotted(loc: Loc) -> str:
    return ".".join(str(part) for part in loc)


def check_listeners(listen: Sequence[Address], admin: AdminConfig | None) -> list[tuple[Loc, str]]:
    """Cross-field problems of the listeners: (location, message) pairs.

    Data listeners are unique and do not overlap, and the admin listener (if given
    and enabled) overlaps none of them. Two addresses overlap when one could not be
    bound while the other is: the same port on the same address, or on a wildcard
    that covers the other (``0.0.0.0`` covers every IPv4 address, ``[::]`` every
    address, as Linux binds it dual-stack).
    """
    problems: list[tuple[Loc, str]] = []
    for index, address in enumerate(listen):
        for earlier in range(index):
            other = listen[earlier]
            where = _dotted(("listen", earlier))
            if other == address:
                message = f"duplicate listen address {address} (also at {where})"
            elif addresses_overlap(address, other):
                message = f"{address} overlaps {other} (at {where}): {_why(address, other)}"
            else:
                continue
            problems.append((("listen", index), message))
            break
    if admin is not None and admin.enabled:
        for index, address in enumerate(listen):
            where = _dotted(("listen", index))
            if admin.listen == address:
                message = f"{admin.listen} is also a data listener (at {where})"
            elif addresses_overlap(admin.listen, address):
                message = (
                    f"{admin.listen} overlaps the data listener {address} (at {where}): "
                    f"{_why(admin.listen, address)}"
                )
            else:
                continue
            problems.append((("admin", "listen"), message))
            break
    return problems


def _ip(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        return None  # a host name: zdproxy binds it as IPv4


def _is_wildcard(address: Address) -> bool:
    ip = _ip(address.host)
    return ip is not None and ip.is_unspecified


def addresses_overlap(a: Address, b: Address) -> bool:
    """Whether binding ``a`` and ``b`` at once fails (see ``check_listeners``)."""
    if a.port != b.port:
        return False
    if a.host == b.host:
        return True
    ip_a, ip_b = _ip(a.host), _ip(b.host)
    v6_a = ip_a is not None and ip_a.version == 6
    v6_b = ip_b is not None and ip_b.version == 6
    for wildcard, wild_v6, other_v6 in ((ip_a, v6_a, v6_b), (ip_b, v6_b, v6_a)):
        if wildcard is not None and wildcard.is_unspecified and (wild_v6 or not other_v6):
            return True
    return ip_a is not None and ip_a == ip_b  # spelled differently, e.g. [::1] and [0::1]


def _why(a: Address, b: Address) -> str:
    wildcard = a if _is_wildcard(a) else b if _is_wildcard(b) else None
    if wildcard is None:
        return "the same address"
    return f"{wildcard} takes port {wildcard.port} on every address, so both cannot be bound"


def check_pools(pools: Mapping[str, PoolConfig]) -> list[tuple[Loc, str]]:
    """Cross-field problems of the pools: (location, message) pairs, in file order."""
    weights = {name: pool.weight for name, pool in pools.items()}
    return check_pool_weights(weights) + check_pool_backends(pools)


def check_shadow(shadow_pool: Any, pools: Mapping[str, Any]) -> list[tuple[Loc, str]]:
    if shadow_pool is None or not isinstance(shadow_pool, str) or shadow_pool in pools:
        return []
    known = ", ".join(pools)
    return [(("shadow", "pool"), f"no pool named {shadow_pool!r} (pools: {known})")]


def check_pool_weights(weights: Mapping[str, int]) -> list[tuple[Loc, str]]:
    """Pool weights sum to 100."""
    total = sum(weights.values())
    if total == 100:
        return []
    split = ", ".join(f"{name}={weight}" for name, weight in weights.items())
    return [(("pools",), f"pool weights must sum to 100, got {total} ({split})")]


def check_pool_backends(pools: Mapping[str, PoolConfig]) -> list[tuple[Loc, str]]:
    """A pool that takes traffic has a backend that can take it; backend ids (explicit
    or default ``<pool>-<n>``) are unique across pools; addresses are unique in a pool.
    """
    problems: list[tuple[Loc, str]] = []
    ids: dict[str, Loc] = {}
    for name, pool in pools.items():
        if pool.weight > 0 and not pool.backends:
            message = f"pool {name!r} has weight {pool.weight} but no backends"
            problems.append((("pools", name, "weight"), message))
        elif pool.weight > 0 and all(backend.weight == 0 for backend in pool.backends):
            message = f"pool {name!r} has weight {pool.weight} but all its backends have weight 0"
            problems.append((("pools", name, "backends"), message))
        addresses: dict[Address, Loc] = {}
        for index, backend in enumerate(pool.backends):
            loc: Loc = ("pools", name, "backends", index)
            backend_id = backend.id or f"{name}-{index + 1}"
            if backend_id in ids:
                where = _dotted(ids[backend_id])
                if backend.id is None:
                    message = f"default id {backend_id!r} is already used by {where}; set an id"
                    problems.append((loc, message))
                else:
                    problems.append(
                        ((*loc, "id"), f"duplicate backend id {backend_id!r} (also at {where})")
                    )
            else:
                ids[backend_id] = loc
            if backend.address in addresses:
                where = _dotted(addresses[backend.address])
                message = f"duplicate address {backend.address} in pool {name!r} (also at {where})"
                problems.append(((*loc, "address"), message))
            else:
                addresses[backend.address] = loc
    return problems


class Config(_Model):
    listen: Listeners
    admin: AdminConfig = AdminConfig()
    state: StateConfig = StateConfig()
    pools: Pools
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
    shadow: ShadowConfig = ShadowConfig()
    shutdown_timeout: Duration = 30.0

    def backend_ids(self) -> list[tuple[str, str, BackendConfig]]:
        """(pool, id, backend) in file order, with default ids ``<pool>-<n>`` filled in."""
        out = []
        for pool_name, pool in self.pools.items():
            for n, backend in enumerate(pool.backends, start=1):
                out.append((pool_name, backend.id or f"{pool_name}-{n}", backend))
        return out

    @model_validator(mode="after")
    def _cross_field_checks(self) -> Config:
        # One error for all of them, at the root: the loader runs the same checks on
        # the sections and reports each problem at its own key and line instead.
        problems = check_listeners(self.listen, self.admin) + check_pools(self.pools)
        problems += check_shadow(self.shadow.pool, self.pools)
        if problems:
            text = "; ".join(f"{_dotted(loc)}: {message}" for loc, message in problems)
            raise PydanticCustomError(CROSS_FIELD_ERROR, "{problems}", {"problems": text})
        return self
