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
from typing import Annotated, Any, ClassVar, Literal, TypeVar

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainValidator,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from zdproxy.config.tlsfiles import check_ca_file, check_cert_file, check_key_file, check_pair

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
Port = Annotated[int, Field(ge=1, le=65535)]


class Address(BaseModel):
    """``host:port``; IPv6 hosts in brackets (``[::1]:8080``)."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    host: str
    """host name or IP address (IPv6 without brackets here)"""
    port: int
    """TCP port"""

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
    # The string under a field is its description: docs/configuration.md is generated
    # from them (python -m zdproxy.docgen reads this file; nothing is done at run time).
    model_config = ConfigDict(frozen=True, extra="forbid")


# Certificate, key and CA files are read when the config is validated: a missing or
# bad file is a ``zdproxy check`` error at its key, and refuses a reload.
CertPath = Annotated[str, Field(min_length=1), AfterValidator(check_cert_file)]
KeyPath = Annotated[str, Field(min_length=1), AfterValidator(check_key_file)]
CaPath = Annotated[str, Field(min_length=1), AfterValidator(check_ca_file)]


class CertificateConfig(_Model):
    """One certificate (chain, PEM) and its private key (PEM, unencrypted)."""

    cert: CertPath
    """certificate chain, PEM, leaf first; serves the DNS names of its subjectAltName"""
    key: KeyPath
    """private key of `cert`, PEM, unencrypted"""

    @model_validator(mode="after")
    def _key_matches(self) -> CertificateConfig:
        check_pair(self.cert, self.key)
        return self


def _tls_version(value: Any) -> Any:
    # YAML reads ``min_version: 1.2`` as a number
    return f"{value:g}" if isinstance(value, float) else value


class ListenerTls(_Model):
    """TLS on a data listener: ``cert`` and ``key``, or ``certificates`` (several,
    chosen by the name the client asks for (SNI); the first is the default)."""

    cert: CertPath | None = None
    """certificate chain, PEM, leaf first; with `key`, instead of `certificates`"""
    key: KeyPath | None = None
    """private key of `cert`, PEM, unencrypted"""
    certificates: tuple[CertificateConfig, ...] = ()
    """several certificates instead of `cert` and `key`, chosen by the name the client
    asks for (SNI); the first serves clients without SNI or with an unknown name"""
    min_version: Annotated[Literal["1.2", "1.3"], BeforeValidator(_tls_version)] = "1.2"
    """oldest TLS version accepted (1.0 and 1.1 are always refused)"""

    @model_validator(mode="after")
    def _one_form(self) -> ListenerTls:
        if self.certificates:
            if self.cert is not None or self.key is not None:
                raise ValueError("give either cert and key, or certificates, not both")
        elif self.cert is None or self.key is None:
            raise ValueError("needs cert and key (or a list of certificates)")
        else:
            check_pair(self.cert, self.key)
        return self

    def pairs(self) -> tuple[CertificateConfig, ...]:
        """Every certificate, the default first."""
        if self.certificates:
            return self.certificates
        assert self.cert is not None and self.key is not None
        return (CertificateConfig.model_construct(cert=self.cert, key=self.key),)


_TRUE_WORDS = frozenset({"true", "yes", "on"})
_FALSE_WORDS = frozenset({"false", "no", "off"})


def _redirect_https(value: Any) -> bool | int:
    """``true``/``false`` (the words boolean keys take) or a port: one message for a
    bad value instead of one per member of ``bool | int``."""
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and 1 <= value <= 65535:
        return value
    if isinstance(value, str) and value.strip().lower() in _TRUE_WORDS | _FALSE_WORDS:
        return value.strip().lower() in _TRUE_WORDS
    raise ValueError(f"expected true, false or a port 1-65535, got {value!r}")


class Listener(Address):
    """A data listener: ``host:port``, or a mapping ``{address: host:port, tls: ...}``
    (HTTPS), or ``{address: host:port, redirect_https: true}`` (a plain listener
    that answers every request with a 308 to the same URL in https). An
    ``Address`` itself, so that code binding sockets needs nothing more."""

    #: the keys of the mapping form, for "unknown key" messages (host and port are
    #: written together as ``address``)
    FILE_KEYS: ClassVar[tuple[str, ...]] = ("address", "tls", "redirect_https")

    tls: ListenerTls | None = None
    """HTTPS on this listener ([TLS](tls.md)); `null`: plain HTTP"""
    redirect_https: Annotated[bool | Port, PlainValidator(_redirect_https)] = False
    """a plain listener that answers every request with a 308 to the same URL in
    https: `true` to the port of the first TLS listener, a number to that port (443 is
    left out of the URL); not on a TLS listener"""

    @model_validator(mode="before")
    @classmethod
    def _from_entry(cls, value: Any) -> Any:
        if isinstance(value, str):
            return parse_address(value)
        if isinstance(value, dict) and "host" not in value:
            entry = dict(value)
            if "address" not in entry:
                raise ValueError("missing required key address (host:port)")
            for key in ("host", "port"):
                if key in entry:
                    raise ValueError(f"unknown key {key}: the address is address: host:port")
            try:
                parsed = parse_address(entry.pop("address"))
            except ValueError as exc:
                raise ValueError(f"address: {exc}") from None
            if not isinstance(parsed, dict):
                raise ValueError("address: expected host:port")
            return {**parsed, **entry}
        return value

    @model_validator(mode="after")
    def _tls_or_redirect(self) -> Listener:
        if self.tls is not None and self.redirect_https is not False:
            raise ValueError("a TLS listener cannot also redirect to https")
        return self


class AdminToken(_Model):
    """A named admin token: its secret comes from an environment variable or a file."""

    name: str = Field(min_length=1)
    """token name, unique"""
    role: Literal["read", "write"] = "write"
    """`read` tokens may only read"""
    env: str | None = None
    """environment variable holding the token's secret; exactly one of `env` and `file`"""
    file: str | None = None
    """file holding the token's secret; exactly one of `env` and `file`"""

    @model_validator(mode="after")
    def _one_source(self) -> AdminToken:
        if (self.env is None) == (self.file is None):
            raise ValueError("a token needs exactly one of env or file")
        return self


