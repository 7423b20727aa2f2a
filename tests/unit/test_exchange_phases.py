"""The exchange's phases, its one detach path and its deadlines, in process: the
real protocol objects fed bytes, a fake transport that records what they write,
a clock the test advances (tests/support_exchange.py). Exact bytes throughout."""

from __future__ import annotations

import itertools
import zlib

import pytest
from support_exchange import CONFIG, Proxy, current

from zdproxy.balancing.failures import Failure
from zdproxy.config.schema import ShadowConfig
from zdproxy.proxy.deadlines import BODY, HEADER, IDLE, LINGER, TUNNEL, UPSTREAM
from zdproxy.proxy.downstream import LINGER_SECONDS
from zdproxy.proxy.exchange import Exchange
from zdproxy.proxy.phases import (
    AWAITING,
    DONE,
    HOLDING,
    ILLEGAL,
    MOVES,
    PARSING,
    RELAYING,
    TRANSITIONS,
    Phase,
    PhaseError,
)
from zdproxy.proxy.shadow import ShadowSender

QUIET = CONFIG + "http: {request_id: {enabled: false}}\n"
NO_RETRIES = QUIET + "retries: {attempts: 0}\n"

GET = b"GET /x HTTP/1.1\r\nHost: example.com\r\n\r\n"
#: what the backend receives for GET
GET_UP = (
    b"GET /x HTTP/1.1\r\nHost: example.com\r\nX-Forwarded-For: 192.0.2.7\r\n"
    b"X-Forwarded-Proto: http\r\nX-Forwarded-Host: example.com\r\n\r\n"
)
OK_HEAD = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n"
#: the response head as relayed to the client
OK_HEAD_OUT = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nX-Zdproxy-Pool: blue\r\n\r\n"


def error(status: str, cause: str, message: str, close: bool = True) -> bytes:
    body = f"{status}: {message}\n".encode()
    return (
        f"HTTP/1.1 {status}\r\nContent-Type: text/plain; charset=utf-8\r\n"
        f"Content-Length: {len(body)}\r\nX-Zdproxy-Error: {cause}\r\n".encode()
        + (b"Connection: close\r\n" if close else b"")
        + b"\r\n"
        + body
    )


def reachable(old: Phase, new: Phase) -> bool:
    """``new`` follows ``old`` through moves the table lists (zero or more)."""
    seen, todo = {old}, [old]
    while todo:
        for nxt in TRANSITIONS[todo.pop()]:
            if nxt not in seen:
                seen.add(nxt)
                todo.append(nxt)
    return new in seen


def in_flight(proxy: Proxy) -> dict[str, int]:
    return {b.id: b.in_flight for b in proxy.runtime.backends.values()}


# ---- the table itself -------------------------------------------------------


def test_the_table_is_complete_and_only_done_and_tunnel_are_final() -> None:
    assert set(TRANSITIONS) == set(Phase)
    assert [p for p in Phase if not TRANSITIONS[p]] == [Phase.DONE, Phase.TUNNEL]
    # every phase can end (DONE is reachable from all but the tunnel)
    assert all(reachable(p, Phase.DONE) for p in Phase if p is not Phase.TUNNEL)
    # the lookup the exchange does says exactly what the table says, and moves
    # the in_flight slot on the way into and out of the holding phases only
    for old in Phase:
        moves = {new: MOVES[old << 3 | new] for new in Phase}
        assert {new for new, move in moves.items() if move != ILLEGAL} == TRANSITIONS[old]
        for new in TRANSITIONS[old]:
            assert moves[new] == (new in HOLDING) - (old in HOLDING)
    assert MOVES[AWAITING << 3 | RELAYING] == 0 and MOVES[RELAYING << 3 | DONE] == -1
    assert MOVES[PARSING << 3 | RELAYING] == ILLEGAL and MOVES[DONE << 3 | DONE] == ILLEGAL
    # a response is relayed only after a backend was chosen and asked
    assert Phase.RELAYING not in TRANSITIONS[Phase.DISPATCHING]
    assert {Phase.CONNECTING, Phase.AWAITING, Phase.RELAYING, Phase.TUNNEL} == HOLDING


