"""Unit tests for zdproxy.http.rules: the incremental HeadChecker against the
one-shot classify_request, body framing, the rules the vectors do not cover,
and a property test that the fast paths never change an answer."""

from __future__ import annotations

from collections.abc import Sequence

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from zdproxy.http import rules
from zdproxy.http.rules import COMPLIANT, HeadChecker, Tier, Verdict, classify_request

Headers = Sequence[tuple[bytes, bytes]]
#: verdict, content_length, chunked, transfer_codings
Outcome = tuple[Verdict, int | None, bool, tuple[bytes, ...]]

C, A, M, S = Tier.COMPLIANT, Tier.ACCEPTABLE, Tier.AMBIGUOUS, Tier.SEVERE

BROWSER = [
    (b"Host", b"example.com"),
    (b"User-Agent", b"Mozilla/5.0 (X11; Linux x86_64; rv:120.0) Gecko/20100101 Firefox/120.0"),
    (b"Accept", b"text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8"),
    (b"Accept-Encoding", b"gzip, deflate, br"),
    (b"Connection", b"keep-alive"),
]


def incremental(
    method: bytes,
    target: bytes,
    version: bytes,
    headers: Headers,
    checker: HeadChecker | None = None,
) -> Outcome:
    checker = checker or HeadChecker()
    checker.reset()
    for name, value in headers:
        checker.header(name, value)
    verdict = checker.verdict(method, target, version)
    return verdict, checker.content_length, checker.chunked, checker.transfer_codings


def reference(method: bytes, target: bytes, version: bytes, headers: Headers) -> Outcome:
    verdict, checker = rules._reference(method, target, version, headers)
    return verdict, checker.content_length, checker.chunked, checker.transfer_codings


def check(
    headers: Headers, method: bytes = b"POST", target: bytes = b"/x", version: bytes = b"HTTP/1.1"
) -> tuple[Verdict, int | None, bool]:
    """Classify both ways, insist they agree, return the answer."""
    fast = incremental(method, target, version, headers)
    slow = reference(method, target, version, headers)
    assert fast == slow
    assert classify_request(method, target, version, headers) == fast[0]
    return fast[:3]


# --- everyday requests and body framing --------------------------------------


@pytest.mark.parametrize(
    ("method", "headers", "content_length", "chunked"),
    [
        (b"GET", BROWSER, None, False),
        (b"POST", [*BROWSER, (b"Content-Length", b"42")], 42, False),
        (b"POST", [*BROWSER, (b"content-length", b" 0 ")], 0, False),
        (b"PUT", [(b"CONTENT-LENGTH", b"\t007\t")], 7, False),
        (b"POST", [*BROWSER, (b"Transfer-Encoding", b"chunked")], None, True),
        (b"POST", [(b"transfer-encoding", b" Chunked ")], None, True),
        (b"POST", [(b"Transfer-Encoding", b"gzip, chunked")], None, True),
        (
            b"POST",
            [(b"Transfer-Encoding", b"gzip"), (b"Transfer-Encoding", b"chunked")],
            None,
            True,
        ),
        (b"POST", [(b"Transfer-Encoding", b"chunked;ext=1")], None, True),
        (b"PATCH", [(b"Content-Length", b"18446744073709551615")], 2**64 - 1, False),
        (b"DELETE", [], None, False),
        (b"get", [(b"Content-Length", b"5")], 5, False),  # methods are case-sensitive
    ],
)
def test_compliant_framing(
    method: bytes, headers: Headers, content_length: int | None, chunked: bool
) -> None:
    verdict, cl, ch = check(headers, method=method)
    assert verdict is COMPLIANT
    assert (cl, ch) == (content_length, chunked)


@pytest.mark.parametrize(
    ("values", "codings"),
    [
        ([b"chunked"], (b"chunked",)),
        ([b" Chunked;ext=1 "], (b"chunked",)),
        ([b"gzip , Deflate", b"chunked"], (b"gzip", b"deflate", b"chunked")),
    ],
)
def test_transfer_codings_for_reframing(values: list[bytes], codings: tuple[bytes, ...]) -> None:
    headers = [(b"Transfer-Encoding", v) for v in values]
    outcome = incremental(b"POST", b"/", b"HTTP/1.1", headers)
    assert outcome == reference(b"POST", b"/", b"HTTP/1.1", headers)
    assert outcome == (COMPLIANT, None, True, codings)


def test_get_with_zero_content_length_is_acceptable() -> None:
    verdict, cl, ch = check([(b"Content-Length", b"0")], method=b"GET")
    assert (verdict.tier, verdict.kind, cl, ch) == (A, "GetHeadZeroContentLength", 0, False)


