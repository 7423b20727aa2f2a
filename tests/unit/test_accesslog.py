"""Access log formatting and request IDs: pure functions, plain values."""

from __future__ import annotations

import json
import textwrap

import pytest

from zdproxy.config import ConfigError, load_config_text
from zdproxy.http.requestid import RequestIds, id_in_end, valid_request_id
from zdproxy.proxy.accesslog import (
    Record,
    clf_time,
    escape_combined,
    format_combined,
    format_json,
    json_string,
    request_headers,
    rfc3339,
)

# 2026-11-30T23:50:07.123Z on the wall clock = end (loop clock) + offset
END = 1000.0
OFFSET = 1796082607.123 - END

HEADERS = [
    b"Host",
    b": ",
    b"shop",
    b"\r\n",
    b"user-agent",
    b": ",
    b"curl/8.0",
    b"\r\n",
    b"Referer",
    b": ",
    b"http://shop/a",
    b"\r\n",
]


def record(**changes: object) -> Record:
    values: dict[str, object] = {
        "end": END,
        "client": "10.0.0.7",
        "method": b"GET",
        "target": b"/cart?id=1",
        "version": "1.1",
        "status": 200,
        "sent": 1234,
        "received": 0,
        "headers": HEADERS,
        "duration": 0.0123,
        "upstream_time": 0.0012,
        "pool": "blue",
        "backend": "blue-1",
        "retries": 0,
        "cause": None,
        "request_id": b"5f3a9c-1",
    }
    values.update(changes)
    return tuple(values.values())  # type: ignore[return-value]


def test_combined_line_exactly() -> None:
    assert format_combined(record(), OFFSET) == (
        '10.0.0.7 - - [30/Nov/2026:23:50:07 +0000] "GET /cart?id=1 HTTP/1.1" 200 1234 '
        '"http://shop/a" "curl/8.0" pool=blue backend=blue-1 upstream_time=0.001 '
        "duration=0.012 retries=0 error=- request_id=5f3a9c-1"
    )


def test_combined_line_of_a_proxy_error() -> None:
    line = format_combined(
        record(
            status=503,
            sent=44,
            headers=(),
            upstream_time=None,
            pool=None,
            backend=None,
            retries=2,
            cause="no-backend",
            request_id=None,
            method=b"",
        ),
        OFFSET,
    )
    assert line == (
        '10.0.0.7 - - [30/Nov/2026:23:50:07 +0000] "-" 503 44 "-" "-" pool=- backend=- '
        "upstream_time=- duration=0.012 retries=2 error=no-backend request_id=-"
    )


def test_json_line_exactly() -> None:
    line = format_json(record(received=5), OFFSET)
    assert json.loads(line) == {
        "time": "2026-11-30T23:50:07.123Z",
        "client": "10.0.0.7",
        "method": "GET",
        "target": "/cart?id=1",
        "version": "1.1",
        "status": 200,
        "bytes_sent": 1234,
        "request_body_bytes": 5,
        "user_agent": "curl/8.0",
        "referer": "http://shop/a",
        "duration": 0.012,
        "upstream_time": 0.001,
        "pool": "blue",
        "backend": "blue-1",
        "retries": 0,
        "error": None,
        "request_id": "5f3a9c-1",
    }
    # key order is part of the format: people grep and cut these lines
    assert line.startswith('{"time":"2026-11-30T23:50:07.123Z","client":"10.0.0.7","method":')


def test_json_line_of_a_refused_request() -> None:
    entry = json.loads(
        format_json(
            record(method=b"", headers=(), upstream_time=None, pool=None, backend=None), OFFSET
        )
    )
    assert (entry["method"], entry["target"], entry["user_agent"]) == (None, None, None)
    assert (entry["pool"], entry["backend"], entry["upstream_time"]) == (None, None, None)


HOSTILE = b'a"b\\c\r\n{"status":200}\x00\x1b[2J\x7f\x85\xe2\x80\xa8\xff'


@pytest.mark.parametrize("fmt", [format_json, format_combined])
def test_hostile_values_stay_on_one_printable_line(fmt: object) -> None:
    headers = [b"User-Agent", b": ", HOSTILE, b"\r\n", b"Referer", b": ", HOSTILE, b"\r\n"]
    line = fmt(record(target=HOSTILE, headers=headers, method=HOSTILE), OFFSET)  # type: ignore[operator]
    assert line.isascii() and line.isprintable()
    assert len(line.splitlines()) == 1


def test_json_escaping_round_trips() -> None:
    assert json.loads(json_string(HOSTILE)) == HOSTILE.decode("utf-8", "backslashreplace")
    assert json_string(b"/plain") == '"/plain"'
    assert json.loads(json_string("é/ü".encode())) == "é/ü"
    assert json_string("é".encode()) == '"\\u00e9"'


def test_combined_escaping_is_nginx_style() -> None:
    assert escape_combined(b"/plain?a=1") == "/plain?a=1"
    assert escape_combined(b'a"b\\c\td\x85') == r"a\x22b\x5Cc\x09d\x85"


def test_request_headers_by_any_case() -> None:
    assert request_headers(HEADERS) == (b"curl/8.0", b"http://shop/a")
    assert request_headers([b"REFERER", b": ", b"r", b"\r\n"]) == (None, b"r")
    assert request_headers(()) == (None, None)


