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


# The data path stores and compares plain ints (the values above): in CPython
# 3.11 reading an enum member costs ten times a global load, and mypyc inlines
# these constants. ``Phase(value)`` names one.
PARSING: Final = 0
QUEUED: Final = 1
DISPATCHING: Final = 2
CONNECTING: Final = 3
AWAITING: Final = 4
RELAYING: Final = 5
DONE: Final = 6
TUNNEL: Final = 7

#: every legal move. Any phase before DONE may end in DONE (an error answered in
#: place, a cut response, the client gone); a retry goes back to DISPATCHING.
TRANSITIONS: Final[dict[Phase, frozenset[Phase]]] = {
    Phase.PARSING: frozenset({Phase.QUEUED, Phase.DONE}),
    Phase.QUEUED: frozenset({Phase.DISPATCHING, Phase.DONE}),
    Phase.DISPATCHING: frozenset({Phase.CONNECTING, Phase.AWAITING, Phase.DONE}),
    Phase.CONNECTING: frozenset({Phase.AWAITING, Phase.DISPATCHING, Phase.DONE}),
    Phase.AWAITING: frozenset({Phase.RELAYING, Phase.DISPATCHING, Phase.DONE}),
    Phase.RELAYING: frozenset({Phase.DONE, Phase.TUNNEL}),
    Phase.DONE: frozenset(),
    Phase.TUNNEL: frozenset(),
}

#: the phases in which the exchange holds one ``in_flight`` slot of its backend
#: (TUNNEL: the tunnel holds it until it closes). ``Exchange._to`` takes the slot
#: on the move into these and gives it back on the move out: it cannot leak or
#: be given back twice.
HOLDING: Final = frozenset({Phase.CONNECTING, Phase.AWAITING, Phase.RELAYING, Phase.TUNNEL})

#: a move that is not in the table (in ``MOVES``)
ILLEGAL: Final = 2


def _move(old: Phase, new: Phase) -> int:
    """What the move does to the backend's in_flight slot (+1, -1, 0), or ILLEGAL."""
    if new not in TRANSITIONS[old]:
        return ILLEGAL
    return (new in HOLDING) - (old in HOLDING)


#: the table as one tuple, indexed by ``old << 3 | new``: a move costs one lookup
MOVES: Final[tuple[int, ...]] = tuple(_move(old, new) for old in Phase for new in Phase)


class PhaseError(Exception):
    """A move the table does not allow: a bug in the data path, never the peer's doing.
    (An Exception with a message only: mypyc 2.4 refuses RuntimeError as a base.)"""


def illegal_move(old: int, new: int) -> PhaseError:
    return PhaseError(f"exchange cannot move from {Phase(old).name} to {Phase(new).name}")
