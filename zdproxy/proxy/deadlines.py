"""The kinds of deadline a client connection can be under.

A connection has at most one deadline at a time: a float (``deadline``, on the
coarse clock ``ProxyContext.now``) and its kind (``deadline_kind``). No timer
runs per request: the sweeper calls ``ClientConnection.check_deadline`` once
per tick, which acts on the kind that expired (docs/internals.md, "Deadlines").

The data path stores and compares the plain ints below (``Deadline`` names
them): in CPython 3.11 reading an enum member off its class costs ten times a
global load, an enum compares slower than an int, and mypyc inlines ``Final``
ints.
"""

from __future__ import annotations

from enum import IntEnum
from typing import Final


class Deadline(IntEnum):
    #: nothing is due (a request is being answered without an upstream wait, or
    #: the connection is closing)
    NONE = 0
    #: the request head must be complete (``timeouts.request_header``): 408, or a
    #: silent close when not one byte of it came
    HEADER = 1
    #: a keep-alive connection between requests (``timeouts.idle``): closed
    IDLE = 2
    #: the request body must keep coming (``timeouts.request_body``): 408
    BODY = 3
    #: the backend must answer, then keep sending (``timeouts.upstream_response``):
    #: 504 (or a retry) before the response head, a cut connection after it
    UPSTREAM = 4
    #: a tunnel (WebSocket) without traffic either way (``timeouts.tunnel_idle``)
    TUNNEL = 5
    #: closing after an error: our side is shut, the client's input is read and
    #: dropped until it closes, for ``LINGER_SECONDS`` at most; then aborted
    LINGER = 6
    #: an idle connection closed to make room at ``limits.max_connections``,
    #: whose client does not read: aborted
    RECLAIMED = 7


NO_DEADLINE: Final = 0
HEADER: Final = 1
IDLE: Final = 2
BODY: Final = 3
UPSTREAM: Final = 4
TUNNEL: Final = 5
LINGER: Final = 6
RECLAIMED: Final = 7
