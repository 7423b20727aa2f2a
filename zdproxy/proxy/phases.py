"""The phases of an ``Exchange`` (one request and its response) and the table of
moves between them, h11-style (``h11/_state.py``): one method
(``Exchange._to``) moves the phase and refuses a move the table does not list.

The request side has no phase of its own: its body may still stream in while
the response is awaited or relayed (``Exchange.request_done`` says when it
ended). docs/internals.md, "The exchange's phases", has the table and why.
"""

from __future__ import annotations

from enum import IntEnum
from typing import Final


class Phase(IntEnum):
    #: the request head is being parsed
    PARSING = 0
    #: the head was accepted; the request waits for its turn on the connection
    #: (pipelining: the one before it is being answered)
    QUEUED = 1
    #: a backend is being chosen (the first attempt or a retry); never seen from
    #: outside, the move out of it happens in the same call
    DISPATCHING = 2
    #: a new connection to the chosen backend is being opened
    CONNECTING = 3
    #: the request went out on an upstream connection (its body may still be
    #: streaming); no response head yet (1xx heads do not count)
    AWAITING = 4
    #: the response head arrived: it and the body are relayed to the client
    RELAYING = 5
    #: answered, refused, cut or abandoned by the client: nothing more happens
    DONE = 6
    #: a 101 switched the connection to a tunnel, which now holds the backend
    TUNNEL = 7


PARSING: Final = Phase.PARSING
QUEUED: Final = Phase.QUEUED
DISPATCHING: Final = Phase.DISPATCHING
CONNECTING: Final = Phase.CONNECTING
AWAITING: Final = Phase.AWAITING
RELAYING: Final = Phase.RELAYING
DONE: Final = Phase.DONE
TUNNEL: Final = Phase.TUNNEL

#: every legal move. Any phase before DONE may end in DONE (an error answered in
#: place, a cut response, the client gone); a retry goes back to DISPATCHING.
TRANSITIONS: Final[dict[Phase, frozenset[Phase]]] = {
    PARSING: frozenset({QUEUED, DONE}),
    QUEUED: frozenset({DISPATCHING, DONE}),
    DISPATCHING: frozenset({CONNECTING, AWAITING, DONE}),
    CONNECTING: frozenset({AWAITING, DISPATCHING, DONE}),
    AWAITING: frozenset({RELAYING, DISPATCHING, DONE}),
    RELAYING: frozenset({DONE, TUNNEL}),
    DONE: frozenset(),
    TUNNEL: frozenset(),
}

#: the phases in which the exchange holds one ``in_flight`` slot of its backend
#: (TUNNEL: the tunnel holds it until it closes). ``Exchange._to`` takes the slot
#: on the move into these and gives it back on the move out: it cannot leak or
#: be given back twice.
HOLDING: Final = frozenset({CONNECTING, AWAITING, RELAYING, TUNNEL})


def _mask(phases: frozenset[Phase]) -> int:
    mask = 0
    for phase in phases:
        mask |= 1 << phase
    return mask


#: the table as bit masks, indexed by phase: a move is checked with a shift
ALLOWED: Final[tuple[int, ...]] = tuple(_mask(TRANSITIONS[phase]) for phase in Phase)
HOLDING_MASK: Final = _mask(HOLDING)


class PhaseError(RuntimeError):
    """A move the table does not allow: a bug in the data path, never the peer's doing."""

    def __init__(self, old: Phase, new: Phase) -> None:
        super().__init__(f"exchange cannot move from {old.name} to {new.name}")
        self.old = old
        self.new = new
