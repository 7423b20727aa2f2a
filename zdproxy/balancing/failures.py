"""The one vocabulary of upstream failures.

Envoy's ``Result`` and pingora's error kinds in one enum: the data path names a
failure once, and the same value is the ``kind`` label of
``zdproxy_upstream_errors_total`` (its string value), what passive health
(``PassiveObserver.failure``, the outlier policy) is told, and what the retry
decision (``balancing.retry.may_retry``) weighs. docs/internals.md, "Failure
kinds", has the table.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Final


class Failure(StrEnum):
    #: the backend refused the connection (or the TLS handshake failed)
    CONNECT_REFUSED = "connect_refused"
    #: no connection within ``timeouts.connect``
    CONNECT_TIMEOUT = "connect_timeout"
    #: the connection closed before the response head
    RESET = "reset"
    #: no response (or no more of it) within ``timeouts.upstream_response``
    TIMEOUT = "timeout"
    #: the response broke HTTP or a limit (answered 502)
    BAD_RESPONSE = "bad_response"
    #: bytes no request asked for, on an idle connection or after a response
    #: (the connection is closed; nobody's request failed)
    STRAY_BYTES = "stray_bytes"
    #: the backend answered 5xx (or its answer was cut, counted as a 502); counted
    #: by status code (``zdproxy_requests_total``), not as an upstream error
    STATUS_5XX = "5xx"


#: failures seen at the connection level, before any answer: the process is
#: likely gone, so outlier detection ejects after fewer of them in a row
#: (``outlier.consecutive_connect_failures``)
LOCAL: Final = frozenset(
    {Failure.CONNECT_REFUSED, Failure.CONNECT_TIMEOUT, Failure.RESET, Failure.TIMEOUT}
)


def parse(kind: str) -> Failure | None:
    """A kind as sent by a worker process (its string value); None when unknown."""
    try:
        return Failure(kind)
    except ValueError:
        return None
