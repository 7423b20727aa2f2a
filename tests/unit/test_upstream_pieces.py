"""Pure pieces of the upstream side: the chunk-size guard and the response-head
rewrite."""

from __future__ import annotations

import pytest

from zdproxy.http.chunks import MAX_CHUNK_SIZE, ChunkSizeGuard
from zdproxy.http.head import announces_body, rewrite_response_head

BODY = b"5\r\nhello\r\n1a;ext=1\r\n" + b"x" * 26 + b"\r\n0\r\nTrailer: x\r\n\r\n"


def test_a_valid_body_passes_whole() -> None:
    guard = ChunkSizeGuard()
    assert guard.feed(BODY)
    assert guard.done


@pytest.mark.parametrize("step", [1, 2, 3, 7, 64])
def test_a_valid_body_passes_in_any_split(step: int) -> None:
    guard = ChunkSizeGuard()
    for i in range(0, len(BODY), step):
        assert guard.feed(BODY[i : i + step])
    assert guard.done


def test_feed_starts_at_an_offset() -> None:
    head = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
    guard = ChunkSizeGuard()
    assert guard.feed(head + BODY, len(head))
    assert guard.done


@pytest.mark.parametrize(
    "size",
    [b"ffffffffffffffff", b"10000000001", b"FFFFFFFFFFF", b"10000000001;ext=1", b"1" + b"0" * 30],
)
def test_sizes_over_the_bound_are_refused(size: bytes) -> None:
    assert not ChunkSizeGuard().feed(b"5\r\nhello\r\n" + size + b"\r\nabc")


def test_the_bound_itself_passes() -> None:
    assert b"%x" % MAX_CHUNK_SIZE == b"10000000000"
    guard = ChunkSizeGuard()
    assert guard.feed(b"10000000000\r\nabc")
    assert guard.left == MAX_CHUNK_SIZE + 2 - 3


def test_a_huge_size_split_across_reads_is_refused() -> None:
    guard = ChunkSizeGuard()
    assert guard.feed(b"fffffff")
    assert not guard.feed(b"fffffffff\r\n")


def test_an_endless_run_of_leading_zeros_is_refused() -> None:
    guard = ChunkSizeGuard()
    results = [guard.feed(b"0" * 16) for _ in range(8)]
    assert results[:3] == [True, True, True]
    assert not results[-1]


def test_a_lower_bound_is_honoured() -> None:
    assert ChunkSizeGuard(limit=10).feed(b"a\r\n")
    assert not ChunkSizeGuard(limit=10).feed(b"b\r\n")


def test_data_that_looks_like_a_size_is_skipped() -> None:
    # the chunk data holds a "size line": it is data, not framing
    guard = ChunkSizeGuard()
    assert guard.feed(b"14\r\nffffffffffffffff\r\n\r\n\r\n0\r\n\r\n")
    assert guard.done


def test_hop_by_hop_response_headers_are_dropped() -> None:
    raw = (
        b"HTTP/1.1 200 OK\r\nKeep-Alive: timeout=5\r\nProxy-Connection: x\r\nTE: trailers\r\n"
        b"Trailer: X-Sum\r\nProxy-Authenticate: Basic\r\nUpgrade: h2c\r\n"
        b"Connection: keep-alive, X-Secret\r\nX-Secret: 1\r\nX-Kept: yes\r\nTea: yes\r\n\r\n"
    )
    head, flags = rewrite_response_head(raw)
    assert head == b"HTTP/1.1 200 OK\r\nX-Kept: yes\r\nTea: yes\r\n"
    assert flags == 0


def test_content_length_named_in_connection_still_frames_the_body() -> None:
    raw = b"HTTP/1.1 200 OK\r\nConnection: content-length\r\nContent-Length: 5\r\n\r\n"
    assert rewrite_response_head(raw) == (b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n", 2)


@pytest.mark.parametrize(
    ("raw", "announces"),
    [
        (b"HTTP/1.1 204 No Content\r\nContent-Length: 0\r\n\r\n", False),
        (b"HTTP/1.1 204 No Content\r\ncontent-length:   00 \r\n\r\n", False),
        (b"HTTP/1.1 304 Not Modified\r\nContent-Length: 5\r\n\r\n", True),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n", True),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n", True),
    ],
)
def test_announces_body(raw: bytes, announces: bool) -> None:
    assert announces_body(raw) is announces


def test_response_head_limit_config_key() -> None:
    from zdproxy.config import ConfigError, load_config_text

    base = (
        "listen: 127.0.0.1:8080\npools:\n  blue:\n    weight: 100\n"
        "    backends: [{address: 127.0.0.1:9001}]\n"
    )
    config = load_config_text(base, "test.yaml")
    assert config.limits.max_response_header_bytes == 65536
    config = load_config_text(base + "limits:\n  max_response_header_bytes: 2048\n", "t.yaml")
    assert config.limits.max_response_header_bytes == 2048
    with pytest.raises(ConfigError) as info:
        load_config_text(base + "limits:\n  max_response_header_bytes: 100\n", "t.yaml")
    (problem,) = info.value.problems
    assert "t.yaml:7" in str(problem) and "limits.max_response_header_bytes" in str(problem)
