"""Request target and Host checks: sans-IO, bytes in, answers out.

A reverse proxy forwards origin-form targets (``/path?query``). An
absolute-form target (``http://host/path``) is rewritten to origin form, and
its authority becomes the Host (RFC 9112 3.2.2: the target's host wins over a
Host header), so that the backend and the proxy agree on the host a request is
for. Userinfo in the target is refused (RFC 9110 4.2.4: deprecated, and a way
to make a log or a cache read a different host than the one used).
"""

from __future__ import annotations

from typing import Final

__all__ = ["AbsoluteTarget", "TargetError", "split_absolute", "valid_host"]

_ALNUM: Final = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
#: RFC 3986 reg-name bytes (unreserved, pct-encoded, sub-delims) plus ":" for the
#: port and the brackets of an IP literal; checked in detail only when present
_HOST_OK: Final = _ALNUM + b"-._~%!$&'()*+,;=:[]"
#: translate table: 0 for a byte a Host may not hold, 2 for the brackets of an IP
#: literal, 1 otherwise (``0 in``, ``2 in`` on the result: an int needle is a
#: memchr, where a bytes needle first fails as an int, an exception set and cleared)
_HOST_MAP: Final = bytes((2 if b in b"[]" else 1) if b in _HOST_OK else 0 for b in range(256))
_IP_LITERAL_OK: Final = b"0123456789ABCDEFabcdef:.vV" + _ALNUM + b"-._~!$&'()*+,;="
_SCHEMES: Final = frozenset({b"http", b"https"})


class TargetError(ValueError):
    """A request target or Host the proxy refuses (answered with 400)."""


def valid_host(value: bytes) -> bool:
    """Is ``value`` a Host field value: ``uri-host [ ":" port ]`` (RFC 9110 7.2)?

    Empty, blanks, control bytes, userinfo and any byte outside the URI grammar
    are refused. One C-level pass for the common case (a name, maybe a port).
    """
    if not value:
        return False
    classes = value.translate(_HOST_MAP)
    if 0 in classes:
        return False
    if value[0] == 0x5B:  # "[": IP literal
        end = value.find(b"]")
        if end < 2 or value[1:end].translate(None, _IP_LITERAL_OK):
            return False
        rest = value[end + 1 :]
        return not rest or (rest[0] == 0x3A and _port_ok(rest[1:]))
    if 2 in classes:  # a bracket outside an IP literal
        return False
    host, colon, port = value.partition(b":")
    if not host:
        return False
    return not colon or _port_ok(port)


def _port_ok(port: bytes) -> bool:
    # RFC 3986: port = *DIGIT (an empty port is allowed by the grammar)
    return not port or (port.isdigit() and len(port) <= 5)


class AbsoluteTarget:
    """An absolute-form target split into what the backend gets."""

    __slots__ = ("authority", "origin_form")

    def __init__(self, authority: bytes, origin_form: bytes) -> None:
        #: ``host[:port]``: the Host the request goes on with
        self.authority = authority
        #: ``/path?query``: the request target the backend gets
        self.origin_form = origin_form


def split_absolute(target: bytes) -> AbsoluteTarget:
    """``http://host:port/p?q`` -> authority ``host:port``, origin form ``/p?q``.

    Raise :class:`TargetError` for another scheme, a missing or invalid host,
    or userinfo (``http://user:pw@host/``).
    """
    scheme, sep, rest = target.partition(b"://")
    if not sep or scheme.lower() not in _SCHEMES:
        raise TargetError("request target is not an http(s) URI")
    end = len(rest)
    for delimiter in (b"/", b"?", b"#"):
        found = rest.find(delimiter)
        if 0 <= found < end:
            end = found
    authority = rest[:end]
    if authority.find(b"@") >= 0:
        raise TargetError("userinfo in the request target")
    if not valid_host(authority):
        raise TargetError("invalid host in the request target")
    # a fragment is not part of a request target (RFC 9112 3.2)
    path = rest[end:].partition(b"#")[0]
    if not path.startswith(b"/"):
        path = b"/" + path
    return AbsoluteTarget(authority, path)
