"""Request IDs: keep a valid incoming one, or make a new one. Pure, no I/O.

A new ID is a per-process random prefix and a counter in hex, two digits at
least (``3f9c0a1b2c4d-1f``): unique across processes and restarts (48 random
bits) without a syscall or a ``uuid4`` per request, and it only ever contains
characters that are valid in an incoming ID too.

The data path takes the whole header line and the blank line that ends a head
(``resolve_end``): it ends both the request sent upstream and the response as
one piece (the rare head that needs a line after it cuts the blank line off),
and a new one costs one concatenation (the line up to the counter's last two hex
digits is kept, and changes once in 256 IDs) instead of a ``%`` format.
"""

from __future__ import annotations

import os
import re
from typing import Final

#: what an incoming ID may look like: 1-200 characters, no spaces, quotes or controls
_VALID = re.compile(rb"[A-Za-z0-9._:+/=-]{1,200}").fullmatch


def valid_request_id(value: bytes) -> bool:
    return _VALID(value) is not None


class RequestIds:
    """The request-ID policy of one process: header name, trust, generator."""

    __slots__ = (
        "_base",
        "_count",
        "_prefix",
        "_seen_answer",
        "_seen_head",
        "header",
        "header_lower",
        "in_head",
        "trust_incoming",
    )

    def __init__(self, header: str, trust_incoming: bool, prefix: bytes | None = None) -> None:
        #: ``b"X-Request-Id: "``: the start of the header line the proxy writes
        self.header = header.encode("ascii") + b": "
        self.header_lower = header.lower().encode("ascii")
        self.trust_incoming = trust_incoming
        #: ``in_head(raw_head)``: a match when a message head already has the header
        self.in_head = re.compile(
            rb"\r\n" + re.escape(self.header_lower) + rb"[ \t]*:", re.IGNORECASE
        ).search
        #: the head ``has_header`` last searched, and the answer
        self._seen_head = b""
        self._seen_answer = False
        self._prefix = (os.urandom(6).hex().encode("ascii") if prefix is None else prefix) + b"-"
        #: IDs made so far (a plain int: a native increment when compiled, where
        #: ``itertools.count`` costs a Python-level call)
        self._count = 0
        #: the next line up to its counter's last two hex digits (``_count >> 8``)
        self._base = self.header + self._prefix

    def has_header(self, head: bytes) -> bool:
        """``in_head`` for the data path: the rewritten response head comes out of
        ``http.head``'s cache as the same object while a backend repeats it (for a
        second at a time), so the last answer is kept, by identity (a regex pass
        over the head saved; the head kept alive so the identity stays its own)."""
        if head is self._seen_head:
            return self._seen_answer
        answer = self.in_head(head) is not None
        self._seen_head = head
        self._seen_answer = answer
        return answer

    def new(self) -> bytes:
        return id_in_end(self._new_end())

    def resolve(self, incoming: bytes | None) -> bytes:
        """The ID of a request: the client's, when trusted and valid, else a new one."""
        return id_in_end(self.resolve_end(incoming))

    def resolve_end(self, incoming: bytes | None) -> bytes:
        """``resolve``, as the header line the proxy writes (``X-Request-Id: ...``
        and CRLF) and the blank line that ends a head (a second CRLF)."""
        if incoming is not None and self.trust_incoming and _VALID(incoming) is not None:
            return self.header + incoming + b"\r\n\r\n"
        return self._new_end()

    def _new_end(self) -> bytes:
        count = self._count + 1
        self._count = count
        low = count & 0xFF
        if not low:
            self._base = b"%s%s%x" % (self.header, self._prefix, count >> 8)
        return self._base + _LOW_DIGITS[low]

    def line(self, request_id: bytes) -> bytes:
        return b"%s%s\r\n" % (self.header, request_id)


#: the last two hex digits of a counter, the line's CRLF and the blank line
_LOW_DIGITS: Final = tuple(b"%02x\r\n\r\n" % low for low in range(256))


def id_in_end(end: bytes) -> bytes:
    """The ID a request-ID line and blank line (``resolve_end``) carry (header
    names hold no ``": "``)."""
    return end[end.index(b": ") + 2 : -4]
