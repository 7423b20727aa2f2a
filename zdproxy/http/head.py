"""Building message heads: sans-IO, bytes in, bytes out.

The data path collects headers as ``(name, value)`` byte pairs from httptools;
these functions decide which travel on and serialise the head to send.
"""

from __future__ import annotations

from collections.abc import Iterable
from http import HTTPStatus

#: hop-by-hop headers (RFC 9110 7.6.1) plus the ones a proxy always rewrites
HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
        b"proxy-authenticate",
        b"proxy-authorization",
    }
)

#: request headers the proxy replaces with its own values
REQUEST_REPLACED = frozenset({b"x-forwarded-proto", b"x-forwarded-host", b"expect"})


def _status_line(code: int) -> bytes:
    try:
        phrase = HTTPStatus(code).phrase
    except ValueError:
        phrase = ""
    return f"HTTP/1.1 {code} {phrase}\r\n".encode("latin-1")


#: precomputed status lines for every code a response may carry
STATUS_LINES: dict[int, bytes] = {code: _status_line(code) for code in range(100, 600)}


def status_line(code: int, reason: bytes | None = None) -> bytes:
    if reason:
        return b"HTTP/1.1 %d %s\r\n" % (code, reason)
    line = STATUS_LINES.get(code)
    return line if line is not None else b"HTTP/1.1 %d \r\n" % code


def connection_tokens(values: Iterable[bytes]) -> frozenset[bytes]:
    """Header names listed in ``Connection`` (they are hop-by-hop too)."""
    tokens: set[bytes] = set()
    for value in values:
        for token in value.split(b","):
            token = token.strip().lower()
            if token:
                tokens.add(token)
    return frozenset(tokens)


def error_response(status: int, cause: str, message: str, *, close: bool = True) -> bytes:
    """A complete response the proxy generates itself."""
    body = f"{status} {HTTPStatus(status).phrase}: {message}\n".encode()
    return b"".join(
        (
            STATUS_LINES[status],
            b"Content-Type: text/plain; charset=utf-8\r\n",
            b"Content-Length: %d\r\n" % len(body),
            b"X-Zdproxy-Error: %s\r\n" % cause.encode("ascii"),
            b"Connection: close\r\n" if close else b"",
            b"\r\n",
            body,
        )
    )


def encode_chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


LAST_CHUNK = b"0\r\n\r\n"
CONTINUE_100 = b"HTTP/1.1 100 Continue\r\n\r\n"