def test_duplicate_content_length_keeps_the_value() -> None:
    verdict, cl, _ = check([(b"Content-Length", b"5"), (b"Content-Length", b"5")])
    assert (verdict.tier, verdict.kind, cl) == (M, "DuplicateContentLength", 5)


def test_transfer_encoding_wins_over_content_length() -> None:
    verdict, cl, ch = check([(b"Transfer-Encoding", b"chunked"), (b"Content-Length", b"5")])
    assert (verdict.tier, verdict.kind, cl, ch) == (M, "BothTeClPresent", None, True)


def test_lookalike_headers_do_not_frame_the_body() -> None:
    # llhttp frames by the exact names only; so must the reported framing
    verdict, cl, ch = check([(b"Transfer_Encoding", b"chunked"), (b"Content-Length", b"3")])
    assert (verdict.tier, verdict.kind, cl, ch) == (M, "SuspiciousHeader", 3, False)


def test_checker_reuse_forgets_the_previous_request() -> None:
    checker = HeadChecker()
    first = incremental(b"POST", b"/", b"HTTP/1.1", [(b"Transfer-Encoding", b"chunked")], checker)
    assert first == (COMPLIANT, None, True, (b"chunked",))
    bad = incremental(b"POST", b"/", b"HTTP/1.1", [(b"Content-Length", b"1, 2")], checker)
    assert bad[0].tier == S
    again = incremental(b"GET", b"/", b"HTTP/1.1", BROWSER, checker)
    assert again == (COMPLIANT, None, False, ())


# --- rules beyond the vectors ---------------------------------------------------


@pytest.mark.parametrize(
    ("headers", "tier", "kind"),
    [
        ([(b"Transfer-Encoding", b"gzip")], S, "BadTransferEncoding"),
        ([(b"Transfer-Encoding", b"chunked, gzip")], S, "BadTransferEncoding"),
        ([(b"Transfer-Encoding", b"chunked, gzip, chunked")], S, "MultipleTransferEncodingChunked"),
        (
            [(b"Transfer-Encoding", b"chunked"), (b"Transfer-Encoding", b"gzip")],
            S,
            "BadTransferEncoding",
        ),
        ([(b"Transfer-Encoding", b"gzip,, chunked")], S, "BadTransferEncoding"),
        ([(b"Transfer-Encoding", b"")], S, "BadTransferEncoding"),
        ([(b"Transfer-Encoding", b"x-gzip, chunked")], S, "BadTransferEncoding"),
        ([(b"Transfer-Encoding", b"chunked\x0b")], S, "BadTransferEncoding"),
        ([(b"Content-Length", b"")], S, "BadContentLength"),
        ([(b"Content-Length", b"+5")], S, "BadContentLength"),
        ([(b"Content-Length", b"-1")], S, "BadContentLength"),
        ([(b"Content-Length", b"0x10")], S, "BadContentLength"),
        ([(b"Content-Length", b"1_000")], S, "BadContentLength"),
        ([(b"Content-Length", "\uff15".encode())], S, "BadContentLength"),
        ([(b"Content-Length", b"9" * 5000)], S, "BadContentLength"),  # no int() digit-limit error
        ([(b"Content-Length", b"18446744073709551616")], S, "BadContentLength"),
        ([(b"Content-Length", b"5"), (b"Content-Length", b"6")], S, "MultipleContentLength"),
        ([(b"Host", b"a"), (b"host", b"b")], M, "MultipleHost"),
        ([(b"Host", b"a"), (b"Host", b"a")], M, "MultipleHost"),
        ([(b"Host ", b"a")], M, "NonCompliantHeader"),
        ([(b"X-Forwarded-For\x01", b"1.2.3.4")], M, "NonCompliantHeader"),
        ([("Hôst".encode(), b"a")], M, "NonCompliantHeader"),
        ([(b"TransferEncoding", b"chunked")], M, "SuspiciousHeader"),
        ([(b"Content.Length", b"5")], M, "SuspiciousHeader"),
        ([(b"CONTENT_LENGTH", b"5")], M, "SuspiciousHeader"),
        ([(b"X-Note", b"a\x7fb")], A, "NonCompliantHeader"),
        ([(b"X-Note", b"caf\xc3\xa9 \t ok")], C, "Compliant"),
        ([(b"X-Content-Length", b"5"), (b"Content-Length-Range", b"1")], C, "Compliant"),
        ([(b"Transfer-Encoding-X", b"chunked"), (b"Content-Lengthy", b"x")], C, "Compliant"),
    ],
)
def test_header_rules(headers: Headers, tier: Tier, kind: str) -> None:
    verdict, _, _ = check(headers)
    assert (verdict.tier, verdict.kind) == (tier, kind), verdict


