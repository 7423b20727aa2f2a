"""The active health-check state machine: rise and fall thresholds.

One failed check must never flip a backend, and a backend that comes (back)
must prove itself before it takes traffic. The transitions are a table, in the
manner of h11's ``_state.py``: for each (state, result) the table names the
streak that result extends, the threshold that streak must reach, and the state
the backend then goes to.

* ``starting`` -> ``up`` after ``rise`` passes in a row; -> ``down`` after
  ``fall`` failures in a row (a backend that never came up is reported down
  rather than starting for ever).
* ``up`` -> ``down`` after ``fall`` failures in a row.
* ``down`` -> ``up`` after ``rise`` passes in a row.

A result of the other kind resets the streak. No I/O, no clock: unit-tested
with plain values.
"""

from __future__ import annotations

import enum
from typing import Final

from zdproxy.balancing.model import Health


class Result(enum.Enum):
    PASS = "pass"
    FAIL = "fail"


class Threshold(enum.Enum):
    RISE = "rise"
    FALL = "fall"


#: (state, result) -> (threshold the streak must reach, next state); None: no move
TRANSITIONS: Final[dict[tuple[Health, Result], tuple[Threshold, Health] | None]] = {
    (Health.STARTING, Result.PASS): (Threshold.RISE, Health.UP),
    (Health.STARTING, Result.FAIL): (Threshold.FALL, Health.DOWN),
    (Health.UP, Result.PASS): None,
    (Health.UP, Result.FAIL): (Threshold.FALL, Health.DOWN),
    (Health.DOWN, Result.PASS): (Threshold.RISE, Health.UP),
    (Health.DOWN, Result.FAIL): None,
}


class HealthMachine:
    """Rise/fall state of one backend's active checks."""

    __slots__ = ("fails", "fall", "passes", "rise", "state")

    def __init__(self, rise: int, fall: int, state: Health = Health.STARTING) -> None:
        if rise < 1 or fall < 1:
            raise ValueError("rise and fall must be at least 1")
        self.rise = rise
        self.fall = fall
        self.state = state
        #: consecutive passes / failures, the current streak (one of them is 0)
        self.passes = 0
        self.fails = 0

    def record(self, result: Result) -> Health | None:
        """Count one check result; the new state when it changed, else None."""
        if result is Result.PASS:
            self.passes += 1
            self.fails = 0
            streak = self.passes
        else:
            self.fails += 1
            self.passes = 0
            streak = self.fails
        move = TRANSITIONS[(self.state, result)]
        if move is None:
            return None
        threshold, target = move
        needed = self.rise if threshold is Threshold.RISE else self.fall
        if streak < needed:
            return None
        self.state = target
        return target

    def restart(self) -> None:
        """Back to ``starting`` with no streak: a re-enabled backend rises again."""
        self.state = Health.STARTING
        self.passes = 0
        self.fails = 0

    def reconfigure(self, rise: int, fall: int) -> None:
        """New thresholds (config reload); the state and streaks are kept."""
        if rise < 1 or fall < 1:
            raise ValueError("rise and fall must be at least 1")
        self.rise = rise
        self.fall = fall
