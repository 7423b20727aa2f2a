"""Shadow traffic: copies of a share of live requests to a pool that takes no live
traffic, fire and forget.

Which requests: a countdown accumulator on the context (``ProxyContext.shadow_acc``)
loses ``shadow_step`` (percent x 100) per request and, when it drops below 0,
the request is copied and ``SCALE`` is added back: over N requests exactly
``ceil(N x percent / 100)`` are picked, with no randomness and no allocation. A
request that is not picked costs that one subtraction and comparison in
``Exchange.headers_complete`` and nothing else.

A picked exchange gets a ``ShadowCopy`` (``Exchange.shadow``; None on the
others), which the exchange calls at the points it cares about: it captures the
request body (up to ``max_body_bytes``; a larger one cancels the copy), and once the live request is
complete and its backend chosen, the copy is sent on its own connection to a
backend of the shadow pool, marked with the shadow header and
``Connection: close``. The live exchange never waits for it: the copy runs in a
task, with its own timeout, and at most ``max_concurrent`` copies are in flight
(more are dropped, never queued). The copy's response is read and discarded; its
status, latency and (with ``compare_body``) a CRC-32 of its body are compared
with the live answer's when both are known.
"""

from __future__ import annotations

import asyncio
import logging
import zlib
from typing import TYPE_CHECKING, Any, cast

import httptools

from zdproxy.balancing.model import Backend
from zdproxy.config.schema import ShadowConfig

if TYPE_CHECKING:
    from zdproxy.proxy.context import ProxyContext
    from zdproxy.proxy.exchange import Exchange

log = logging.getLogger("zdproxy.error")

#: the accumulator's unit: ``percent`` counts to two decimals
SCALE = 10000

#: results counted in ``zdproxy_shadow_requests_total{result}``
RESULTS = (
    "match",  # same status (and body hash, when compared) as the live answer
    "status_mismatch",
    "body_mismatch",
    "error",  # connection refused or reset, invalid response
    "timeout",
    "dropped",  # max_concurrent copies already in flight
    "too_large",  # request body above max_body_bytes
    "no_backend",  # no backend of the shadow pool is up
    "skipped",  # not copyable: upgrade, or the live request went to the shadow pool
)

_LAST_CHUNK = b"0\r\n\r\n"


class ShadowCopy:
    """One copied request: what is sent, and both answers as they come in."""

    __slots__ = (
        "body",
        "body_bytes",
        "cancelled",
        "live_crc",
        "live_latency",
        "live_status",
        "request_done",
        "sender",
        "shadow_crc",
        "shadow_latency",
        "shadow_status",
        "started",
    )

    def __init__(self, sender: ShadowSender) -> None:
        self.sender = sender
        self.body: list[bytes] = []
        self.body_bytes = 0
        self.cancelled = False
        self.started = False
        self.request_done = False
        self.live_status = 0
        self.live_latency = 0.0
        self.live_crc = 0
        self.shadow_status = 0
        self.shadow_latency = 0.0
        self.shadow_crc = 0

    def cancel(self, result: str) -> None:
        if not self.cancelled:
            self.cancelled = True
            self.body = []
            self.sender.count(result)

    # ---- the live exchange calls these (only on the requests that were picked) ----

    def on_start(self, exchange: Exchange) -> None:
        """The live request was dispatched (or refused): its backend is known."""
        self.started = True
        backend = exchange.backend
        if backend is not None and backend.pool == self.sender.pool:
            self.cancel("skipped")  # routed to the shadow pool itself (an override)
        elif self.request_done:
            self.sender.fire(exchange, self)

    def on_request_body(self, data: bytes) -> None:
        if self.cancelled:
            return
        self.body_bytes += len(data)
        if self.body_bytes > self.sender.max_body:
            self.cancel("too_large")
        else:
            self.body.append(data)

    def on_request_complete(self, exchange: Exchange) -> None:
        self.request_done = True
        if self.started and not self.cancelled:
            self.sender.fire(exchange, self)

    def on_response_body(self, data: bytes) -> None:
        if self.sender.compare_body:
            self.live_crc = zlib.crc32(data, self.live_crc)

    def on_live_answer(self, exchange: Exchange, status: int, now: float) -> None:
        """The live request is over (``Exchange._record``, at loop time ``now``):
        compare when the copy's answer is in already."""
        self.live_status = status
        self.live_latency = now - exchange.started_at
        if self.shadow_status:
            self.sender.compare(self)