def test_an_illegal_move_raises_and_changes_nothing() -> None:
    proxy = Proxy(QUIET)
    conn, _ = proxy.client()
    conn.data_received(b"GET / HTTP/1.1\r\n")
    exchange = current(conn)
    assert exchange.phase == Phase.PARSING
    with pytest.raises(PhaseError, match="from PARSING to TUNNEL"):
        exchange.become_tunnel()  # a tunnel needs a relayed 101
    assert exchange.phase == Phase.PARSING


def test_nothing_moves_out_of_done() -> None:
    proxy = Proxy(QUIET)
    proxy.pooled("blue-1")
    conn, _ = proxy.client()
    conn.data_received(GET)
    exchange = current(conn)
    conn.connection_lost(None)
    assert exchange.phase == Phase.DONE
    with pytest.raises(PhaseError, match="from DONE to TUNNEL"):
        exchange.become_tunnel()
    # the late events of a finished exchange are ignored, never a second end
    exchange.on_upstream_timeout()
    exchange.on_body_timeout()
    exchange.on_client_lost()
    assert exchange.phase == Phase.DONE
    assert in_flight(proxy) == {"blue-1": 0, "blue-2": 0}


# ---- phases of whole exchanges ----------------------------------------------


def test_a_request_on_a_pooled_connection() -> None:
    proxy = Proxy(QUIET)
    upstream, up = proxy.pooled("blue-1")
    conn, client = proxy.client()
    conn.data_received(GET[:20])
    exchange = current(conn)
    phases = [exchange.phase]
    conn.data_received(GET[20:])
    phases.append(exchange.phase)
    assert up.take() == GET_UP
    assert in_flight(proxy) == {"blue-1": 1, "blue-2": 0}
    upstream.data_received(OK_HEAD + b"he")
    phases.append(exchange.phase)
    assert client.take() == OK_HEAD_OUT + b"he"
    upstream.data_received(b"llo")
    phases.append(exchange.phase)
    assert phases == [Phase.PARSING, Phase.AWAITING, Phase.RELAYING, Phase.DONE]
    assert all(reachable(a, b) for a, b in itertools.pairwise(phases))
    assert client.take() == b"llo"
    # the slot is given back once, the connection is back in the pool
    assert in_flight(proxy) == {"blue-1": 0, "blue-2": 0}
    assert proxy.pools.idle_count("blue-1") == 1 and not up.closed
    assert proxy.backend("blue-1").codes == {200: 1}
    assert conn.deadline_kind == IDLE and not client.closed


async def test_a_request_on_a_new_connection() -> None:
    proxy = Proxy(QUIET)
    proxy.connects = [None]
    conn, client = proxy.client()
    conn.data_received(GET)
    exchange = current(conn)
    assert exchange.phase == Phase.CONNECTING
    assert in_flight(proxy) == {"blue-1": 1, "blue-2": 0}
    await proxy.run_tasks()
    assert exchange.phase == Phase.AWAITING
    (upstream,) = proxy.opened
    assert upstream.transport is not None
    upstream.data_received(OK_HEAD + b"hello")
    assert exchange.phase == Phase.DONE
    assert client.take() == OK_HEAD_OUT + b"hello"
    assert in_flight(proxy) == {"blue-1": 0, "blue-2": 0}


async def test_the_client_leaving_while_connecting_closes_the_late_connection() -> None:
    proxy = Proxy(QUIET)
    proxy.connects = [None]
    conn, _ = proxy.client()
    conn.data_received(GET)
    exchange = current(conn)
    conn.connection_lost(None)
    assert exchange.phase == Phase.DONE
    assert in_flight(proxy) == {"blue-1": 0, "blue-2": 0}
    await proxy.run_tasks()  # connects after the exchange ended: closed, not attached
    (upstream,) = proxy.opened
    assert upstream.closed and upstream.exchange is None
    assert exchange.phase == Phase.DONE