@pytest.mark.parametrize(
    ("method", "target", "version", "tier", "kind"),
    [
        (b"GET", b"/a/b?c=d#f", b"HTTP/1.1", C, "Compliant"),
        (b"GET", b"http://example.com/a", b"HTTP/1.1", C, "Compliant"),
        (b"GET", "/страница".encode(), b"HTTP/1.0", C, "Compliant"),
        (b"OPTIONS", b"*", b"HTTP/1.1", C, "Compliant"),
        (b"CONNECT", b"example.com:443", b"HTTP/1.1", C, "Compliant"),
        (b"MKCOL", b"/dav/", b"HTTP/1.1", C, "Compliant"),
        (b"GET", b"*", b"HTTP/1.1", M, "AmbiguousUri"),
        (b"GET", b"example.com:443", b"HTTP/1.1", M, "AmbiguousUri"),
        (b"GET", b"index.html", b"HTTP/1.1", M, "AmbiguousUri"),
        (b"GET", b"/a\x01b", b"HTTP/1.1", M, "AmbiguousUri"),
        (b"GET", b"/a\x7f", b"HTTP/1.1", M, "AmbiguousUri"),
        (b"GET", b"/a b", b"HTTP/1.1", S, "BadUri"),
        (b"GET", b"/a\tb", b"HTTP/1.1", S, "BadUri"),
        (b"GET", b"/a\r\nX: y", b"HTTP/1.1", S, "BadUri"),
        (b"GET", b"/a\x00", b"HTTP/1.1", S, "BadUri"),
        (b"", b"/", b"HTTP/1.1", S, "BadMethod"),
        (b"G ET", b"/", b"HTTP/1.1", S, "BadMethod"),
        (b"GET", b"/", b"HTTP/1.2", A, "NonCompliantVersion"),
        (b"GET", b"/", b" HTTP/1.1", A, "NonCompliantVersion"),
        (b"GET", b"/", b"HTTP/0.9", A, "NonCompliantVersion"),
        (b"GET", b"/", b"", A, "NonCompliantVersion"),
        (b"GET", b"/", b"HTTP/2.0", S, "UnsupportedVersion"),
        (b"GET", b"/", b"HTTP/3", S, "UnsupportedVersion"),
        (b"GET", b"/", b"http/1.1", S, "BadVersion"),
        (b"GET", b"/", b"HTTP/1.10", S, "BadVersion"),
        (b"GET", b"/", b"HTTP/1.1\r\n", S, "BadVersion"),
    ],
)
def test_request_line_rules(
    method: bytes, target: bytes, version: bytes, tier: Tier, kind: str
) -> None:
    verdict, _, _ = check(
        [(b"Host", b"example.com")], method=method, target=target, version=version
    )
    assert (verdict.tier, verdict.kind) == (tier, kind), verdict


def test_first_finding_of_the_highest_tier_names_the_verdict() -> None:
    verdict, _, _ = check(
        [
            (b"X-A", b"\x01"),  # acceptable
            (b"Transfer_Encoding", b"chunked"),  # ambiguous, first
            (b"X-B ", b"v"),  # ambiguous, later
        ]
    )
    assert verdict.kind == "SuspiciousHeader"
    assert "Transfer_Encoding" in verdict.reason


def test_reasons_escape_bytes_and_mask_ordinary_values() -> None:
    verdict, _, _ = check([(b"X-Secret\r", b"password=hunter2")])
    assert verdict.kind == "BadHeader"
    assert '"X-Secret\\r"' in verdict.reason
    assert "hunter2" not in verdict.reason
    verdict, _, _ = check([(b"Transfer-Encoding", b"chunked\x11")])
    assert '"chunked\\0x11"' in verdict.reason  # framing values are shown
    verdict, _, _ = check([(b"Content-Length", b"7" * 500)])
    assert len(verdict.reason) < 200


# --- the name cache ---------------------------------------------------------------


def test_name_cache_keeps_only_clean_names_and_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(rules, "_name_cache", {})
    checker = HeadChecker()
    checker.header(b"X-Fine", b"v")
    checker.header(b"Transfer_Encoding", b"chunked")
    checker.header(b"X-Bad ", b"v")
    assert set(rules._name_cache) == {b"X-Fine"}
    for i in range(rules._NAME_CACHE_MAX + 100):
        checker.header(b"X-%d" % i, b"v")
    assert len(rules._name_cache) == rules._NAME_CACHE_MAX
    # past the cap names are still classified, just not remembered
    outcome = incremental(b"POST", b"/", b"HTTP/1.1", [(b"X-New-Name", b"v")])
    assert outcome == (COMPLIANT, None, False, ())


# --- property: fast path == full analysis, never raises ------------------------------

