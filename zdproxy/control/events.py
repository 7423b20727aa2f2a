"""The audit log: one ``Event`` per change of routing state.

The runtime records an event for every mutation (who, what, before, after) into
a bounded in-memory ring that ``GET /api/v1/events`` reads. Sinks (the JSON-lines
file next to the state file) subscribe to the ring; they are called
synchronously and must not block, so the file sink hands its writes to a
worker thread (see ``store.BackgroundWriter``).
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

log = logging.getLogger("zdproxy.control")

#: actor of changes zdproxy makes on its own (a drain that completes, a removal at its deadline)
SYSTEM_ACTOR = "zdproxy"

#: read at most this much of the end of the events file at start
_TAIL_BYTES = 8 * 1024 * 1024


def iso_time(epoch: float) -> str:
    """UTC ISO 8601 with milliseconds, as the API and the log files show times."""
    whole = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(epoch))
    return f"{whole}.{int(epoch * 1000) % 1000:03d}Z"


@dataclass(frozen=True, slots=True)
class Event:
    """One audited change. ``before`` and ``after`` are JSON values describing
    the target before and after the change (None when it did not exist)."""

    id: int
    time: float
    actor: str
    action: str
    target: str
    before: Any
    after: Any
    note: str | None = None
    #: the service changed, with several services (None: the only one, as before)
    service: str | None = None

    def to_json(self) -> dict[str, Any]:
        out = {
            "id": self.id,
            "time": iso_time(self.time),
            "actor": self.actor,
            "action": self.action,
            "target": self.target,
            "before": self.before,
            "after": self.after,
            "note": self.note,
        }
        if self.service is not None:
            out["service"] = self.service
        return out


EventSink = Callable[[Event], None]


class EventLog:
    """A bounded ring of the latest events, newest last, with sinks."""

    def __init__(self, capacity: int, clock: Callable[[], float] = time.time) -> None:
        self._ring: deque[dict[str, Any]] = deque(maxlen=capacity)
        self._sinks: list[EventSink] = []
        self._clock = clock
        self.next_id = 1
        #: set with several services: every event names its service
        self.service: str | None = None

    def subscribe(self, sink: EventSink) -> None:
        self._sinks.append(sink)

    def record(
        self,
        actor: str,
        action: str,
        target: str,
        before: Any,
        after: Any,
        note: str | None = None,
    ) -> Event:
        event = Event(
            self.next_id, self._clock(), actor, action, target, before, after, note, self.service
        )
        self.next_id += 1
        self._ring.append(event.to_json())
        for sink in self._sinks:
            try:
                sink(event)
            except Exception:
                log.exception("audit sink failed for event %d (%s)", event.id, action)
        return event

    def preload(self, records: Iterable[dict[str, Any]]) -> None:
        """Put events of an earlier run (from the events file) into the ring."""
        for record in records:
            self._ring.append(record)
            self.next_id = max(self.next_id, int(record["id"]) + 1)

    def discard_from(self, first_id: int) -> None:
        """Drop the events from id ``first_id`` on (changes that were undone). Ids
        are not reused: one may already be in a log line."""
        while self._ring and self._ring[-1]["id"] >= first_id:
            self._ring.pop()

    def replace(self, records: Iterable[dict[str, Any]]) -> None:
        """Make the ring hold ``records`` (oldest first; shared state: etcd's log)."""
        self._ring.clear()
        self._ring.extend(records)
        if self._ring:
            self.next_id = max(self.next_id, int(self._ring[-1]["id"]) + 1)

    def list(self, since: int = 0, limit: int | None = None) -> list[dict[str, Any]]:
        """Events with an id above ``since``, oldest first; the newest ``limit`` of them."""
        events = [e for e in self._ring if e["id"] > since]
        if limit is not None:
            events = events[-limit:] if limit > 0 else []
        return events

    def last(self) -> dict[str, Any] | None:
        """The newest event."""
        return self._ring[-1] if self._ring else None

    def __len__(self) -> int:
        return len(self._ring)


def describe(event: Event) -> str:
    """One readable line for the process log:
    ``flip green by deploy: blue=100 green=0 -> blue=0 green=100``."""
    text = (
        f"{event.action} {event.target} by {event.actor}: "
        f"{_brief(event.before)} -> {_brief(event.after)}"
    )
    return f"{text} ({event.note})" if event.note else text


def _brief(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, dict):
        if "state" in value and "pool" in value:  # a backend: its state says it all
            return f"{value['state']} (removing)" if value.get("removing") else str(value["state"])
        return " ".join(f"{k}={v}" for k, v in value.items())
    return str(value)


def events_path(state_path: str) -> str:
    """The audit file of a state file: ``<state.path>.events.jsonl``."""
    return f"{state_path}.events.jsonl"


def append_line(path: str, line: str) -> None:
    """Append one JSON line and push it to disk (blocking: run it off the loop)."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        os.write(fd, line.encode("utf-8"))
        os.fsync(fd)
    finally:
        os.close(fd)


def encode(event: Event) -> str:
    return json.dumps(event.to_json(), separators=(",", ":"), sort_keys=False) + "\n"


def read_tail(path: str, count: int) -> list[dict[str, Any]]:
    """The last ``count`` well-formed events of an events file; a missing file is
    empty, and lines that do not parse (a torn last write) are skipped with a
    warning."""
    try:
        with open(path, "rb") as f:
            size = f.seek(0, os.SEEK_END)
            start = max(0, size - _TAIL_BYTES)
            f.seek(start)
            data = f.read()
    except FileNotFoundError:
        return []
    except OSError as exc:
        log.warning("cannot read the audit log %s: %s; starting with an empty ring", path, exc)
        return []
    lines = data.split(b"\n")
    if start > 0:
        lines = lines[1:]  # the first line is cut
    records: deque[dict[str, Any]] = deque(maxlen=count)
    skipped = 0
    for raw in lines:
        if not raw.strip():
            continue
        try:
            record = json.loads(raw)
        except (ValueError, RecursionError):  # RecursionError: nested too deeply
            skipped += 1
            continue
        if isinstance(record, dict) and isinstance(record.get("id"), int):
            records.append(record)
        else:
            skipped += 1
    if skipped:
        log.warning("audit log %s: skipped %d unreadable line(s)", path, skipped)
    return list(records)