def test_times() -> None:
    assert rfc3339(1796082607.123) == "2026-11-30T23:50:07.123Z"
    assert rfc3339(1796082607.0) == "2026-11-30T23:50:07.000Z"
    assert clf_time(1796082607.999) == "30/Nov/2026:23:50:07 +0000"
    assert clf_time(1767225600.0) == "01/Jan/2026:00:00:00 +0000"


# ---- request IDs --------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "valid"),
    [
        (b"a", True),
        (b"Ab9._:+/=-", True),
        (b"x" * 200, True),
        (b"x" * 201, False),
        (b"", False),
        (b"a b", False),
        (b'a"b', False),
        (b"a\nb", False),
        (b"a\x00", False),
        ("é".encode(), False),
        (b"a,b", False),
    ],
)
def test_valid_request_id(value: bytes, valid: bool) -> None:
    assert valid_request_id(value) is valid


def test_generated_ids_are_unique_and_valid() -> None:
    ids = RequestIds("X-Request-Id", True, prefix=b"abc")
    made = [ids.new() for _ in range(1000)]
    assert made[:3] == [b"abc-01", b"abc-02", b"abc-03"]
    assert len(set(made)) == 1000
    assert all(valid_request_id(request_id) for request_id in made)
    # two processes: different random prefixes
    assert RequestIds("X-Request-Id", True).new() != RequestIds("X-Request-Id", True).new()


def test_generated_lines_are_the_counter_in_hex_across_digit_carries() -> None:
    # the line is kept up to the counter's last two digits and rebuilt when they
    # wrap: every ID up to and past 0xff, 0xfff and 0xffff is the counter in hex
    ids = RequestIds("X-Request-Id", False, prefix=b"p")
    for count in range(1, 0x10102):
        assert ids.resolve_end(None) == b"X-Request-Id: p-%02x\r\n\r\n" % count, count
    assert ids.new() == b"p-10102"
    assert id_in_end(b"X-Request-Id: p-10102\r\n\r\n") == b"p-10102"


def test_resolve_keeps_a_valid_trusted_id_only() -> None:
    trusting = RequestIds("X-Request-Id", True, prefix=b"p")
    assert trusting.resolve(b"client-1") == b"client-1"
    assert trusting.resolve(b"bad id") == b"p-01"
    assert trusting.resolve(None) == b"p-02"
    assert trusting.resolve_end(b"client-1") == b"X-Request-Id: client-1\r\n\r\n"
    distrusting = RequestIds("X-Trace", False, prefix=b"q")
    assert distrusting.resolve(b"client-1") == b"q-01"
    assert distrusting.resolve_end(b"client-1") == b"X-Trace: q-02\r\n\r\n"
    assert distrusting.line(b"q-1") == b"X-Trace: q-1\r\n"
    assert distrusting.header_lower == b"x-trace"
    assert distrusting.in_head(b"HTTP/1.1 200 OK\r\nx-TRACE : 1\r\n")
    assert not distrusting.in_head(b"HTTP/1.1 200 OK\r\nX-Trace-Id: 1\r\nA: X-Trace:\r\n")


# ---- config -----------------------------------------------------------------------

BASE = """\
listen: 127.0.0.1:8080
pools:
  blue:
    weight: 100
    backends:
      - address: 127.0.0.1:9001
"""


def problems(text: str) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load_config_text(textwrap.dedent(text), "t.yaml")
    return [str(problem) for problem in info.value.problems]


@pytest.mark.parametrize(
    ("written", "expected"),
    [("off", "off"), ("combined", "combined"), ("json", "json"), ("true", "combined")],
)
def test_access_log_values(written: str, expected: str) -> None:
    config = load_config_text(BASE + f"log:\n  access_log: {written}\n", "t.yaml")
    assert config.log.access_log == expected


def test_access_log_defaults() -> None:
    config = load_config_text(BASE, "t.yaml")
    assert (config.log.access_log, config.log.access_log_path) == ("off", None)
    request_id = config.http.request_id
    assert (request_id.enabled, request_id.header, request_id.trust_incoming) == (
        True,
        "X-Request-Id",
        True,
    )


def test_access_log_errors_name_file_line_key() -> None:
    found = problems(BASE + "log:\n  level: info\n  access_log: xml\n")
    assert len(found) == 1 and found[0].startswith("t.yaml:9: log.access_log: "), found
    found = problems(BASE + "log:\n  access_log_path: ''\n")
    assert len(found) == 1 and found[0].startswith("t.yaml:8: log.access_log_path: "), found


@pytest.mark.parametrize("header", ["Host", "content-length", "X Bad", ""])
def test_request_id_header_must_be_a_free_token(header: str) -> None:
    found = problems(BASE + f"http:\n  request_id:\n    header: '{header}'\n")
    assert len(found) == 1 and found[0].startswith("t.yaml:9: http.request_id.header: "), found


def test_request_id_unknown_key() -> None:
    found = problems(BASE + "http:\n  request_id:\n    enable: true\n")
    assert len(found) == 1 and found[0].startswith("t.yaml:9: http.request_id.enable: "), found
