"""Typed commands: every change an operator, a rollout or a rolling update makes
to the runtime is one of these small frozen values, applied with
``Runtime.apply(command, actor)``.

``apply`` validates the whole command first and raises ``ControlError``
(``NotFound`` 404, ``Conflict`` 409, else 400; ``errors.py``) with nothing
changed; otherwise it changes the state with one snapshot publication (or none,
inside ``Runtime.batch()``), records one audit event and returns it (None when
the command changed nothing: draining a draining backend, the split in force).

Fields typed ``Any`` are checked by the runtime (a wrong type is a
``ControlError``, never a crash): the admin API's request models check them
first, but rollouts, the CLI and tests reach the runtime too.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True, slots=True)
class SetWeights:
    """Every pool's percent of new traffic at once (``PUT /split``); pools left out
    get 0. ``force``: even to a pool with no usable backend, or over a rollout."""

    weights: Mapping[str, Any]
    force: bool = False


@dataclass(frozen=True, slots=True)
class Flip:
    """100 % of new traffic to pool ``to`` (``POST /flip``)."""

    to: Any
    force: bool = False


@dataclass(frozen=True, slots=True)
class Drain:
    """No new requests; in-flight ones finish; ``draining`` then ``drained``."""

    backend_id: Any


@dataclass(frozen=True, slots=True)
class Disable:
    """Out of rotation at once (maintenance)."""

    backend_id: Any


@dataclass(frozen=True, slots=True)
class Enable:
    """Back into rotation (clears the operator's bit only)."""

    backend_id: Any


@dataclass(frozen=True, slots=True)
class AddBackend:
    """A new backend in ``pool`` (``POST /backends``); ``backend_id`` None: POOL-N.
    The event's ``target`` is the new backend's id."""

    pool: Any
    address: Any
    backend_id: Any = None
    weight: Any = 1


@dataclass(frozen=True, slots=True)
class RemoveBackend:
    """Drain then delete (``DELETE /backends/ID``). The event's ``after`` is None
    when it is gone at once, else the backend with ``removing: true``."""

    backend_id: Any


@dataclass(frozen=True, slots=True)
class RolloutWeights:
    """The rollout engine's weight change: an event named ``action``
    (``rollout.step``, ``rollout.rollback``...) whose ``after`` is the weights plus
    ``extra``. Pins to the pools in ``revoke`` end at once."""

    weights: Mapping[str, int]
    action: str
    target: str
    note: str | None = None
    revoke: frozenset[str] = frozenset()
    extra: Mapping[str, Any] = field(default_factory=dict)


Command = SetWeights | Flip | Drain | Disable | Enable | AddBackend | RemoveBackend | RolloutWeights