class AdminConfig(_Model):
    listen: HostPort = Field(default_factory=lambda: Address(host="127.0.0.1", port=9901))
    """admin API and dashboard listener; must not be a data listener"""
    enabled: bool = True
    """`false`: no admin listener"""
    token_env: str | None = "ZDPROXY_ADMIN_TOKEN"
    """environment variable holding the bearer token"""
    token_file: str | None = None
    """file holding the bearer token (alternative to `token_env`); a path"""
    tokens: tuple[AdminToken, ...] = ()
    """more named tokens; the name is the actor in the audit log"""
    max_body_bytes: int = Field(default=65536, gt=0)
    """largest accepted API request body, bytes"""
    events_ring: int = Field(default=1000, gt=0)
    """audit events kept in memory"""

    @field_validator("tokens")
    @classmethod
    def _unique_token_names(cls, value: tuple[AdminToken, ...]) -> tuple[AdminToken, ...]:
        names = [token.name for token in value]
        for name in names:
            if names.count(name) > 1:
                raise ValueError(f"duplicate token name {name!r}")
        return value


_ETCD_ENDPOINT_RE = re.compile(r"^(?:(https?)://)?([A-Za-z0-9.-]+|\[[0-9A-Fa-f:.]+\]):(\d{1,5})/?$")
_ETCD_PREFIX_RE = re.compile(r"^/[A-Za-z0-9_.:/-]*/$")


def _check_etcd_endpoint(value: str) -> str:
    match = _ETCD_ENDPOINT_RE.match(value)
    if match is None or not 1 <= int(match.group(3)) <= 65535:
        raise ValueError(
            f"invalid etcd endpoint {value!r}: use host:port or http(s)://host:port "
            "(etcd's client URL, e.g. 127.0.0.1:2379)"
        )
    return value.rstrip("/")


EtcdEndpoint = Annotated[str, AfterValidator(_check_etcd_endpoint)]


class EtcdTls(_Model):
    """TLS to etcd (its client URLs are https): the CA that signs etcd's
    certificate, and a client certificate when etcd asks for one."""

    ca: CaPath | None = None
    """PEM file of the CA that signs etcd's server certificate; `null`: the system's CAs"""
    cert: CertPath | None = None
    """client certificate (PEM) for etcd's `--client-cert-auth`; with `key`"""
    key: KeyPath | None = None
    """private key of `cert`, PEM, unencrypted"""

    @model_validator(mode="after")
    def _pair(self) -> EtcdTls:
        if (self.cert is None) != (self.key is None):
            raise ValueError("give both cert and key, or neither")
        if self.cert is not None and self.key is not None:
            check_pair(self.cert, self.key)
        return self


class EtcdAuth(_Model):
    """etcd's user/password authentication (``etcdctl auth enable``)."""

    username: str = Field(min_length=1)
    """etcd user name"""
    password_env: str | None = "ZDPROXY_ETCD_PASSWORD"
    """environment variable holding the password"""
    password_file: str | None = None
    """file holding the password (instead of `password_env`); a path"""