COMMON_NAMES = [
    b"Host",
    b"host",
    b"User-Agent",
    b"Accept",
    b"Content-Type",
    b"Content-Length",
    b"content-length",
    b"CONTENT-LENGTH",
    b"Transfer-Encoding",
    b"transfer-encoding",
    b"Transfer_Encoding",
    b"Transfer-Encoding ",
    b" Content-Length",
    b"\x01Content-Length",
    "Tran\u017ffer-Encoding".encode(),
    "Transfer-Encod\u0131ng".encode(),
    b"Content-Lengthy",
    b"X-Forwarded-For",
    b"",
    b":authority",
]
COMMON_VALUES = [
    b"chunked",
    b" chunked ",
    b"Chunked",
    b"gzip, chunked",
    b"chunked, chunked",
    b"chunked;q=1",
    b"gzip",
    b"xchunked",
    b"0",
    b"42",
    b" 42\t",
    b"42, 42",
    b"18446744073709551616",
    b"example.com",
    b"",
    b"a\r\nb",
    b"\x01",
]

header_names = st.one_of(st.sampled_from(COMMON_NAMES), st.binary(max_size=24))
header_values = st.one_of(
    st.sampled_from(COMMON_VALUES),
    st.binary(max_size=24),
    st.from_regex(rb"\A[ \t]*[0-9]{1,22}[ \t]*\Z"),
)
methods = st.one_of(
    st.sampled_from([b"GET", b"HEAD", b"POST", b"PUT", b"OPTIONS", b"CONNECT", b"get", b""]),
    st.binary(max_size=8),
)
targets = st.one_of(
    st.sampled_from([b"/", b"/a?b=c", b"*", b"http://h/p", b"h:443", b"", b"/a b", b"x"]),
    st.binary(max_size=24),
)
versions = st.one_of(
    st.sampled_from(
        [b"HTTP/1.1", b"HTTP/1.0", b"", b"HTTP/0.9", b"HTTP/1.2", b"HTTP/2.0", b" HTTP/1.1"]
    ),
    st.binary(max_size=10),
)
header_lists = st.lists(st.tuples(header_names, header_values), max_size=8)


def _printable_ascii(text: str) -> bool:
    return all(0x20 <= ord(ch) < 0x7F for ch in text)


_shared_checker = HeadChecker()


@settings(max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(method=methods, target=targets, version=versions, headers=header_lists)
def test_incremental_matches_full_analysis(
    method: bytes, target: bytes, version: bytes, headers: list[tuple[bytes, bytes]]
) -> None:
    slow = reference(method, target, version, headers)
    # a fresh checker, then a reused one (cache warm, state from the last example)
    assert incremental(method, target, version, headers) == slow
    assert incremental(method, target, version, headers, _shared_checker) == slow
    verdict = slow[0]
    assert classify_request(method, target, version, headers) == verdict
    assert isinstance(verdict.tier, Tier)
    assert (verdict.tier == Tier.COMPLIANT) == (verdict.kind == "Compliant")
    assert verdict.reason and _printable_ascii(verdict.reason)
    if verdict.tier <= Tier.ACCEPTABLE:
        # forwarded: the framing must be unambiguous
        cl, chunked = slow[1], slow[2]
        assert not (chunked and cl is not None)


# requests close to everyday traffic, where the fast paths actually run: the
# property above rarely builds a request compliant enough to reach them
everyday_headers = st.lists(
    st.one_of(
        st.tuples(
            st.sampled_from([b"Host", b"host", b"User-Agent", b"Accept", b"X-Id"]),
            st.sampled_from([b"example.com", b"*/*", b"", b"a\tb", b"caf\xc3\xa9"]),
        ),
        st.tuples(
            st.sampled_from([b"Content-Length", b"content-length"]),
            st.from_regex(rb"\A[ \t]?[0-9]{0,21}[ \t]?\Z"),
        ),
        st.tuples(
            st.sampled_from([b"Transfer-Encoding", b"TRANSFER-ENCODING"]),
            st.sampled_from(
                [
                    b"chunked",
                    b" chunked\t",
                    b"Chunked",
                    b"gzip, chunked",
                    b"gzip",
                    b"chunked, chunked",
                ]
            ),
        ),
    ),
    max_size=6,
)


@settings(max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    method=st.sampled_from([b"GET", b"HEAD", b"POST", b"PUT", b"PATCH", b"OPTIONS", b"BREW"]),
    target=st.sampled_from([b"/", b"/a?b=c", b"*", b"/\xd1\x8f", b"/a\x01", b"http://h/"]),
    version=st.sampled_from([b"HTTP/1.1", b"HTTP/1.0", b"HTTP/1.1 ", b"HTTP/2.0", b""]),
    headers=everyday_headers,
)
def test_incremental_matches_full_analysis_near_everyday(
    method: bytes, target: bytes, version: bytes, headers: list[tuple[bytes, bytes]]
) -> None:
    slow = reference(method, target, version, headers)
    assert incremental(method, target, version, headers) == slow
    assert incremental(method, target, version, headers, _shared_checker) == slow
