"""Request-head classifier: may this request be forwarded? Sans-IO, no asyncio.

The tiers and checks follow AWS http-desync-guardian's classification of
request heads (the vectors live in ``conformance/desync-guardian``); this is an
independent implementation tuned for CPython, with a few deliberate, documented
points where zdproxy is stricter (see docs/http.md, section HTTP strictness).

Two entry points give the same answers:

* :class:`HeadChecker`, the incremental form the data path uses: ``header()``
  once per header as the parser reports it, then ``verdict()`` once the head is
  complete.  Ordinary headers cost one dict lookup on the name and one
  ``bytes.translate`` on the value; anything unusual drops to the full
  analysis.
* :func:`classify_request`, a one-shot call over a complete head.  It always
  runs the full analysis (never the fast paths), so tests can hold the two
  against each other.

Tiers and what the data path does with them:

* ``COMPLIANT`` and ``ACCEPTABLE``: forwarded.
* ``AMBIGUOUS``: refused with 400 and the connection closed (strict default).
* ``SEVERE``: refused with 400 and the connection closed, always.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final, TypeAlias

__all__ = [
    "COMPLIANT",
    "HTTP_VERSIONS",
    "HeadChecker",
    "Tier",
    "Verdict",
    "classify_request",
]


class Tier(enum.IntEnum):
    """How risky a request head is, from the point of view of request smuggling."""

    COMPLIANT = 0
    ACCEPTABLE = 1
    AMBIGUOUS = 2
    SEVERE = 3


@dataclass(frozen=True, slots=True)
class Verdict:
    """The outcome of a classification.

    ``reason`` is a short printable-ASCII message naming the header or part at
    fault (bytes are escaped, other header values are masked); it is safe to
    log or to put in a response header.  ``kind`` is a stable machine-readable
    code (http-desync-guardian's ``ClassificationReason`` names, plus
    ``MultipleHost`` and ``UnsupportedVersion``), handy as a metric label.
    """

    tier: Tier
    reason: str
    kind: str = "Compliant"


#: the verdict for a request with nothing to report (shared, never copied)
COMPLIANT: Final = Verdict(Tier.COMPLIANT, "compliant", "Compliant")

_COMPLIANT_T: Final = Tier.COMPLIANT
_ACCEPTABLE: Final = Tier.ACCEPTABLE
_AMBIGUOUS: Final = Tier.AMBIGUOUS
_SEVERE: Final = Tier.SEVERE

# --- byte classes -----------------------------------------------------------
# Each ``*_OK`` constant lists the bytes that are *fine*:
# ``data.translate(None, OK)`` deletes them and leaves exactly the offending
# bytes (b"" when all is well).  The hot paths use the ``*_MAP`` tables
# instead: ``0 in data.translate(MAP)`` (one C pass plus a memchr) is about
# three times faster than a deleting translate and only says yes or no.

_ALNUM: Final = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
#: RFC 9110 tchar: the bytes of a token (header names, methods)
_TCHAR: Final = _ALNUM + b"!#$%&'*+-.^_`|~"
#: field-value bytes: VCHAR, SP, HTAB and obs-text (RFC 9110 5.5)
_VALUE_OK: Final = bytes([0x09, *range(0x20, 0x7F), *range(0x80, 0x100)])
#: request-target bytes: anything visible, obs-text included (raw UTF-8 paths)
_TARGET_OK: Final = bytes([*range(0x21, 0x7F), *range(0x80, 0x100)])
#: translate tables: 0 for a byte outside the class, 1 inside it
_VALUE_MAP: Final = bytes(int(b in _VALUE_OK) for b in range(256))
_TARGET_MAP: Final = bytes(int(b in _TARGET_OK) for b in range(256))
#: every byte that is not an ASCII letter or digit
_NOT_ALNUM: Final = bytes(b for b in range(256) if b not in _ALNUM)
#: bytes no parser may ever let through inside a field or the request line
_CR_LF_NUL: Final = frozenset(b"\r\n\x00")

_OWS: Final = b" \t"

_TE_NAME: Final = b"transfer-encoding"
_CL_NAME: Final = b"content-length"
_HOST_NAME: Final = b"host"
#: what a name folds to (letters and digits only) when it means TE or CL
_TE_LETTERS: Final = b"transferencoding"
_CL_LETTERS: Final = b"contentlength"
#: non-ASCII letters whose upper case is an ASCII letter of those names
#: (U+017F LATIN SMALL LETTER LONG S -> "S", U+0131 DOTLESS I -> "I")
_LOOKALIKES: Final = ((b"\xc5\xbf", b"s"), (b"\xc4\xb1", b"i"))

#: transfer codings zdproxy accepts in a request (unknown ones are SEVERE)
_KNOWN_CODINGS: Final = frozenset({b"chunked", b"compress", b"deflate", b"gzip", b"identity"})
_CHUNKED: Final = b"chunked"
_JUST_CHUNKED: Final = (_CHUNKED,)

#: 2**64 - 1: the largest Content-Length we (and llhttp) can represent
_MAX_CONTENT_LENGTH: Final = 18446744073709551615
_MAX_CONTENT_LENGTH_DIGITS: Final = 20

#: methods that take the verdict fast path when nothing else is unusual
_COMMON_METHODS: Final = frozenset(
    {b"GET", b"HEAD", b"POST", b"PUT", b"DELETE", b"OPTIONS", b"PATCH"}
)
_BODYLESS_METHODS: Final = frozenset({b"GET", b"HEAD"})
_GOOD_VERSIONS: Final = frozenset({b"HTTP/1.1", b"HTTP/1.0"})

#: httptools' version string -> the version token ``verdict`` takes (no per-request
#: concatenation for the usual two)
HTTP_VERSIONS: Final = {"1.1": b"HTTP/1.1", "1.0": b"HTTP/1.0"}

_HTTP1_VERSION: Final = re.compile(rb"HTTP/1\.[0-9]")
_LATER_VERSION: Final = re.compile(rb"HTTP/[2-9](?:\.[0-9])?")
_ABSOLUTE_FORM: Final = re.compile(rb"[A-Za-z][A-Za-z0-9+.\-]*://")

# --- header-name codes --------------------------------------------------------
# A name that is a valid token is classified once and remembered; anything else
# ("odd") takes the full analysis every time and is never remembered, so the
# cache holds only names real clients send and cannot be filled with junk
# faster than the cap allows.

_PLAIN: Final = 0  # an ordinary token, nothing to track
_TE: Final = 1
_CL: Final = 2
_HOST: Final = 3
_ODD: Final = 4  # not a token, or a look-alike of TE/CL: full analysis

_NAME_CACHE_MAX: Final = 4096
_name_cache: dict[bytes, int] = {}


#: bits that hold every code ``name_code`` returns: a caller may keep a code in
#: the low bits of a number of its own (``HeadChecker.coded_header``)
NAME_CODE_BITS: Final = 3
ODD_NAME: Final = _ODD


def name_code(name: bytes) -> int:
    """What ``HeadChecker.coded_header`` needs to know of a header name. Only a
    name whose code is not ``ODD_NAME`` may be remembered with its code."""
    if not name or name.translate(None, _TCHAR):
        return _ODD
    lower = name.lower()
    if lower == _TE_NAME:
        return _TE
    if lower == _CL_NAME:
        return _CL
    if lower == _HOST_NAME:
        return _HOST
    return _ODD if _lookalike(name) else _PLAIN


def _name_code(name: bytes) -> int:
    """Classify a header name for the fast path, remembering clean ones."""
    code = name_code(name)
    if code != _ODD and len(_name_cache) < _NAME_CACHE_MAX:
        _name_cache[name] = code
    return code


def _lookalike(name: bytes) -> int:
    """_TE or _CL when ``name`` is not that header but could be read as it.

    Some servers normalise names (trim, drop separators and control bytes,
    map ``_`` to ``-``, upper-case Unicode): ``Transfer_Encoding``,
    ``" Content-Length"``, ``"\\x01Transfer-Encoding"``, ``Tran\\u017ffer-Encoding``
    (long s).
    A name whose letters and digits, after folding the known Unicode
    look-alikes, spell one of the two names is treated as that header.
    """
    if len(name) < len(_CL_LETTERS):
        return 0
    folded = name
    if not name.isascii():
        for alike, ascii_letter in _LOOKALIKES:
            folded = folded.replace(alike, ascii_letter)
    letters = folded.lower().translate(None, _NOT_ALNUM)
    if letters == _TE_LETTERS:
        return _TE
    if letters == _CL_LETTERS:
        return _CL
    return 0


# --- message formatting -------------------------------------------------------


def _escape_table() -> list[str]:
    table = [f"\\0x{b:02x}" for b in range(256)]
    for b in range(0x20, 0x7F):
        table[b] = chr(b)
    table[ord("\\")] = "\\\\"
    table[ord('"')] = '\\"'
    table[ord("\r")] = "\\r"
    table[ord("\n")] = "\\n"
    table[ord("\t")] = "\\t"
    return table


_ESCAPE: Final = _escape_table()
_QUOTE_LIMIT: Final = 64


def _q(data: bytes) -> str:
    """Quote bytes as printable ASCII: ``"chunked\\0x11"``, ``"Name\\r"``."""
    text = "".join([_ESCAPE[b] for b in data[:_QUOTE_LIMIT]])
    return f'"{text}..."' if len(data) > _QUOTE_LIMIT else f'"{text}"'


def _masked(data: bytes) -> str:
    """Quote a header value without disclosing it: runs of visible bytes
    become ``_``, spaces stay, control bytes are shown escaped, so the
    position of a bad byte is visible but not the content."""
    out: list[str] = []
    last = ""
    for b in data[:_QUOTE_LIMIT]:
        piece = "_" if b > 0x20 and b != 0x7F else _ESCAPE[b]
        if piece == "_" and last == "_":
            continue
        out.append(piece)
        last = piece
    text = "".join(out)
    return f'"{text}..."' if len(data) > _QUOTE_LIMIT else f'"{text}"'


def _text(data: bytes) -> str:
    """Bytes known to be printable ASCII, as str."""
    return data.decode("ascii", "backslashreplace")


# --- the checker --------------------------------------------------------------

#: (name, value, exact): exact is False for look-alike names
_Field: TypeAlias = tuple[bytes, bytes, bool]


class HeadChecker:
    """Incremental classifier: one per connection, ``reset()`` per request.

    Call :meth:`header` for every header in order with the raw bytes the parser
    reported, then :meth:`verdict` once.  Afterwards :attr:`content_length`
    and :attr:`chunked` describe the body framing as a strict HTTP/1.1 parser
    (llhttp) sees it, from the exactly-named ``Content-Length`` and
    ``Transfer-Encoding`` headers: ``chunked`` when the final coding is
    ``chunked`` (a Content-Length is then ``None``: Transfer-Encoding wins),
    otherwise ``content_length`` when every Content-Length carries the same
    valid value.  :attr:`transfer_codings` lists the codings of the exact
    ``Transfer-Encoding`` headers in order, lower-case and without parameters
    (``(b"gzip", b"chunked")``), for a proxy that re-frames the body but must
    keep the other codings.  All three are only meaningful for a verdict the
    data path forwards.
    """

    __slots__ = (
        "_cl",
        "_hosts",
        "_kind",
        "_reason",
        "_te",
        "_tier",
        "chunked",
        "content_length",
        "transfer_codings",
    )

    _tier: Tier
    _kind: str
    _reason: str
    _te: list[_Field] | None
    _cl: list[_Field] | None
    _hosts: int
    content_length: int | None
    chunked: bool
    transfer_codings: tuple[bytes, ...]

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        """Forget everything about the previous request."""
        self._tier = _COMPLIANT_T
        self._kind = "Compliant"
        self._reason = "compliant"
        self._te = None
        self._cl = None
        self._hosts = 0
        self.content_length = None
        self.chunked = False
        self.transfer_codings = ()

    # -- per header --

    def header(self, name: bytes, value: bytes) -> None:
        """Take one header as parsed: raw name (case kept) and raw value."""
        code = _name_cache.get(name)
        if code is None:
            code = _name_code(name)
        self.coded_header(name, value, code)

    def coded_header(self, name: bytes, value: bytes, code: int) -> None:
        """``header`` for a caller that keeps ``name_code(name)`` in a table of its
        own (one lookup per header instead of two)."""
        if not code:  # _PLAIN
            if 0 in value.translate(_VALUE_MAP):
                self._header_full(name, value)
            return
        if code == _ODD or 0 in value.translate(_VALUE_MAP):
            self._header_full(name, value)
        elif code == _HOST:
            self._hosts += 1
        elif code == _CL:
            if self._cl is None:
                self._cl = [(name, value, True)]
            else:
                self._cl.append((name, value, True))
        elif self._te is None:
            self._te = [(name, value, True)]
        else:
            self._te.append((name, value, True))

    def _flag(self, tier: Tier, kind: str, reason: str) -> None:
        # the first finding of the highest tier names the verdict
        if tier > self._tier:
            self._tier = tier
            self._kind = kind
            self._reason = reason

    def _header_full(self, name: bytes, value: bytes) -> None:
        """Every header-level check, with no shortcut."""
        role = 0
        exact = False
        if not _CR_LF_NUL.isdisjoint(name):
            self._flag(
                _SEVERE,
                "BadHeader",
                f"header name {_q(name)} contains CR, LF or NUL (value {_masked(value)})",
            )
        else:
            trimmed = name.strip(_OWS)
            lower = name.lower()
            if not trimmed or trimmed.startswith(b":"):
                self._flag(_AMBIGUOUS, "EmptyHeader", f"empty header name {_q(name)}")
            elif lower == _TE_NAME:
                role, exact = _TE, True
            elif lower == _CL_NAME:
                role, exact = _CL, True
            elif lower == _HOST_NAME:
                role = _HOST
            else:
                role = _lookalike(name)
                if role:
                    meant = "Transfer-Encoding" if role == _TE else "Content-Length"
                    self._flag(
                        _AMBIGUOUS,
                        "SuspiciousHeader",
                        f"header name {_q(name)} is too close to {meant}",
                    )
                elif name.translate(None, _TCHAR):
                    # stricter than http-desync-guardian (Acceptable there):
                    # a name that is not a token may be normalised downstream
                    # into a header the proxy manages (Host, Connection, ...)
                    self._flag(
                        _AMBIGUOUS,
                        "NonCompliantHeader",
                        f"header name {_q(name)} is not a token",
                    )
        bad = value.translate(None, _VALUE_OK)
        if bad:
            if not _CR_LF_NUL.isdisjoint(bad):
                self._flag(
                    _SEVERE,
                    "BadHeader",
                    f"header {_q(name)} has CR, LF or NUL in its value {_masked(value)}",
                )
                if not exact:
                    role = 0
            else:
                shown = _q(value) if role in (_TE, _CL) else _masked(value)
                self._flag(
                    _ACCEPTABLE,
                    "NonCompliantHeader",
                    f"header {_q(name)} has control bytes in its value {shown}",
                )
        if role == _HOST:
            self._hosts += 1
        elif role == _CL:
            if self._cl is None:
                self._cl = []
            self._cl.append((name, value, exact))
        elif role == _TE:
            if self._te is None:
                self._te = []
            self._te.append((name, value, exact))

    # -- final verdict --

    def verdict(self, method: bytes, target: bytes, version: bytes) -> Verdict:
        """Classify the request once all its headers went through :meth:`header`."""
        # fast path: nothing flagged, an everyday request line, and framing
        # by at most one plain Content-Length or one "chunked"; anything
        # else takes the full analysis
        if (
            not self._tier  # COMPLIANT
            and self._hosts < 2
            and (version == b"HTTP/1.1" or version == b"HTTP/1.0")
            and target
            and target[0] == 0x2F  # "/": origin-form
            and 0 not in target.translate(_TARGET_MAP)
            and method in _COMMON_METHODS
        ):
            te = self._te
            cl = self._cl
            if te is None:
                if cl is None:
                    self.content_length = None
                    self.chunked = False
                    return COMPLIANT
                if len(cl) == 1 and method not in _BODYLESS_METHODS:
                    digits = cl[0][1].strip(_OWS)
                    if 0 < len(digits) < _MAX_CONTENT_LENGTH_DIGITS and digits.isdigit():
                        self.content_length = int(digits)
                        self.chunked = False
                        return COMPLIANT
            elif (
                cl is None
                and len(te) == 1
                and version == b"HTTP/1.1"
                and method not in _BODYLESS_METHODS
                and te[0][1].strip(_OWS).lower() == _CHUNKED
            ):
                self.content_length = None
                self.chunked = True
                self.transfer_codings = _JUST_CHUNKED
                return COMPLIANT
        return self._verdict_full(method, target, version)

    def _verdict_full(self, method: bytes, target: bytes, version: bytes) -> Verdict:
        """Every request-level check, with no shortcut."""
        trimmed_version = version.strip(_OWS)
        is_http09 = trimmed_version in (b"", b"HTTP/0.9")
        before_http11 = is_http09 or trimmed_version == b"HTTP/1.0"
        version_label = "HTTP/0.9" if not trimmed_version else _q(version)
        te = self._te
        cl = self._cl

        # Transfer-Encoding / Content-Length before HTTP/1.1 have no meaning
        if te and before_http11:
            self._flag(
                _AMBIGUOUS,
                "UndefinedTransferEncodingSemantics",
                f"Transfer-Encoding in a {version_label} request",
            )
        elif cl and is_http09:
            self._flag(
                _AMBIGUOUS,
                "UndefinedContentLengthSemantics",
                f"Content-Length in a {version_label} request",
            )

        # Transfer-Encoding: known codings only, chunked once and last
        chunked = False
        if te:
            chunked_seen = False
            valid = True
            last = b""
            exact_codings: list[bytes] = []
            for _name, value, exact in te:
                for item in value.split(b","):
                    coding = item.split(b";", 1)[0].strip(_OWS).lower()
                    if coding not in _KNOWN_CODINGS:
                        valid = False
                        self._flag(
                            _SEVERE,
                            "BadTransferEncoding",
                            f"unknown coding in Transfer-Encoding {_q(value)}",
                        )
                        continue
                    if coding == _CHUNKED:
                        if chunked_seen:
                            self._flag(
                                _SEVERE,
                                "MultipleTransferEncodingChunked",
                                f"Transfer-Encoding applies chunked more than once ({_q(value)})",
                            )
                        chunked_seen = True
                    last = coding
                    if exact:
                        exact_codings.append(coding)
            if valid and last != _CHUNKED:
                # RFC 9112 6.3: the body length cannot be determined
                self._flag(
                    _SEVERE,
                    "BadTransferEncoding",
                    f"Transfer-Encoding {_q(te[-1][1])} does not end with chunked",
                )
            chunked = bool(exact_codings) and exact_codings[-1] == _CHUNKED
            self.transfer_codings = tuple(exact_codings)

        # Content-Length: plain decimal, one value
        cl_value: int | None = None
        exact_cl: int | None = None
        exact_cl_ok = True
        if cl:
            for _name, value, exact in cl:
                number = _parse_content_length(value)
                if number is None:
                    exact_cl_ok = exact_cl_ok and not exact
                    self._flag(_SEVERE, "BadContentLength", f"invalid Content-Length {_q(value)}")
                    continue
                if exact:
                    if exact_cl is not None and exact_cl != number:
                        exact_cl_ok = False
                    exact_cl = number
                if cl_value is None:
                    cl_value = number
                elif number != cl_value:
                    self._flag(
                        _SEVERE,
                        "MultipleContentLength",
                        f"multiple Content-Length headers with different values "
                        f"({cl_value}, {number})",
                    )
                else:
                    self._flag(
                        _AMBIGUOUS,
                        "DuplicateContentLength",
                        f"duplicate Content-Length headers ({number})",
                    )

        # GET and HEAD bodies have no defined semantics (RFC 9110 9.3.1)
        if method in _BODYLESS_METHODS:
            verb = _text(method)
            if te:
                self._flag(
                    _AMBIGUOUS,
                    "UndefinedTransferEncodingSemantics",
                    f"{verb} request with Transfer-Encoding",
                )
            if cl_value == 0:
                self._flag(
                    _ACCEPTABLE,
                    "GetHeadZeroContentLength",
                    f"{verb} request with Content-Length: 0",
                )
            elif cl_value is not None:
                self._flag(
                    _AMBIGUOUS,
                    "UndefinedContentLengthSemantics",
                    f"{verb} request with Content-Length: {cl_value}",
                )

        if te and cl_value is not None:
            self._flag(
                _AMBIGUOUS,
                "BothTeClPresent",
                "both Transfer-Encoding and Content-Length present",
            )

        if self._hosts > 1:
            # RFC 9112 3.2: more than one Host must be answered with 400
            self._flag(_AMBIGUOUS, "MultipleHost", "multiple Host headers")

        if not method or method.translate(None, _TCHAR):
            self._flag(_SEVERE, "BadMethod", f"invalid method {_q(method)}")

        self._check_version(version, trimmed_version, is_http09)
        self._check_target(method, target)

        self.chunked = chunked
        self.content_length = exact_cl if exact_cl_ok and not chunked else None
        if self._tier == _COMPLIANT_T:
            return COMPLIANT
        return Verdict(self._tier, self._reason, self._kind)

    def _check_version(self, version: bytes, trimmed: bytes, is_http09: bool) -> None:
        if version in _GOOD_VERSIONS:
            return
        if is_http09:
            self._flag(_ACCEPTABLE, "NonCompliantVersion", "HTTP/0.9 request")
        elif _HTTP1_VERSION.fullmatch(trimmed):
            # HTTP/1.2 .. 1.9, or 1.0/1.1 with blanks around
            self._flag(_ACCEPTABLE, "NonCompliantVersion", f"non-standard version {_q(version)}")
        elif _LATER_VERSION.fullmatch(trimmed):
            self._flag(_SEVERE, "UnsupportedVersion", f"unsupported version {_q(version)}")
        else:
            self._flag(_SEVERE, "BadVersion", f"invalid version {_q(version)}")

    def _check_target(self, method: bytes, target: bytes) -> None:
        bad = target.translate(None, _TARGET_OK)
        if bad:
            if not _CR_LF_NUL.isdisjoint(bad):
                self._flag(_SEVERE, "BadUri", f"CR, LF or NUL in request target {_masked(target)}")
            elif b" " in bad or b"\t" in bad:
                # the request line is rebuilt when forwarded: a blank would
                # split it differently downstream
                self._flag(_SEVERE, "BadUri", f"blank in request target {_masked(target)}")
            else:
                self._flag(
                    _AMBIGUOUS,
                    "AmbiguousUri",
                    f"control byte in request target {_masked(target)}",
                )
        if not target or target.startswith(b"/") or _ABSOLUTE_FORM.match(target):
            return
        if target == b"*":
            if method != b"OPTIONS":
                self._flag(_AMBIGUOUS, "AmbiguousUri", f"{_q(method)} with request target *")
        elif method != b"CONNECT" or b"/" in target:
            self._flag(
                _AMBIGUOUS,
                "AmbiguousUri",
                f"request target {_masked(target)} is not origin-form or absolute-form",
            )


def _parse_content_length(value: bytes) -> int | None:
    digits = value.strip(_OWS)
    if not digits or len(digits) > _MAX_CONTENT_LENGTH_DIGITS or not digits.isdigit():
        return None
    number = int(digits)
    return number if number <= _MAX_CONTENT_LENGTH else None


def _reference(
    method: bytes, target: bytes, version: bytes, headers: Sequence[tuple[bytes, bytes]]
) -> tuple[Verdict, HeadChecker]:
    """Run every check with no fast path; the checker keeps the framing found."""
    checker = HeadChecker()
    for name, value in headers:
        checker._header_full(name, value)
    return checker._verdict_full(method, target, version), checker


def classify_request(
    method: bytes, target: bytes, version: bytes, headers: Sequence[tuple[bytes, bytes]]
) -> Verdict:
    """Classify a complete request head.

    ``version`` is the protocol token as sent (``b"HTTP/1.1"``; ``b""`` for an
    HTTP/0.9 request line); ``headers`` are raw ``(name, value)`` pairs in order.
    Same answers as :class:`HeadChecker`, always through the full analysis.
    """
    return _reference(method, target, version, headers)[0]
