"""Building message heads: sans-IO, bytes in, bytes out.

The data path collects headers as ``(name, value)`` byte pairs from httptools;
these functions decide which travel on and serialise the head to send.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from http import HTTPStatus
from typing import Final


def _status_line(code: int) -> bytes:
    try:
        phrase = HTTPStatus(code).phrase
    except ValueError:
        phrase = ""
    return f"HTTP/1.1 {code} {phrase}\r\n".encode("latin-1")


#: precomputed status lines for every code a response may carry
STATUS_LINES: dict[int, bytes] = {code: _status_line(code) for code in range(100, 600)}


def connection_tokens(values: Iterable[bytes]) -> frozenset[bytes]:
    """Header names listed in ``Connection`` (they are hop-by-hop too)."""
    tokens: set[bytes] = set()
    for value in values:
        for token in value.split(b","):
            token = token.strip().lower()
            if token:
                tokens.add(token)
    return frozenset(tokens)


def error_response(
    status: int, cause: str, message: str, *, close: bool = True, extra: bytes = b""
) -> bytes:
    """A complete response the proxy generates itself; ``extra``: more header lines."""
    body = f"{status} {HTTPStatus(status).phrase}: {message}\n".encode()
    return b"".join(
        (
            STATUS_LINES[status],
            b"Content-Type: text/plain; charset=utf-8\r\n",
            b"Content-Length: %d\r\n" % len(body),
            b"X-Zdproxy-Error: %s\r\n" % cause.encode("ascii"),
            extra,
            b"Connection: close\r\n" if close else b"",
            b"\r\n",
            body,
        )
    )


LAST_CHUNK: Final = b"0\r\n\r\n"
CONTINUE_100: Final = b"HTTP/1.1 100 Continue\r\n\r\n"


#: hop-by-hop response header lines, removed in one C-level pass
_RESPONSE_HOP_LINES = re.compile(
    rb"\r\n(?:connection|keep-alive|transfer-encoding|proxy-connection|upgrade|trailer|te"
    rb"|proxy-authenticate):[^\r]*",
    re.IGNORECASE,
)

RESPONSE_CHUNKED: Final = 1
RESPONSE_HAS_LENGTH: Final = 2
#: Transfer-Encoding other than one final ``chunked``: the body cannot be re-framed
RESPONSE_BAD_CODING: Final = 4
#: both Content-Length and Transfer-Encoding (the length was dropped)
RESPONSE_BOTH_FRAMINGS: Final = 8


#: rewritten heads by raw head: most backends answer with the same head for a
#: second at a time (only ``Date`` moves), so a hit replaces six C-level scans and a
#: regex pass (about 4 us) with one dict lookup
_rewritten: dict[bytes, tuple[bytes, int]] = {}
#: entries before the cache is emptied (a backend whose heads are all different,
#: with a session cookie or a request ID in each, costs a lookup and a store)
HEAD_CACHE_SIZE: Final = 256
#: longer heads are not cached: bounds the cache's memory (256 x 2 x 2 KiB)
HEAD_CACHE_MAX_BYTES: Final = 2048


class _LastHead:
    """The last raw head rewritten and its result: a backend repeats its head for
    a second at a time, and comparing two equal heads (a length check and a
    ``memcmp``) is cheaper than hashing a fresh one for the dict (about 1,000
    instructions for 250 bytes)."""

    __slots__ = ("raw", "result")

    def __init__(self) -> None:
        self.raw = b""
        self.result: tuple[bytes, int] = (b"", 0)


_LAST: Final = _LastHead()


def rewrite_response_head(raw: bytes) -> tuple[bytes, int]:
    """Drop hop-by-hop lines from a raw response head.

    ``raw`` runs from the status line to the blank line (``\\r\\n\\r\\n``
    included). Returns the head without its final ``\\r\\n`` (so the caller can
    append lines) and flags: ``RESPONSE_CHUNKED`` when a Transfer-Encoding was
    present, ``RESPONSE_HAS_LENGTH`` for a Content-Length. Working on the bytes
    as received costs a few C-level scans instead of a Python call per header;
    a head seen before (bounded cache) costs one dict lookup.
    """
    last = _LAST
    if raw == last.raw:
        return last.result
    result = _rewritten.get(raw)
    if result is None:
        result = _rewrite(raw)
        if len(raw) <= HEAD_CACHE_MAX_BYTES:
            if len(_rewritten) >= HEAD_CACHE_SIZE:
                _rewritten.clear()
            _rewritten[raw] = result
    if len(raw) <= HEAD_CACHE_MAX_BYTES:
        last.raw = raw
        last.result = result
    return result


def _rewrite(raw: bytes) -> tuple[bytes, int]:
    lower = raw.lower()
    flags = 0
    if b"\r\ntransfer-encoding:" in lower:
        flags = RESPONSE_CHUNKED
        if _codings(lower) != [b"chunked"]:
            flags |= RESPONSE_BAD_CODING
    if b"\r\ncontent-length:" in lower:
        if flags:
            # both framings: the body is chunked and the Content-Length a lie
            raw, lower = _cut(raw, lower, b"\r\ncontent-length:")
            flags |= RESPONSE_BOTH_FRAMINGS
        else:
            flags = RESPONSE_HAS_LENGTH
    if b"\r\nconnection:" in lower and not _plain_connection(lower):
        for name in _connection_named(lower):
            raw, lower = _cut(raw, lower, name)
    return _RESPONSE_HOP_LINES.sub(b"", raw)[:-2], flags


def _plain_connection(lower: bytes) -> bool:
    """One ``Connection: keep-alive`` or ``close`` (nearly every response): names
    no other header, so the token walk can be skipped."""
    return lower.count(b"\r\nconnection:") == 1 and (
        b"\r\nconnection: keep-alive\r\n" in lower or b"\r\nconnection: close\r\n" in lower
    )


def _codings(lower: bytes) -> list[bytes]:
    """Every transfer coding named, across all Transfer-Encoding lines."""
    codings: list[bytes] = []
    start = lower.find(b"\r\ntransfer-encoding:")
    while start >= 0:
        end = lower.find(b"\r\n", start + 2)
        codings += (c.strip(b" \t") for c in lower[start + 20 : end].split(b","))
        start = lower.find(b"\r\ntransfer-encoding:", end)
    return codings


#: names a ``Connection`` header may list that are never cut on its word: its own
#: options, and Content-Length, which frames the body the proxy relays (cut, the
#: client would be left with no framing at all and read up to the close)
_NOT_CUT = frozenset({b"keep-alive", b"close", b"content-length"})


def _connection_named(lower: bytes) -> list[bytes]:
    """Header names listed in ``Connection`` besides keep-alive and close (rare)."""
    names: list[bytes] = []
    start = lower.find(b"\r\nconnection:")
    while start >= 0:
        end = lower.find(b"\r\n", start + 2)
        for token in lower[start + 13 : end].split(b","):
            token = token.strip()
            if token and token not in _NOT_CUT:
                names.append(b"\r\n" + token + b":")
        start = lower.find(b"\r\nconnection:", end)
    return names


def _cut(raw: bytes, lower: bytes, prefix: bytes) -> tuple[bytes, bytes]:
    """Remove every line that starts with ``prefix`` (its leading CRLF included)."""
    start = lower.find(prefix)
    while start >= 0:
        end = lower.find(b"\r\n", start + 2)
        raw = raw[:start] + raw[end:]
        lower = lower[:start] + lower[end:]
        start = lower.find(prefix, start)
    return raw, lower


_ZERO_LENGTH = re.compile(rb"\r\ncontent-length:[ \t]*0*[ \t]*\r\n", re.IGNORECASE)


def announces_body(raw: bytes) -> bool:
    """Whether a head that has framing headers announces a body: chunked, or a
    ``Content-Length`` other than 0. For the rare 204 that has framing at all."""
    lower = raw.lower()
    if b"\r\ntransfer-encoding:" in lower:
        return True
    return _ZERO_LENGTH.search(raw) is None