def test_a_reset_before_the_head_is_retried_on_the_other_backend() -> None:
    proxy = Proxy(QUIET)
    first, first_t = proxy.pooled("blue-1")
    second, second_t = proxy.pooled("blue-2")
    conn, client = proxy.client()
    conn.data_received(GET)
    exchange = current(conn)
    # the selector went round-robin: which connection got the request
    sent, spare = (first, second) if first_t.take() else (second, first)
    sent_id = sent.backend.id
    other_id = spare.backend.id
    sent.connection_lost(ConnectionResetError())
    # AWAITING -> DISPATCHING -> AWAITING, on the other backend's pooled connection
    assert exchange.phase == Phase.AWAITING and exchange.backend is spare.backend
    assert exchange.attempts == 2 and proxy.ctx.counters.retries == 1
    assert in_flight(proxy) == {sent_id: 0, other_id: 1}
    assert proxy.backend(sent_id).upstream_errors == {"reset": 1}
    assert proxy.observer.failures == [(sent_id, Failure.RESET)]
    assert spare.transport is not None
    spare_t = first_t if spare is first else second_t
    assert spare_t.take() == GET_UP
    spare.data_received(OK_HEAD + b"hello")
    assert client.take() == OK_HEAD_OUT + b"hello"
    assert exchange.phase == Phase.DONE
    assert in_flight(proxy) == {sent_id: 0, other_id: 0}


def _put_reset(config: str) -> tuple[Proxy, bytes, bytes]:
    """A PUT whose body reaches the backend in two reads, then a reset: what the
    other backend then receives, and what the client gets."""
    proxy = Proxy(config)
    first, first_t = proxy.pooled("blue-1")
    second, second_t = proxy.pooled("blue-2")
    conn, client = proxy.client()
    conn.data_received(b"PUT /p HTTP/1.1\r\nHost: example.com\r\nContent-Length: 6\r\n\r\nabc")
    conn.data_received(b"def")
    sent, spare_t = (first, second_t) if first_t.take() else (second, first_t)
    sent.connection_lost(ConnectionResetError())
    return proxy, spare_t.take(), client.take()


def test_a_body_sent_after_the_head_is_kept_and_sent_again_on_a_retry() -> None:
    proxy, resent, answered = _put_reset(QUIET)
    assert resent == (
        b"PUT /p HTTP/1.1\r\nHost: example.com\r\nX-Forwarded-For: 192.0.2.7\r\n"
        b"X-Forwarded-Proto: http\r\nX-Forwarded-Host: example.com\r\n"
        b"Content-Length: 6\r\n\r\nabcdef"
    )
    assert answered == b"" and proxy.ctx.counters.retries == 1


def test_a_body_beyond_the_retry_buffer_is_not_sent_again() -> None:
    proxy, resent, answered = _put_reset(QUIET + "retries: {buffer_body_bytes: 4}\n")
    assert resent == b"" and proxy.ctx.counters.retries == 0
    assert answered == error(
        "502 Bad Gateway", "upstream-reset", "upstream closed the connection", close=False
    )


def test_a_post_reset_on_a_fresh_connection_is_answered_502_and_not_retried() -> None:
    proxy = Proxy(QUIET)
    upstream, _up = proxy.pooled("blue-1")
    conn, client = proxy.client()
    conn.data_received(b"POST /p HTTP/1.1\r\nHost: example.com\r\nContent-Length: 2\r\n\r\nab")
    exchange = current(conn)
    assert exchange.phase == Phase.AWAITING
    assert upstream.reused  # taken from the pool: the race is possible, but...
    assert exchange.expects_body  # ...a request with a body is never resent for it
    upstream.connection_lost(ConnectionResetError())
    assert exchange.phase == Phase.DONE and exchange.attempts == 1
    assert client.take() == error(
        "502 Bad Gateway", "upstream-reset", "upstream closed the connection", close=False
    )
    assert in_flight(proxy) == {"blue-1": 0, "blue-2": 0}
    assert proxy.ctx.counters.retries == 0


