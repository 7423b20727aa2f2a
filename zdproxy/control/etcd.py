"""A small etcd v3 client over etcd's JSON gateway (``/v3/...``), on aiohttp.

Why the gateway and not a gRPC client (``aetcd``, ``etcd3``): zdproxy already
ships aiohttp for the admin API and health checks, and the gateway is part of
every etcd v3 server (3.4 and later), so this costs no new dependency, no
native wheel (grpcio) and no generated protobuf code. The few calls zdproxy
needs are one JSON POST each: range, put, txn, deleterange, lease grant,
keepalive and revoke; a watch is one streaming POST whose answer is one JSON
object per line. Keys and values are base64 in the JSON, revisions are
decimal strings (int64), and fields with their zero value are left out.

Every call raises ``EtcdUnavailable`` when no endpoint answers (the caller
keeps its last known state and retries); ``EtcdCompacted`` when a watch asks for
a revision etcd has compacted away (the caller re-reads everything).
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import ssl
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any

import aiohttp

from zdproxy.errors import ZdproxyError

log = logging.getLogger("zdproxy.etcd")


class EtcdError(ZdproxyError):
    """etcd answered with an error."""


class EtcdUnavailable(EtcdError):
    """No etcd endpoint could be reached (or it did not answer in time)."""


class _TokenExpired(EtcdError):
    """The auth token was refused (it expires when idle)."""


class EtcdCompacted(EtcdError):
    """A watch asked for a revision that etcd has compacted away."""

    def __init__(self, compact_revision: int) -> None:
        super().__init__(f"revision compacted (oldest kept: {compact_revision})")
        self.compact_revision = compact_revision


def b64(data: str | bytes) -> str:
    raw = data.encode("utf-8") if isinstance(data, str) else data
    return base64.b64encode(raw).decode("ascii")


def unb64(data: str) -> bytes:
    return base64.b64decode(data)


def prefix_end(prefix: str) -> str:
    """The ``range_end`` that selects every key starting with ``prefix`` (base64)."""
    raw = bytearray(prefix.encode("utf-8"))
    for i in range(len(raw) - 1, -1, -1):
        if raw[i] < 0xFF:
            raw[i] += 1
            return b64(bytes(raw[: i + 1]))
    return b64(b"\0")


@dataclass(frozen=True, slots=True)
class KeyValue:
    key: str
    value: bytes
    mod_revision: int
    create_revision: int
    lease: int = 0

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> KeyValue:
        return cls(
            key=unb64(data["key"]).decode("utf-8", "replace"),
            value=unb64(data.get("value", "")),
            mod_revision=int(data.get("mod_revision", 0)),
            create_revision=int(data.get("create_revision", 0)),
            lease=int(data.get("lease", 0)),
        )


@dataclass(frozen=True, slots=True)
class WatchEvent:
    kind: str  # "PUT" or "DELETE"
    kv: KeyValue


@dataclass(frozen=True, slots=True)
class TxnResult:
    succeeded: bool
    revision: int
    #: the failure branch's range answers (the key's current value on a lost CAS)
    kvs: tuple[KeyValue, ...]


def put_op(key: str, value: bytes | str, lease: int = 0) -> dict[str, Any]:
    op: dict[str, Any] = {"key": b64(key), "value": b64(value)}
    if lease:
        op["lease"] = str(lease)
    return {"request_put": op}


def range_op(key: str, prefix: bool = False) -> dict[str, Any]:
    op: dict[str, Any] = {"key": b64(key)}
    if prefix:
        op["range_end"] = prefix_end(key)
    return {"request_range": op}


def mod_equals(key: str, revision: int) -> dict[str, Any]:
    """Compare: the key's mod revision is ``revision`` (0: the key does not exist)."""
    return {"key": b64(key), "target": "MOD", "result": "EQUAL", "mod_revision": str(revision)}


def create_equals(key: str, revision: int) -> dict[str, Any]:
    return {
        "key": b64(key),
        "target": "CREATE",
        "result": "EQUAL",
        "create_revision": str(revision),
    }