class ShadowResponse(asyncio.Protocol):
    """Reads a shadow response and keeps its status and body CRC; discards the rest."""

    def __init__(self, head_only: bool, hash_body: bool) -> None:
        self.parser = httptools.HttpResponseParser(self)
        self.head_only = head_only
        self.hash_body = hash_body
        self.status = 0
        self.crc = 0
        self.done: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def data_received(self, data: bytes) -> None:
        if self.done.done():
            return
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._finish(exc)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.status >= 200:
            self._finish(None)  # a close-delimited body ends here
        else:
            self._finish(exc or ConnectionResetError("closed before the response"))

    def on_headers_complete(self) -> None:
        status: int = self.parser.get_status_code()
        if status < 200:
            return  # an interim response
        self.status = status
        if self.head_only or status in (204, 304):
            self._finish(None)

    def on_body(self, body: bytes) -> None:
        if self.hash_body:
            self.crc = zlib.crc32(body, self.crc)

    def on_message_complete(self) -> None:
        if self.status >= 200:
            self._finish(None)

    def _finish(self, exc: BaseException | None) -> None:
        if not self.done.done():
            if exc is None:
                self.done.set_result(None)
            else:
                self.done.set_exception(exc)


class ShadowSender:
    """Picks, sends and judges the copies of one process."""

    def __init__(self, ctx: ProxyContext) -> None:
        self.ctx = ctx
        self.pool: str | None = None
        self.percent = 0.0
        self.max_body = 0
        self.compare_body = False
        self.marker = b""
        self.timeout = 5.0
        self.max_concurrent = 1
        self.in_flight = 0
        self.sent = 0
        self.results: dict[str, int] = dict.fromkeys(RESULTS, 0)
        #: sums over the copies compared with their live answer, seconds
        self.live_latency_sum = 0.0
        self.shadow_latency_sum = 0.0
        self.compared = 0
        self._next = 0
        self._tasks: set[asyncio.Task[None]] = set()

    def configure(self, settings: ShadowConfig) -> None:
        self.pool = settings.pool
        self.percent = settings.percent if settings.pool is not None else 0.0
        self.max_body = settings.max_body_bytes
        self.compare_body = settings.compare_body
        self.marker = settings.header.encode("ascii") + b": 1\r\n"
        self.timeout = settings.timeout
        self.max_concurrent = settings.max_concurrent
        ctx = self.ctx
        ctx.shadow_step = round(self.percent * SCALE / 100)
        ctx.shadow_acc = 0

    def count(self, result: str) -> None:
        self.results[result] += 1

    # ---- the data path calls these -------------------------------------------------

    def sample(self, exchange: Exchange) -> None:
        """The accumulator picked ``exchange`` (called from ``headers_complete``)."""
        self.ctx.shadow_acc += SCALE
        if exchange.upgrade is not None:
            self.count("skipped")
            return
        length = exchange.content_length
        if length is not None and length > self.max_body:
            self.count("too_large")
            return
        # the exchange tells the copy what the live request does; requests not
        # picked pay one None test at each of those points
        exchange.shadow = ShadowCopy(self)

    def fire(self, exchange: Exchange, copy: ShadowCopy) -> None:
        """The live request is complete and on its way: send the copy."""
        if self.in_flight >= self.max_concurrent:
            copy.cancel("dropped")
            return
        backend = self._backend()
        if backend is None:
            copy.cancel("no_backend")
            return
        data = self._request_bytes(exchange, copy, backend)
        copy.body = []
        self.in_flight += 1
        self.sent += 1
        task = self.ctx.loop.create_task(
            self._send(copy, backend, data, exchange.method == b"HEAD")
        )
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _backend(self) -> Backend | None:
        pool = self.pool
        view = self.ctx.selector.pool_view(pool) if pool is not None else None
        if view is None or not view.routable:
            return None
        self._next += 1
        return view.routable[self._next % len(view.routable)]

    def _request_bytes(self, exchange: Exchange, copy: ShadowCopy, backend: Backend) -> bytes:
        head = exchange.request_head
        if exchange.host is None:
            # an HTTP/1.0 request without Host: the head has no blank line yet
            head += b"Host: " + backend.address.encode("ascii") + b"\r\n"
        else:
            head = head[:-2]
        parts = [head, self.marker, b"Connection: close\r\n\r\n"]
        if exchange.request_chunked:
            for chunk in copy.body:
                parts += (b"%x\r\n" % len(chunk), chunk, b"\r\n")
            parts.append(_LAST_CHUNK)
        else:
            parts += copy.body
        return b"".join(parts)

    async def _send(self, copy: ShadowCopy, backend: Backend, data: bytes, head: bool) -> None:
        loop = self.ctx.loop
        started = loop.time()
        transport: asyncio.BaseTransport | None = None
        response: ShadowResponse | None = None
        try:
            async with asyncio.timeout(self.timeout):
                tls = self.ctx.upstream_tls.lookup(backend.id, backend.pool, backend.service)
                transport, response = await loop.create_connection(
                    lambda: ShadowResponse(head, self.compare_body),
                    backend.host,
                    backend.port,
                    ssl=None if tls is None else tls.context,
                    server_hostname=None if tls is None else tls.server_name or backend.host,
                )
                # uvloop's transports implement WriteTransport without subclassing it
                cast(asyncio.WriteTransport, transport).write(data)
                await response.done
        except TimeoutError:
            self.count("timeout")
            return
        except Exception as exc:
            if log.isEnabledFor(logging.DEBUG):
                log.debug("shadow request to %s failed: %r", backend.id, exc)
            self.count("error")
            return
        finally:
            self.in_flight -= 1
            if response is not None:
                response.done.cancel()  # no result is wanted any more
            if transport is not None:
                transport.close()
        copy.shadow_latency = loop.time() - started
        assert response is not None
        copy.shadow_crc = response.crc
        copy.shadow_status = response.status
        if copy.live_status:
            self.compare(copy)

    def compare(self, copy: ShadowCopy) -> None:
        """Both answers are in: count how the copy's differs from the live one."""
        if copy.live_status != copy.shadow_status:
            self.count("status_mismatch")
        elif self.compare_body and copy.live_crc != copy.shadow_crc:
            self.count("body_mismatch")
        else:
            self.count("match")
        self.compared += 1
        self.live_latency_sum += copy.live_latency
        self.shadow_latency_sum += copy.shadow_latency

    # ---- for the API and metrics ----------------------------------------------------

    def figures(self) -> dict[str, Any]:
        compared = self.compared
        live = self.live_latency_sum
        judged = compared + self.results["error"] + self.results["timeout"]
        mismatches = self.results["status_mismatch"] + self.results["body_mismatch"]
        return {
            "sent": self.sent,
            "in_flight": self.in_flight,
            "results": dict(self.results),
            "compared": compared,
            "mismatch_rate": round(mismatches / compared, 6) if compared else None,
            "error_rate": round((judged - compared) / judged, 6) if judged else None,
            "live_latency_avg_ms": round(1000 * live / compared, 3) if compared else None,
            "shadow_latency_avg_ms": (
                round(1000 * self.shadow_latency_sum / compared, 3) if compared else None
            ),
            "latency_ratio": round(self.shadow_latency_sum / live, 4) if live > 0 else None,
            "live_latency_seconds_sum": live,
            "shadow_latency_seconds_sum": self.shadow_latency_sum,
        }

    def stop(self) -> None:
        for task in list(self._tasks):
            task.cancel()