async def test_a_refused_connect_is_retried_then_answered_502() -> None:
    proxy = Proxy(QUIET + "retries: {attempts: 1}\n")
    proxy.connects = [ConnectionRefusedError(111, "refused"), ConnectionRefusedError(111, "no")]
    conn, client = proxy.client()
    conn.data_received(GET)
    exchange = current(conn)
    await proxy.run_tasks()
    assert exchange.phase == Phase.DONE and exchange.attempts == 2
    # each attempt took a slot and gave it back once: never below zero
    assert in_flight(proxy) == {"blue-1": 0, "blue-2": 0}
    kinds = [kind for _, kind in proxy.observer.failures]
    # (the 502 answered then counts as a 5xx, like any other)
    assert kinds == [Failure.CONNECT_REFUSED, Failure.CONNECT_REFUSED, Failure.STATUS_5XX]
    # the retry went to the other backend (the failed one is excluded)
    first, second = (backend_id for backend_id, _ in proxy.observer.failures[:2])
    assert {first, second} == {"blue-1", "blue-2"}
    message = f"cannot connect to backend {second}: [Errno 111] no"
    assert client.take() == error("502 Bad Gateway", "upstream-connect", message, close=False)


def test_the_client_leaving_mid_relay_aborts_the_upstream_connection() -> None:
    proxy = Proxy(QUIET)
    upstream, up = proxy.pooled("blue-1")
    conn, client = proxy.client()
    conn.data_received(GET)
    exchange = current(conn)
    upstream.data_received(OK_HEAD + b"he")
    assert exchange.phase == Phase.RELAYING
    conn.connection_lost(None)
    assert exchange.phase == Phase.DONE
    # half a response on it: reset, never pooled
    assert up.aborted and upstream.exchange is None
    assert proxy.pools.idle_count("blue-1") == 0
    assert in_flight(proxy) == {"blue-1": 0, "blue-2": 0}
    upstream.data_received(b"llo")  # the rest arrives: nobody to give it to
    assert client.take() == OK_HEAD_OUT + b"he"


def test_an_upstream_close_mid_body_cuts_the_client_and_counts_a_502() -> None:
    proxy = Proxy(QUIET)
    upstream, _up = proxy.pooled("blue-1")
    conn, client = proxy.client()
    conn.data_received(GET)
    exchange = current(conn)
    upstream.data_received(OK_HEAD + b"he")
    upstream.connection_lost(None)
    assert exchange.phase == Phase.DONE
    assert client.take() == OK_HEAD_OUT + b"he"  # nothing after: no error appended
    assert client.aborted
    assert proxy.backend("blue-1").codes == {502: 1}
    assert proxy.observer.failures == [("blue-1", Failure.STATUS_5XX)]
    assert in_flight(proxy) == {"blue-1": 0, "blue-2": 0}