class EtcdClient:
    """Calls to one etcd cluster, trying its endpoints in turn."""

    def __init__(
        self,
        endpoints: Sequence[str],
        *,
        ssl_context: ssl.SSLContext | None = None,
        username: str | None = None,
        password: str | None = None,
        timeout: float = 2.0,
    ) -> None:
        scheme = "https" if ssl_context is not None else "http"
        self.endpoints = [e if "://" in e else f"{scheme}://{e}" for e in endpoints]
        self.ssl_context = ssl_context
        self.username = username
        self.password = password
        self.timeout = timeout
        self._current = 0
        self._token: str | None = None
        self._session: aiohttp.ClientSession | None = None

    def _http(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            connector = aiohttp.TCPConnector(ssl=self.ssl_context or False, limit=32)
            # a watch line carries a whole state document: room for large ones
            self._session = aiohttp.ClientSession(connector=connector, read_bufsize=2**22)
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def _authenticate(self, base: str) -> None:
        if self.username is None or self._token is not None:
            return
        body = {"name": self.username, "password": self.password or ""}
        answer = await self._post_once(base, "/v3/auth/authenticate", body, auth=False)
        self._token = str(answer.get("token", ""))

    async def _post_once(
        self, base: str, path: str, body: dict[str, Any], auth: bool = True
    ) -> dict[str, Any]:
        headers = {"Authorization": self._token} if auth and self._token else None
        timeout = aiohttp.ClientTimeout(total=self.timeout)
        async with self._http().post(
            base + path, json=body, headers=headers, timeout=timeout
        ) as response:
            text = await response.text()
            try:
                data = json.loads(text) if text else {}
            except ValueError:
                raise EtcdError(f"{path}: not JSON ({response.status})") from None
            if response.status != 200:
                message = data.get("message") or data.get("error") or text[:200]
                if auth and self._token and (response.status == 401 or "token" in str(message)):
                    self._token = None  # expired: authenticate again
                    raise _TokenExpired(f"{path}: {response.status} {message}")
                raise EtcdError(f"{path}: {response.status} {message}")
            if not isinstance(data, dict):
                raise EtcdError(f"{path}: unexpected answer")
            return data

    async def call(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        """POST to the current endpoint, then to the others; ``EtcdUnavailable`` when
        none answers."""
        problems: list[str] = []
        count = len(self.endpoints)
        for i in range(count):
            index = (self._current + i) % count
            base = self.endpoints[index]
            try:
                await self._authenticate(base)
                try:
                    answer = await self._post_once(base, path, body)
                except _TokenExpired:
                    # etcd's simple tokens expire when idle: once more with a new one
                    await self._authenticate(base)
                    answer = await self._post_once(base, path, body)
            except (aiohttp.ClientError, TimeoutError, OSError) as exc:
                problems.append(f"{base}: {type(exc).__name__} {exc}".strip())
                continue
            self._current = index
            return answer
        raise EtcdUnavailable("etcd unreachable (" + "; ".join(problems) + ")")

    # ---- KV -------------------------------------------------------------------------

    async def get_prefix(self, prefix: str) -> tuple[int, list[KeyValue]]:
        """Every key under ``prefix``, and the store's revision they are read at."""
        answer = await self.call(
            "/v3/kv/range", {"key": b64(prefix), "range_end": prefix_end(prefix)}
        )
        revision = int(answer.get("header", {}).get("revision", 0))
        return revision, [KeyValue.from_json(kv) for kv in answer.get("kvs", [])]

    async def get(self, key: str) -> KeyValue | None:
        answer = await self.call("/v3/kv/range", {"key": b64(key)})
        kvs = answer.get("kvs", [])
        return KeyValue.from_json(kvs[0]) if kvs else None

    async def put(self, key: str, value: bytes | str, lease: int = 0) -> int:
        body = put_op(key, value, lease)["request_put"]
        answer = await self.call("/v3/kv/put", body)
        return int(answer.get("header", {}).get("revision", 0))

    async def delete(self, key: str) -> None:
        await self.call("/v3/kv/deleterange", {"key": b64(key)})

    async def delete_range(self, key: str, end: str) -> None:
        """Delete the keys from ``key`` (included) to ``end`` (excluded)."""
        await self.call("/v3/kv/deleterange", {"key": b64(key), "range_end": b64(end)})

    async def txn(
        self,
        compare: list[dict[str, Any]],
        success: list[dict[str, Any]],
        failure: list[dict[str, Any]] | None = None,
    ) -> TxnResult:
        answer = await self.call(
            "/v3/kv/txn", {"compare": compare, "success": success, "failure": failure or []}
        )
        kvs: list[KeyValue] = []
        for item in answer.get("responses", []):
            found = item.get("response_range")
            if found:
                kvs.extend(KeyValue.from_json(kv) for kv in found.get("kvs", []))
        return TxnResult(
            succeeded=bool(answer.get("succeeded", False)),
            revision=int(answer.get("header", {}).get("revision", 0)),
            kvs=tuple(kvs),
        )

    # ---- leases ------------------------------------------------------------------------

    async def grant(self, ttl: int) -> int:
        answer = await self.call("/v3/lease/grant", {"TTL": str(ttl)})
        return int(answer["ID"])

    async def keepalive(self, lease: int) -> int:
        """Renew the lease once; its remaining TTL (0 or less: it has expired)."""
        answer = await self.call("/v3/lease/keepalive", {"ID": str(lease)})
        result = answer.get("result", answer)
        return int(result.get("TTL", 0))

    async def revoke(self, lease: int) -> None:
        await self.call("/v3/lease/revoke", {"ID": str(lease)})

    # ---- watch ---------------------------------------------------------------------------

    async def watch(self, prefix: str, start_revision: int) -> AsyncIterator[list[WatchEvent]]:
        """Batches of changes under ``prefix`` from ``start_revision`` on, as etcd
        sends them. Ends with ``EtcdUnavailable`` when the stream breaks,
        ``EtcdCompacted`` when the revision is gone."""
        base = self.endpoints[self._current]
        try:
            await self._authenticate(base)
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            raise EtcdUnavailable(f"{base}: {exc}") from None
        body = {
            "create_request": {
                "key": b64(prefix),
                "range_end": prefix_end(prefix),
                "start_revision": str(start_revision),
            }
        }
        headers = {"Authorization": self._token} if self._token else None
        # no total timeout: the stream lives as long as etcd does; a dead peer is
        # noticed by the keepalive loop, which cancels the watch
        timeout = aiohttp.ClientTimeout(total=None, connect=self.timeout, sock_connect=self.timeout)
        try:
            async with self._http().post(
                base + "/v3/watch", json=body, headers=headers, timeout=timeout
            ) as response:
                if response.status != 200:
                    raise EtcdUnavailable(f"watch: {response.status}")
                async for line in response.content:
                    if not line.strip():
                        continue
                    batch = _watch_batch(json.loads(line))
                    if batch:
                        yield batch
        except (aiohttp.ClientError, TimeoutError, OSError, ValueError) as exc:
            raise EtcdUnavailable(f"watch broke: {type(exc).__name__} {exc}") from None
        raise EtcdUnavailable("watch ended")


def _watch_batch(message: dict[str, Any]) -> list[WatchEvent]:
    result = message.get("result")
    if result is None:
        error = message.get("error", {})
        raise EtcdUnavailable(f"watch error: {error.get('message', message)}")
    compacted = int(result.get("compact_revision", 0))
    if compacted:
        raise EtcdCompacted(compacted)
    if result.get("canceled"):
        raise EtcdUnavailable(f"watch canceled: {result.get('cancel_reason', '')}")
    return [
        WatchEvent(event.get("type", "PUT"), KeyValue.from_json(event["kv"]))
        for event in result.get("events", [])
    ]


async def sleep_backoff(attempt: int) -> None:
    """Wait before reconnecting: 0.1 s doubling up to 1 s (etcd back within ~1 s
    of its return is what the convergence promise needs)."""
    await asyncio.sleep(min(1.0, 0.1 * 2 ** min(attempt, 4)))
