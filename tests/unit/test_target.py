"""Request target and Host checks (zdproxy.http.target), pure functions."""

from __future__ import annotations

import pytest

from zdproxy.http.target import TargetError, split_absolute, valid_host


@pytest.mark.parametrize(
    "host",
    [
        b"example.com",
        b"example.com:8080",
        b"EXAMPLE.com",
        b"127.0.0.1",
        b"127.0.0.1:80",
        b"[::1]",
        b"[::1]:8080",
        b"[2001:db8::7]",
        b"xn--bcher-kva.example",
        b"a_b-c~d.example",
        b"host:",  # RFC 3986: port = *DIGIT
        b"%41.example",
        b"sub!$&'()*+,;=.example",
    ],
)
def test_valid_hosts(host: bytes) -> None:
    assert valid_host(host)


@pytest.mark.parametrize(
    "host",
    [
        b"",
        b"a b",
        b"a\tb",
        b"a/b",
        b"a?b",
        b"a#b",
        b"user@host",
        b"user:pw@host",
        b"host:port",
        b"host:8o",
        b"host:123456",
        b"host:80:81",
        b":80",
        b"[::1",
        b"::1]",
        b"[::1]x",
        b"[::1]:x",
        b"[]",
        b"[::1]:80]",
        b"h\x00ost",
        b"h\x7fost",
        b"h\xc3\xa9.example",
        b'h"ost',
        b"h<ost>",
        b"ho\\st",
    ],
)
def test_invalid_hosts(host: bytes) -> None:
    assert not valid_host(host)


@pytest.mark.parametrize(
    ("target", "authority", "origin_form"),
    [
        (b"http://evil.example/p", b"evil.example", b"/p"),
        (b"http://evil.example/p?q=1&r", b"evil.example", b"/p?q=1&r"),
        (b"http://evil.example", b"evil.example", b"/"),
        (b"http://evil.example?x", b"evil.example", b"/?x"),
        (b"http://evil.example:8080/a/b/", b"evil.example:8080", b"/a/b/"),
        (b"HTTP://Evil.Example/", b"Evil.Example", b"/"),
        (b"https://a.example/s", b"a.example", b"/s"),
        (b"http://[::1]:81/v6", b"[::1]:81", b"/v6"),
        (b"http://a.example/p#frag", b"a.example", b"/p"),
        (b"http://a.example#frag", b"a.example", b"/"),
        (b"http://a.example//double", b"a.example", b"//double"),
    ],
)
def test_split_absolute(target: bytes, authority: bytes, origin_form: bytes) -> None:
    split = split_absolute(target)
    assert (split.authority, split.origin_form) == (authority, origin_form)


@pytest.mark.parametrize(
    ("target", "why"),
    [
        (b"http://user:pw@evil.example/", "userinfo"),
        (b"http://user@evil.example/", "userinfo"),
        (b"http://@evil.example/", "userinfo"),
        (b"http://good.example@evil.example/", "userinfo"),
        (b"ftp://evil.example/", "not an http"),
        (b"ws://evil.example/", "not an http"),
        (b"evil.example/p", "not an http"),
        (b"http:/evil.example/p", "not an http"),
        (b"http:///p", "invalid host"),
        (b"http://", "invalid host"),
        (b"http://a b/", "invalid host"),
        (b"http://evil.example:x/", "invalid host"),
    ],
)
def test_split_absolute_refuses(target: bytes, why: str) -> None:
    with pytest.raises(TargetError, match=why):
        split_absolute(target)