def test_a_bad_response_head_is_answered_502_in_its_place() -> None:
    proxy = Proxy(NO_RETRIES)
    upstream, up = proxy.pooled("blue-1")
    conn, client = proxy.client()
    conn.data_received(GET)
    exchange = current(conn)
    upstream.data_received(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n")
    assert exchange.phase == Phase.DONE
    assert client.take() == error(
        "502 Bad Gateway",
        "bad-upstream-response",
        "invalid response from backend: response Transfer-Encoding other than chunked",
        close=False,
    )
    assert proxy.backend("blue-1").upstream_errors == {"bad_response": 1}
    assert up.closed and in_flight(proxy) == {"blue-1": 0, "blue-2": 0}


def test_a_websocket_upgrade_hands_the_slot_to_the_tunnel() -> None:
    proxy = Proxy(QUIET)
    upstream, _up = proxy.pooled("blue-1")
    conn, client = proxy.client()
    conn.data_received(
        b"GET /ws HTTP/1.1\r\nHost: example.com\r\nConnection: upgrade\r\n"
        b"Upgrade: websocket\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
    )
    exchange = current(conn)
    upstream.data_received(
        b"HTTP/1.1 101 Switching Protocols\r\nConnection: upgrade\r\nUpgrade: websocket\r\n"
        b"Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\r\nfrom-server"
    )
    assert exchange.phase == Phase.TUNNEL
    assert client.take() == (
        b"HTTP/1.1 101 Switching Protocols\r\nSec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
        b"\r\nX-Zdproxy-Pool: blue\r\nConnection: upgrade\r\nUpgrade: websocket\r\n\r\nfrom-server"
    )
    # the tunnel holds the backend now; closing it gives the slot back
    assert in_flight(proxy) == {"blue-1": 1, "blue-2": 0}
    assert conn.deadline_kind == TUNNEL and conn.deadline == proxy.ctx.now + 50
    proxy.advance(49.9)
    assert not client.closed
    proxy.advance(0.1)
    assert client.closed and not client.aborted
    conn.connection_lost(None)
    assert in_flight(proxy) == {"blue-1": 0, "blue-2": 0}


# ---- deadlines ---------------------------------------------------------------


def test_header_deadline_answers_408_then_lingers_then_aborts() -> None:
    proxy = Proxy(QUIET)
    conn, client = proxy.client()
    conn.data_received(b"GET / HTTP/1.1\r\nHost: a")
    assert conn.deadline_kind == HEADER
    proxy.advance(9.99)
    assert client.take() == b"" and not client.closed
    proxy.advance(0.01)
    assert client.take() == error(
        "408 Request Timeout", "request-header-timeout", "request header timeout"
    )
    # our side shut (FIN), the client's bytes read and dropped, for a while
    assert client.eof_written and not client.closed and conn.deadline_kind == LINGER
    proxy.advance(LINGER_SECONDS)
    assert client.aborted


def test_header_deadline_without_a_byte_closes_silently() -> None:
    proxy = Proxy(QUIET)
    _conn, client = proxy.client()
    proxy.advance(10)
    assert client.take() == b"" and client.closed and not client.aborted


def test_idle_deadline_closes_a_keep_alive_connection() -> None:
    proxy = Proxy(QUIET)
    upstream, _ = proxy.pooled("blue-1")
    conn, client = proxy.client()
    conn.data_received(GET)
    upstream.data_received(OK_HEAD + b"hello")
    client.take()
    assert conn.deadline_kind == IDLE
    proxy.advance(39.9)
    assert not client.closed
    proxy.advance(0.1)
    assert client.closed and client.take() == b""


def test_upstream_deadline_answers_504_when_not_retried() -> None:
    proxy = Proxy(NO_RETRIES)
    _upstream, up = proxy.pooled("blue-1")
    conn, client = proxy.client()
    conn.data_received(GET)
    exchange = current(conn)
    assert conn.deadline_kind == UPSTREAM
    proxy.advance(29.9)
    assert exchange.phase == Phase.AWAITING and client.take() == b""
    proxy.advance(0.1)
    assert exchange.phase == Phase.DONE
    assert client.take() == error(
        "504 Gateway Timeout", "upstream-timeout", "backend did not answer in time", close=False
    )
    assert up.closed and not up.aborted  # closed after what was written
    assert proxy.backend("blue-1").upstream_errors == {"timeout": 1}
    assert proxy.observer.failures[0] == ("blue-1", Failure.TIMEOUT)
    assert in_flight(proxy) == {"blue-1": 0, "blue-2": 0}
    assert conn.deadline_kind == IDLE  # the client connection stays


def test_upstream_deadline_retries_an_idempotent_request_elsewhere() -> None:
    proxy = Proxy(QUIET)
    _first, first_t = proxy.pooled("blue-1")
    _second, second_t = proxy.pooled("blue-2")
    conn, client = proxy.client()
    conn.data_received(GET)
    exchange = current(conn)
    hung_t, spare_t = (first_t, second_t) if first_t.take() else (second_t, first_t)
    proxy.advance(30)
    # the silent connection is reset; the request went out again on the other one
    assert hung_t.aborted
    assert spare_t.take() == GET_UP
    assert exchange.phase == Phase.AWAITING and exchange.attempts == 2
    assert sum(in_flight(proxy).values()) == 1
    assert client.take() == b""


def test_upstream_deadline_mid_relay_cuts_without_an_error_answer() -> None:
    proxy = Proxy(QUIET)
    upstream, up = proxy.pooled("blue-1")
    conn, client = proxy.client()
    conn.data_received(GET)
    exchange = current(conn)
    upstream.data_received(OK_HEAD + b"he")
    assert conn.deadline_kind == UPSTREAM
    proxy.advance(30)
    assert exchange.phase == Phase.DONE
    # no 504 after a 200 head: the client sees the cut
    assert client.take() == OK_HEAD_OUT + b"he"
    assert client.aborted and up.aborted
    assert proxy.backend("blue-1").codes == {502: 1}
    assert in_flight(proxy) == {"blue-1": 0, "blue-2": 0}
    assert exchange.attempts == 1 and proxy.ctx.counters.retries == 0


def test_body_deadline_answers_408_and_closes_the_upstream_connection() -> None:
    proxy = Proxy(QUIET)
    _upstream, up = proxy.pooled("blue-1")
    conn, client = proxy.client()
    conn.data_received(b"POST /p HTTP/1.1\r\nHost: example.com\r\nContent-Length: 10\r\n\r\nabc")
    exchange = current(conn)
    assert exchange.phase == Phase.AWAITING and conn.deadline_kind == BODY
    proxy.advance(19.9)
    assert client.take() == b""
    proxy.advance(0.1)
    assert exchange.phase == Phase.DONE
    assert client.take() == error(
        "408 Request Timeout", "request-body-timeout", "request body timeout"
    )
    assert up.closed  # it holds part of a request: never reused
    assert proxy.pools.idle_count("blue-1") == 0
    assert in_flight(proxy) == {"blue-1": 0, "blue-2": 0}


def test_the_upstream_deadline_starts_when_the_body_is_complete() -> None:
    proxy = Proxy(NO_RETRIES)
    _upstream, _up = proxy.pooled("blue-1")
    conn, client = proxy.client()
    conn.data_received(b"POST /p HTTP/1.1\r\nHost: example.com\r\nContent-Length: 4\r\n\r\nab")
    assert conn.deadline_kind == BODY
    proxy.advance(15)
    conn.data_received(b"cd")
    # the wait for the answer begins now, not when the head went out
    assert conn.deadline_kind == UPSTREAM and conn.deadline == proxy.ctx.now + 30
    proxy.advance(29.9)
    assert client.take() == b""
    proxy.advance(0.1)
    assert client.take().startswith(b"HTTP/1.1 504 Gateway Timeout\r\n")


# ---- shadow copies: a hook on the exchange, never a class swap ------------------


SHADOWED = QUIET.replace(
    "pools:\n", "pools:\n  dark: {weight: 0, backends: [{address: 127.0.0.1:9003}]}\n"
)


def test_a_copied_request_keeps_its_class_and_feeds_its_copy() -> None:
    proxy = Proxy(SHADOWED)
    sender = ShadowSender(proxy.ctx)
    sender.configure(ShadowConfig(pool="dark", percent=100, compare_body=True))
    proxy.ctx.shadow = sender
    upstream, up = proxy.pooled("blue-1")
    conn, client = proxy.client()
    conn.data_received(b"POST /p HTTP/1.1\r\nHost: example.com\r\nContent-Length: 4\r\n\r\nab")
    exchange = current(conn)
    copy = exchange.shadow
    # the class never changes (compiled classes refuse __class__ assignment)
    assert type(exchange) is Exchange and copy is not None
    # started (dispatched) and holding the body so far; sent once the body is whole
    assert copy.started and copy.body == [b"ab"] and not proxy.loop.tasks
    conn.data_received(b"cd")
    assert copy.request_done and sender.sent == 1
    (task,) = proxy.loop.tasks
    task.cancel()  # the copy's own connection is not the point here
    upstream.data_received(OK_HEAD + b"hello")
    assert client.take() == OK_HEAD_OUT + b"hello"
    # the live answer is recorded on the copy, for the comparison
    assert copy.live_status == 200 and copy.live_crc == zlib.crc32(b"hello")
    assert up.take().endswith(b"\r\n\r\nabcd")