class EtcdConfig(_Model):
    """Shared state in etcd: every instance with the same `endpoints` and `prefix`
    follows the same weights, backends, drains and rollout (see docs/etcd.md)."""

    endpoints: tuple[EtcdEndpoint, ...] = ("127.0.0.1:2379",)
    """etcd client URLs (`host:port` or `http(s)://host:port`), tried in turn"""
    prefix: str = "/zdproxy/"
    """key prefix for this deployment's state; starts and ends with `/`; instances that share
    it share their state"""
    tls: EtcdTls | None = None
    """TLS to etcd (https endpoints); `null`: plain HTTP unless an endpoint says https"""
    auth: EtcdAuth | None = None
    """etcd user and password; `null`: no authentication"""
    lease_ttl: int = Field(default=3, ge=2, le=60)
    """seconds an instance's leases (rollout leadership, published traffic counters)
    outlive it: another instance takes over a rollout within about this time"""
    timeout: PositiveDuration = 2.0
    """time limit of one etcd call; past it the endpoint counts as down"""

    @field_validator("endpoints")
    @classmethod
    def _some_endpoint(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        if not value:
            raise ValueError("needs at least one etcd endpoint")
        return value

    @field_validator("prefix")
    @classmethod
    def _prefix_shape(cls, value: str) -> str:
        if not _ETCD_PREFIX_RE.match(value):
            raise ValueError(
                f"invalid etcd prefix {value!r}: it must start and end with / and use only "
                "letters, digits and _ . : - / (e.g. /zdproxy/shop/)"
            )
        return value


class StateConfig(_Model):
    path: str | None = "./zdproxy-state.json"
    """JSON file that keeps weights, drains and the rollout across restarts; `null`: memory only"""
    etcd: EtcdConfig | None = None
    """keep state in etcd instead, shared by several instances (set `path` or `etcd`, not both);
    see docs/etcd.md"""

    @model_validator(mode="after")
    def _one_store(self) -> StateConfig:
        if self.etcd is not None and "path" in self.model_fields_set and self.path is not None:
            raise ValueError("set either path or etcd, not both")
        return self


class HealthCheckConfig(_Model):
    """Active health checks. Set on the top level, per pool, or per backend
    (the nearer one wins for the keys it sets)."""

    enabled: bool = True
    """run active checks"""
    path: str = "/healthz"
    """path to GET; must start with `/`"""
    host: str | None = None
    """Host header to send; `null`: the backend's address"""
    interval: PositiveDuration = 2.0
    """time between checks"""
    jitter: float = Field(default=0.1, ge=0.0, le=1.0)
    """each interval varies by up to this fraction, to spread checks"""
    timeout: PositiveDuration = 1.0
    """a check not answered in time fails"""
    rise: int = Field(default=2, ge=1)
    """consecutive passes before a backend takes traffic"""
    fall: int = Field(default=3, ge=1)
    """consecutive failures before it is taken out"""
    expected_statuses: tuple[StatusCode, ...] = Field(default=(200, 204), min_length=1)
    """statuses that count as a pass"""

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
    """run active checks; unset: inherited"""
    path: str | None = None
    """path to GET; must start with `/`; unset: inherited"""
    host: str | None = None
    """Host header to send; `null`: the backend's address; unset: inherited"""
    interval: PositiveDuration | None = None
    """time between checks; unset: inherited"""
    jitter: float | None = Field(default=None, ge=0.0, le=1.0)
    """each interval varies by up to this fraction, to spread checks; unset: inherited"""
    timeout: PositiveDuration | None = None
    """a check not answered in time fails; unset: inherited"""
    rise: int | None = Field(default=None, ge=1)
    """consecutive passes before a backend takes traffic; unset: inherited"""
    fall: int | None = Field(default=None, ge=1)
    """consecutive failures before it is taken out; unset: inherited"""
    expected_statuses: tuple[StatusCode, ...] | None = Field(default=None, min_length=1)
    """statuses that count as a pass; unset: inherited"""

    @field_validator("path")
    @classmethod
    def _path_starts_with_slash(cls, value: str | None) -> str | None:
        return None if value is None else _check_health_path(value)


class UpstreamTls(_Model):
    """TLS to the backends of a pool (or one backend): proxied requests and health
    checks. ``verify`` checks the backend's certificate against ``ca`` (the system's
    CAs without it) and the name ``server_name`` (default: the backend's host),
    which is also sent as SNI."""

    ca: CaPath | None = None
    """PEM file of the CA(s) that sign the backends' certificates; `null`: the system's CAs;
    re-read on every reload"""
    verify: bool = True
    """check the backend's certificate chain and name; `false`: encrypt without any check"""
    server_name: str | None = Field(default=None, min_length=1)
    """the name checked in the backend's certificate and sent as SNI; `null`: the
    backend's host"""


class BackendConfig(_Model):
    id: str | None = Field(default=None, min_length=1, pattern=r"^[A-Za-z0-9_.:-]+$")
    """unique across all pools; letters, digits, `_ . : -`; unset: `<pool>-<n>` (n from 1)"""
    address: HostPort
    """unique within the pool"""
    weight: int = Field(default=1, ge=0, le=1000)
    """relative share inside the pool"""
    health_check: HealthCheckOverride | None = None
    """health-check overrides for this backend"""
    tls: UpstreamTls | None = None
    """TLS to this backend; replaces the pool's `tls`"""


class PoolConfig(_Model):
    weight: int = Field(default=0, ge=0, le=100)
    """percent of new traffic; **all pool weights sum to 100**"""
    backends: tuple[BackendConfig, ...] = ()
    """the pool's backends; a pool with weight > 0 needs a backend with weight > 0"""
    health_check: HealthCheckOverride | None = None
    """health-check overrides for this pool"""
    tls: UpstreamTls | None = None
    """TLS to this pool's backends (proxied requests and health checks)"""


class OutlierConfig(_Model):
    """Passive health: eject a backend after consecutive failures (Envoy-style)."""

    enabled: bool = True
    """eject backends that fail real requests"""
    consecutive_5xx: int = Field(default=5, ge=1)
    """5xx responses in a row that eject a backend"""
    consecutive_connect_failures: int = Field(default=3, ge=1)
    """failed connects in a row that eject a backend"""
    base_ejection_time: Duration = 10.0
    """length of the first ejection; repeated ones last longer"""
    max_ejection_time: Duration = 300.0
    """cap on an ejection's length"""
    max_ejection_percent: int = Field(default=50, ge=0, le=100)
    """never eject more than this percent of a pool"""


class SlowStartConfig(_Model):
    window: Duration = 0.0
    """a backend that comes up ramps its share over this window; `0`: at once"""


class StickyConfig(_Model):
    mode: Literal["off", "pool", "backend", "hash"] = "off"
    """`pool`: a client stays on the pool it first got; `backend`: on the same backend too; `hash`:
    backend chosen by hashing `hash_on`"""
    cookie: str = Field(default="zd_affinity", pattern=r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")
    """affinity cookie name"""
    max_age: Duration = 3600.0
    """affinity cookie lifetime"""
    secret_env: str | None = None
    """environment variable with the key that signs the cookie"""
    secret_file: str | None = Field(default=None, min_length=1)
    """a file holding the key that signs the cookie (wins over `secret_env`); neither:
    a generated key, kept in the saved state and passed on by a hot upgrade"""
    hash_on: str = "client_ip"
    """what `mode: hash` hashes; `client_ip` or `header:NAME`"""
    on_pool_zero: Literal["move", "drain_timeout"] = "move"
    """when a pinned pool's weight drops to 0: move its clients at once, or after
    `draining.timeout`"""

    @field_validator("hash_on")
    @classmethod
    def _hash_on(cls, value: str) -> str:
        if value != "client_ip" and not (value.startswith("header:") and len(value) > 7):
            raise ValueError("hash_on must be client_ip or header:NAME")
        return value


class OverrideConfig(_Model):
    enabled: bool = True
    """honour the pool-forcing request header (`routing.header`) or cookie (`routing.cookie`)"""
    name: str = Field(min_length=1, pattern=r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")
    """the header's (or cookie's) name"""


class RoutingConfig(_Model):
    header: OverrideConfig = OverrideConfig(name="X-Zdproxy-Pool")
    """the request header that forces a pool"""
    cookie: OverrideConfig = OverrideConfig(name="zd_pool")
    """the cookie that forces a pool"""


class DrainingConfig(_Model):
    timeout: Duration = 30.0
    """how long a draining backend's in-flight requests get"""
    sticky_until_timeout: bool = False
    """affinity-bound clients may keep reaching a draining backend until the timeout"""


class RetriesConfig(_Model):
    attempts: int = Field(default=2, ge=0, le=10)
    """extra attempts on another backend; `0`: none"""
    budget_percent: float = Field(default=20.0, ge=0.0, le=100.0)
    """retries are at most this percent of requests"""
    buffer_body_bytes: int = Field(default=65536, ge=0)
    """request bodies up to this size are kept so they can be retried"""


class TimeoutsConfig(_Model):
    connect: Duration = 2.0
    """connecting to a backend"""
    request_header: Duration = 10.0
    """client sending the request line and headers (else 408)"""
    request_body: Duration = 30.0
    """client sending the body"""
    upstream_response: Duration = 30.0
    """backend starting to answer (else 504)"""
    idle: Duration = 60.0
    """idle client keep-alive connection"""
    upstream_idle: Duration = 30.0
    """idle pooled backend connection"""
    tunnel_idle: Duration = 300.0
    """`Upgrade` (WebSocket) tunnel with no bytes either way (either side's traffic renews it)"""


class LimitsConfig(_Model):
    max_header_bytes: int = Field(default=65536, ge=1024)
    """request line plus headers, bytes (else 431)"""
    max_headers: int = Field(default=100, ge=1)
    """number of request headers (else 431)"""
    max_response_header_bytes: int = Field(default=65536, ge=1024)
    """a backend's response head, bytes, its 1xx interim heads included (else 502)"""
    max_body_bytes: int = Field(default=0, ge=0)
    """request body, bytes; `0`: unlimited (else 413)"""
    max_connections: int = Field(default=10000, ge=1)
    """open client connections (idle keep-alive ones make room at the limit; capped by the open-file
    limit, see [Limits](http.md#limits))"""
    max_idle_upstream_per_backend: int = Field(default=64, ge=0)
    """idle pooled connections kept per backend; more, up to the most requests in flight
    to it in the last 10 s, after a larger burst (the next one then does not
    reconnect); 0: no pooling"""


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
    """keep or make a request ID per request ([details](operations.md#request-ids))"""
    header: Annotated[str, AfterValidator(_check_header_name)] = "X-Request-Id"
    """its header (not one the proxy handles itself, such as `Host`)"""
    trust_incoming: bool = True
    """keep a valid ID the client sent; `false`: always make a new one"""


class HttpConfig(_Model):
    strictness: Literal["strict", "lenient"] = "strict"
    """`strict`: requests rated Ambiguous or Severe get 400; `lenient`: Ambiguous ones are
    forwarded, then both connections closed"""
    trusted_proxies: tuple[str, ...] = ()
    """peers whose `X-Forwarded-*` headers are trusted; a list of CIDRs"""
    pool_response_header: bool = True
    """add the pool name to every proxied response"""
    pool_response_header_name: str = "X-Zdproxy-Pool"
    """that header's name"""
    request_id: RequestIdConfig = RequestIdConfig()
    """request IDs ([details](operations.md#request-ids))"""

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

    pool: str | None = None
    """the pool that gets the copies; it should take no live traffic (weight 0); a pool name"""
    percent: float = Field(default=0.0, ge=0, le=100)
    """share of live requests copied (two decimals count)"""
    max_body_bytes: int = Field(default=65536, ge=0, le=16 * 1024 * 1024)
    """requests with a larger body are not copied; at most 16 MiB"""
    compare_body: bool = False
    """compare a CRC-32 of the copy's response body with the live one's"""
    header: str = Field(default="X-Zdproxy-Shadow", pattern=r"^[A-Za-z0-9!#$%&'*+.^_`|~-]+$")
    """marks every copy (value `1`)"""
    timeout: PositiveDuration = 5.0
    """a copy's own timeout, connect to last byte"""
    max_concurrent: int = Field(default=64, ge=1, le=10000)
    """copies in flight at most; more are dropped, never queued"""


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
    """log level"""
    format: Literal["text", "json"] = "text"
    """log format (`--log-format` overrides it)"""
    access_log: Annotated[
        Literal["off", "combined", "json"], BeforeValidator(_access_log_format)
    ] = "off"
    """one line per request ([format](operations.md#access-log-and-request-ids)); `true` means
    `combined`, `false` `off`"""
    access_log_path: str | None = Field(default=None, min_length=1)
    """file the access log is appended to; a path; `null`: stderr"""


def _one_or_many(value: Any) -> Any:
    return [value] if isinstance(value, str) else value


def _check_pool_name(name: str) -> str:
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
        raise ValueError(f"invalid pool name {name!r}: use letters, digits, _ . -")
    return name


# ``listen`` takes one address or a list; ``pools`` maps a name to a pool. Named so that
# the loader can validate these sections on their own for its cross-field checks.
Listeners = Annotated[tuple[Listener, ...], BeforeValidator(_one_or_many), Field(min_length=1)]
PoolName = Annotated[str, AfterValidator(_check_pool_name)]
Pools = Annotated[dict[PoolName, PoolConfig], Field(min_length=1)]
ServiceName = Annotated[str, AfterValidator(_check_pool_name)]
_M = TypeVar("_M", bound=BaseModel)


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
            if _same(other, address):
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
            if _same(admin.listen, address):
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


def _same(a: Address, b: Address) -> bool:
    # a Listener (with TLS settings) and an Address are the same place when the
    # host and port are
    return (a.host, a.port) == (b.host, b.port)


def check_redirects(listen: Sequence[Listener]) -> list[tuple[Loc, str]]:
    """A ``redirect_https: true`` listener needs a TLS listener to send clients to."""
    if any(listener.tls is not None for listener in listen):
        return []
    return [
        (("listen", index, "redirect_https"), "no TLS listener to redirect to: give a port")
        for index, listener in enumerate(listen)
        if listener.redirect_https is True
    ]


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


_HOSTNAME = re.compile(
    r"^(\*\.)?([a-z0-9_]([a-z0-9_-]*[a-z0-9_])?\.)*[a-z0-9_]([a-z0-9_-]*[a-z0-9_])?$"
)
_METHOD = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")
#: the name of the service a config without ``services`` is (its top-level ``pools``)
DEFAULT_SERVICE = "default"


class RouteMatch(_Model):
    """What a route matches; every key set must match (see ``zdproxy.http.routes``)."""

    host: str | None = None
    """`shop.example.com`, or `*.example.com` (any deeper name too); case-insensitive,
    the request's port and a trailing dot ignored; `null`: any host"""
    path_prefix: str | None = None
    """the path starts with it (plain byte prefix: write `/api/` for the directory);
    the longest wins"""
    path_exact: str | None = None
    """the path (the target up to `?`, not percent-decoded) equals it"""
    path_regex: str | None = None
    """a regular expression searched in the path (anchor it with `^`); tried before
    prefixes, in file order; at most one of the three path keys"""
    methods: tuple[str, ...] | None = Field(default=None, min_length=1)
    """request methods (`GET`, `POST`, ...); `null`: any"""
    headers: dict[str, str] = {}
    """header name -> exact value; every one must be present with that value"""

    @field_validator("host")
    @classmethod
    def _host(cls, value: str | None) -> str | None:
        if value is None:
            return None
        host = value.strip().lower().rstrip(".")
        if not _HOSTNAME.match(host):
            raise ValueError(
                f"invalid host {value!r}: a name such as shop.example.com, or *.example.com "
                "(no port, no scheme; * only as the whole first label)"
            )
        return host

    @field_validator("path_prefix", "path_exact")
    @classmethod
    def _path(cls, value: str | None) -> str | None:
        if value is not None and (not value.startswith("/") or not value.isascii()):
            raise ValueError(f"a path starts with / and is ASCII (got {value!r})")
        return value

    @field_validator("path_regex")
    @classmethod
    def _regex(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                re.compile(value.encode("latin-1"))
            except (re.error, UnicodeEncodeError) as exc:
                raise ValueError(f"invalid regular expression {value!r}: {exc}") from None
        return value

    @field_validator("methods")
    @classmethod
    def _methods(cls, value: tuple[str, ...] | None) -> tuple[str, ...] | None:
        if value is None:
            return None
        for method in value:
            if not _METHOD.match(method):
                raise ValueError(f"invalid method {method!r}")
        return tuple(m.upper() for m in value)

    @field_validator("headers")
    @classmethod
    def _headers(cls, value: dict[str, str]) -> dict[str, str]:
        for name, text in value.items():
            _check_header_name(name)
            if not text.isascii() or any(ord(c) < 32 or ord(c) == 127 for c in text):
                raise ValueError(f"header {name}: the value must be printable ASCII")
        return value

    @model_validator(mode="after")
    def _one_path(self) -> RouteMatch:
        paths = [k for k in ("path_prefix", "path_exact", "path_regex") if getattr(self, k)]
        if len(paths) > 1:
            raise ValueError(f"set at most one of path_prefix, path_exact, path_regex ({paths})")
        return self


class RouteConfig(_Model):
    match: RouteMatch = RouteMatch()
    """what the request must match; every key set must match (none: every request)"""
    service: str = Field(min_length=1)
    """the service it goes to: a name under `services`, or `default` for the top-level
    `pools`"""
    strip_prefix: bool = False
    """`true`: remove `match.path_prefix` from the target forwarded to the backend (the
    query stays; an empty rest becomes `/`)"""

    @model_validator(mode="after")
    def _strip_needs_prefix(self) -> RouteConfig:
        if self.strip_prefix and self.match.path_prefix is None:
            raise ValueError("strip_prefix needs match.path_prefix")
        return self


class ServiceConfig(_Model):
    """One application: its pools, and the settings that differ from the top level
    (each key set here overrides the top-level one; unset keys are inherited)."""

    pools: Pools
    """the service's pools, as the top-level `pools` (weights sum to 100); default
    backend ids are `<service>-<pool>-<n>`"""
    health_check: HealthCheckOverride | None = None
    """keys set here override the top-level `health_check` (pool and backend
    overrides apply on top)"""
    outlier_detection: OutlierConfig | None = None
    """keys set here override the top-level `outlier_detection`"""
    slow_start: SlowStartConfig | None = None
    """keys set here override the top-level `slow_start`"""
    sticky: StickyConfig | None = None
    """keys set here override the top-level `sticky`: only `mode`, `max_age` and
    `on_pool_zero`; `hash` mode, the cookie, the signing key and `hash_on` are set for
    every service at once, in the top-level `sticky`"""
    draining: DrainingConfig | None = None
    """keys set here override the top-level `draining`"""


#: sticky keys that are the same for every service (one cookie, one key per process)
PROCESS_WIDE_STICKY = ("cookie", "secret_env", "secret_file", "hash_on")


def _merged(base: _M, override: BaseModel | None) -> _M:
    """``base`` with the keys ``override`` sets explicitly."""
    if override is None:
        return base
    update = {key: getattr(override, key) for key in override.model_fields_set}
    update = {key: value for key, value in update.items() if value is not None}
    return base.model_copy(update=update) if update else base


def check_services(
    pools: Mapping[str, PoolConfig],
    services: Mapping[str, ServiceConfig],
    routes: Sequence[RouteConfig],
    default_service: str | None,
    sticky: StickyConfig,
) -> list[tuple[Loc, str]]:
    """Cross-field problems of services and routes."""
    problems: list[tuple[Loc, str]] = []
    if pools and DEFAULT_SERVICE in services:
        message = "top-level pools are the service 'default': name this service otherwise"
        problems.append((("services", DEFAULT_SERVICE), message))
    names = ([DEFAULT_SERVICE] if pools else []) + list(services)
    known = ", ".join(names)
    for index, route in enumerate(routes):
        if route.service not in names:
            message = f"no service named {route.service!r} (services: {known})"
            problems.append((("routes", index, "service"), message))
    if default_service is not None and default_service not in names:
        message = f"no service named {default_service!r} (services: {known})"
        problems.append((("default_service",), message))
    ids: dict[str, Loc] = {}
    for pool, backend_id, _ in _backend_ids(pools):
        ids.setdefault(backend_id, ("pools", pool))
    for name, service in services.items():
        for loc, message in check_pools(service.pools):
            problems.append((("services", name, *loc), message))
        for pool, backend_id, _ in _backend_ids(service.pools, f"{name}-"):
            if backend_id in ids:
                where = _dotted(ids[backend_id])
                message = f"backend id {backend_id!r} is also used by {where}"
                problems.append((("services", name, "pools", pool), message))
            ids.setdefault(backend_id, ("services", name, "pools", pool))
        override = service.sticky
        if override is not None:
            for key in PROCESS_WIDE_STICKY:
                if key in override.model_fields_set:
                    message = "is the same for every service: set it in the top-level sticky"
                    problems.append((("services", name, "sticky", key), message))
            if "mode" in override.model_fields_set and (override.mode == "hash") != (
                sticky.mode == "hash"
            ):
                message = "mode hash is set for every service at once, in the top-level sticky"
                problems.append((("services", name, "sticky", "mode"), message))
    return problems


def _backend_ids(
    pools: Mapping[str, PoolConfig], prefix: str = ""
) -> list[tuple[str, str, BackendConfig]]:
    """(pool, id, backend); a default id is ``<prefix><pool>-<n>``."""
    out = []
    for pool_name, pool in pools.items():
        for n, backend in enumerate(pool.backends, start=1):
            out.append((pool_name, backend.id or f"{prefix}{pool_name}-{n}", backend))
    return out


class Config(_Model):
    listen: Listeners
    """data listeners, one per entry; no duplicates"""
    admin: AdminConfig = AdminConfig()
    """admin API and dashboard"""
    state: StateConfig = StateConfig()
    """where runtime state is kept"""
    pools: dict[PoolName, PoolConfig] = {}
    """pools of backends; names use letters, digits, `_ . -`; required unless
    `services` is set (then they are the service `default`)"""
    health_check: HealthCheckConfig = HealthCheckConfig()
    """active health checks"""
    outlier_detection: OutlierConfig = OutlierConfig()
    """passive health checks"""
    slow_start: SlowStartConfig = SlowStartConfig()
    """ramp-up of backends that come up"""
    sticky: StickyConfig = StickyConfig()
    """session affinity"""
    routing: RoutingConfig = RoutingConfig()
    """header / cookie overrides that force a pool"""
    draining: DrainingConfig = DrainingConfig()
    """how backends drain"""
    retries: RetriesConfig = RetriesConfig()
    """retries on another backend"""
    timeouts: TimeoutsConfig = TimeoutsConfig()
    """client and upstream timeouts"""
    limits: LimitsConfig = LimitsConfig()
    """size and count limits"""
    http: HttpConfig = HttpConfig()
    """HTTP handling"""
    log: LogConfig = LogConfig()
    """logging"""
    shadow: ShadowConfig = ShadowConfig()
    """copies of a share of live requests to a pool
    ([Shadow traffic](rollouts.md#shadow-traffic))"""
    shutdown_timeout: Duration = 30.0
    """on SIGTERM/SIGINT, how long in-flight requests get to finish"""
    workers: Annotated[int, Field(ge=1, le=256)] | Literal["auto"] = 1
    """data-path worker processes: `auto` = usable cores; 1 = one process, as before
    (see docs/workers.md)"""
    services: dict[ServiceName, ServiceConfig] = {}
    """several applications behind one listener, each with its own pools
    ([services](services.md))"""
    routes: tuple[RouteConfig, ...] = ()
    """ordered routes from host and path to a service
    ([precedence](services.md#precedence))"""
    default_service: str | None = None
    """the service a request no route matches goes to; unset: 404 `no-route`"""

    def worker_count(self) -> int:
        """``workers`` as a number (``auto``: the cores this process may run on)."""
        if self.workers == "auto":
            import os

            return max(1, len(os.sched_getaffinity(0)))
        return self.workers

    def backend_ids(self) -> list[tuple[str, str, BackendConfig]]:
        """(pool, id, backend) in file order, with default ids ``<pool>-<n>`` filled in."""
        return _backend_ids(self.pools)

    def service_names(self) -> list[str]:
        """The services, in file order: ``default`` (the top-level pools) first."""
        if not self.services:
            return [DEFAULT_SERVICE]
        return ([DEFAULT_SERVICE] if self.pools else []) + list(self.services)

    def service_config(self, name: str) -> Config:
        """The config one service's control plane runs on: its pools and its
        settings over the top-level ones. Without ``services``: this config."""
        if not self.services:
            return self
        plain: dict[str, Any] = {"services": {}, "routes": (), "default_service": None}
        if name == DEFAULT_SERVICE and self.pools:
            return self.model_copy(update=plain)
        service = self.services[name]
        # default backend ids name the service: two services may both have "blue"
        pools = {
            pool_name: pool.model_copy(
                update={
                    "backends": tuple(
                        b if b.id else b.model_copy(update={"id": f"{name}-{pool_name}-{n}"})
                        for n, b in enumerate(pool.backends, start=1)
                    )
                }
            )
            for pool_name, pool in service.pools.items()
        }
        return self.model_copy(
            update={
                **plain,
                "pools": pools,
                "health_check": _merged(self.health_check, service.health_check),
                "outlier_detection": _merged(self.outlier_detection, service.outlier_detection),
                "slow_start": _merged(self.slow_start, service.slow_start),
                "sticky": _merged(self.sticky, service.sticky),
                "draining": _merged(self.draining, service.draining),
                # shadow traffic copies to a top-level pool: the default service's
                "shadow": ShadowConfig(),
            }
        )

    @model_validator(mode="after")
    def _cross_field_checks(self) -> Config:
        # One error for all of them, at the root: the loader runs the same checks on
        # the sections and reports each problem at its own key and line instead.
        problems = check_listeners(self.listen, self.admin)
        problems += check_redirects(self.listen)
        if not self.pools and not self.services:
            problems.append((("pools",), "missing required key (or set services)"))
        if self.pools:
            problems += check_pools(self.pools)
        if self.pools or self.services:
            problems += check_shadow(self.shadow.pool, self.pools)
        problems += check_services(
            self.pools, self.services, self.routes, self.default_service, self.sticky
        )
        if problems:
            text = "; ".join(f"{_dotted(loc)}: {message}" for loc, message in problems)
            raise PydanticCustomError(CROSS_FIELD_ERROR, "{problems}", {"problems": text})
        return self
