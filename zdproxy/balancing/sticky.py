"""The affinity cookie: an HMAC-signed pin to a pool (and maybe a backend).

The value is ``base64url(payload) "." base64url(mac)``, where the payload is
the pool, the backend id (empty in pool mode) and the epoch (Unix seconds when
the pin was issued), and the MAC is HMAC-SHA256 under the process's secret,
truncated to 128 bits. The cookie carries ``Max-Age``, and the epoch is
checked on the server too, so a client that keeps a cookie past its age gets
a fresh pin. A pin is only a hint: a forged, tampered, truncated or expired
value decodes to None and the client is treated as new, never answered with an
error.

Verification is cached: the value of a pin issued in a given second to a given
pool is the same for every client (it carries no identity), so a small cache
of decoded values makes the common case a dict lookup. The cache holds forged
values too (as None), and is bounded: it is simply emptied when full.

Several zdproxy instances behind one address must share the secret
(``sticky.secret_env`` or ``secret_file``); otherwise each signs with its own
generated key (kept in the saved state and passed on by a hot upgrade) and a
client moving between instances is re-pinned each time.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import secrets
from collections.abc import Mapping
from dataclasses import dataclass

_CONTEXT = b"zdproxy-sticky-v1\x00"
_SEP = "\x1f"
_MAC_BYTES = 16
#: longer values are not ours (a pin is well under this); not cached
MAX_VALUE_LENGTH = 512
CACHE_SIZE = 4096


@dataclass(frozen=True, slots=True)
class Pin:
    pool: str
    #: None in pool mode
    backend: str | None
    #: Unix seconds when the pin was issued
    epoch: int


def load_secret(env_name: str | None, environ: Mapping[str, str]) -> tuple[bytes, bool]:
    """The signing key: from ``environ[env_name]`` when set, else random.

    Returns the key and whether it came from the environment.
    """
    if env_name:
        value = environ.get(env_name)
        if value:
            return hashlib.sha256(value.encode("utf-8")).digest(), True
    return secrets.token_bytes(32), False


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


class StickyCodec:
    __slots__ = ("_cache", "_issued", "_key", "cookie_attributes", "cookie_name", "max_age")

    def __init__(self, secret: bytes, cookie_name: str, max_age: float) -> None:
        self._key = secret
        self.cookie_name = cookie_name
        self.max_age = max(1, int(max_age))
        self.cookie_attributes = f"; Max-Age={self.max_age}; Path=/; HttpOnly; SameSite=Lax"
        self._cache: dict[str, Pin | None] = {}
        #: Set-Cookie values issued, by backend id: (pool, epoch, value)
        self._issued: dict[str, tuple[str, int, bytes]] = {}

    @property
    def secret(self) -> bytes:
        return self._key

    def _mac(self, payload: bytes) -> bytes:
        return hmac.new(self._key, _CONTEXT + payload, hashlib.sha256).digest()[:_MAC_BYTES]

    def encode(self, pin: Pin) -> str:
        payload = _SEP.join((pin.pool, pin.backend or "", str(pin.epoch))).encode("utf-8")
        value = f"{_b64(payload)}.{_b64(self._mac(payload))}"
        self._remember(value, pin)
        return value

    def set_cookie(self, pin: Pin) -> bytes:
        """The ``Set-Cookie`` header value that carries ``pin``."""
        return f"{self.cookie_name}={self.encode(pin)}{self.cookie_attributes}".encode("latin-1")

    def backend_cookie(self, pool: str, backend: str, epoch: int) -> bytes:
        """``set_cookie(Pin(pool, backend, epoch))``, signed once per backend and second.

        A pin carries no client identity, so every client pinned to one backend
        within one second gets the same value: ``sticky.mode: backend`` signs (an
        HMAC, two base64 encodings and the formatting: about 9 us) once per backend
        and second instead of once per cookie-less request. The value is the one
        ``set_cookie`` makes, so the cookie format and its validation are unchanged.
        """
        issued = self._issued.get(backend)
        if issued is not None and issued[1] == epoch and issued[0] == pool:
            return issued[2]
        cookie = self.set_cookie(Pin(pool, backend, epoch))
        if len(self._issued) >= CACHE_SIZE:
            self._issued.clear()
        self._issued[backend] = (pool, epoch, cookie)
        return cookie

    def decode(self, value: str) -> Pin | None:
        """The pin a cookie value carries, or None when it is not a valid one of ours."""
        try:
            return self._cache[value]
        except KeyError:
            pass
        if len(value) > MAX_VALUE_LENGTH:
            return None
        pin = self._verify(value)
        self._remember(value, pin)
        return pin

    def _remember(self, value: str, pin: Pin | None) -> None:
        cache = self._cache
        if len(cache) >= CACHE_SIZE:
            cache.clear()
        cache[value] = pin

    def _verify(self, value: str) -> Pin | None:
        encoded, dot, encoded_mac = value.partition(".")
        if not dot:
            return None
        try:
            payload = _unb64(encoded)
            mac = _unb64(encoded_mac)
        except (binascii.Error, ValueError):
            return None
        if not hmac.compare_digest(mac, self._mac(payload)):
            return None
        try:
            pool, backend, epoch = payload.decode("utf-8").split(_SEP)
            return Pin(pool, backend or None, int(epoch))
        except ValueError:
            return None
