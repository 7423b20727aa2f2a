"""The signed affinity cookie, with plain values."""

from __future__ import annotations

import base64

from hypothesis import given
from hypothesis import strategies as st

from zdproxy.balancing.sticky import CACHE_SIZE, Pin, StickyCodec, load_secret

SECRET = b"k" * 32


def codec(secret: bytes = SECRET) -> StickyCodec:
    return StickyCodec(secret, "zd_affinity", 3600)


def test_round_trip_pool_and_backend() -> None:
    c = codec()
    for pin in (Pin("blue", None, 1700000000), Pin("green", "green-2", 1700000001)):
        value = c.encode(pin)
        assert codec().decode(value) == pin  # a fresh codec: not from the cache


def test_set_cookie_header() -> None:
    header = codec().set_cookie(Pin("blue", None, 1))
    name, _, rest = header.decode().partition("=")
    assert name == "zd_affinity"
    assert "; Max-Age=3600; Path=/; HttpOnly; SameSite=Lax" in rest


def test_tampered_values_are_ignored() -> None:
    c = codec()
    value = c.encode(Pin("blue", None, 1700000000))
    payload, _, mac = value.partition(".")
    forged_payload = base64.urlsafe_b64encode(b"green\x1f\x1f1700000000").rstrip(b"=").decode()
    fresh = codec()
    assert fresh.decode(f"{forged_payload}.{mac}") is None
    assert fresh.decode(payload) is None
    assert fresh.decode(value[:-2]) is None
    assert fresh.decode(value + "A") is None
    assert fresh.decode("") is None
    assert fresh.decode("é.é") is None
    assert fresh.decode("x" * 10000) is None


def test_another_secret_does_not_verify() -> None:
    value = codec().encode(Pin("blue", None, 1))
    assert codec(b"other" * 8).decode(value) is None


@given(st.text(max_size=200))
def test_arbitrary_text_never_raises(value: str) -> None:
    assert codec().decode(value) is None


def test_verification_is_cached_and_bounded() -> None:
    c = codec()
    value = c.encode(Pin("blue", None, 5))
    assert c.decode(value) is c.decode(value)
    for i in range(CACHE_SIZE + 10):
        c.decode(f"junk{i}")
    assert len(c._cache) <= CACHE_SIZE
    assert c.decode(value) == Pin("blue", None, 5)


def test_secret_from_environment_or_random() -> None:
    key, from_env = load_secret("ZD_SECRET", {"ZD_SECRET": "s3cret"})
    assert from_env and len(key) == 32
    assert load_secret("ZD_SECRET", {"ZD_SECRET": "s3cret"})[0] == key
    random1, env1 = load_secret("ZD_SECRET", {})
    random2, _ = load_secret(None, {})
    assert not env1 and random1 != random2
