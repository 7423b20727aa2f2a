"""Where runtime state survives restarts: a small store interface and a file store.

The runtime exports its persisted state as a plain JSON-able dict
(``Runtime.export_state``) and merges one back at start (``Runtime.restore``);
a ``StateStore`` only loads and saves such dicts, so an etcd store can replace
the file later without touching the runtime.

Saves are blocking (write, fsync, rename); ``BackgroundWriter`` runs them and
the audit-log appends on one worker thread, in order, so the event loop that
serves traffic never waits for a disk.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import tempfile
import threading
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, Protocol

from zdproxy.control.events import Event, append_line, encode, read_tail
from zdproxy.errors import ZdproxyError

if TYPE_CHECKING:
    from zdproxy.control.runtime import Runtime

log = logging.getLogger("zdproxy.control")

#: version of the state file layout; a file with another version is set aside
STATE_FORMAT = 1

_ADMIN_VALUES = frozenset({"enabled", "disabled", "draining", "drained"})


class StoreError(ZdproxyError):
    """State could not be loaded or saved."""


class StateStore(Protocol):
    def load(self) -> dict[str, Any] | None:
        """The saved state, or None when there is none (or it was unusable and
        has been reported and set aside)."""
        ...

    def save(self, state: dict[str, Any]) -> None:
        """Replace the saved state atomically. Blocking; raises on failure."""
        ...


class MemoryStore:
    """A store that keeps the last save in memory (tests, ``state.path: null``)."""

    def __init__(self, state: dict[str, Any] | None = None) -> None:
        self.state = state
        self.saves = 0

    def load(self) -> dict[str, Any] | None:
        return self.state

    def save(self, state: dict[str, Any]) -> None:
        self.state = json.loads(json.dumps(state))
        self.saves += 1


def check_state(data: Any) -> dict[str, Any]:
    """Check the layout of a loaded state document; raise ``StoreError`` naming
    the first problem. Content is checked against the config later, by the
    runtime (an unknown pool or backend there is not corruption)."""
    if not isinstance(data, dict):
        raise StoreError("the document is not a JSON object")
    if data.get("format") != STATE_FORMAT:
        raise StoreError(f"unknown format {data.get('format')!r} (expected {STATE_FORMAT})")
    for key in ("weights", "config_weights"):
        weights = data.get(key)
        if not isinstance(weights, dict) or not all(
            isinstance(k, str) and type(v) is int and 0 <= v <= 100 for k, v in weights.items()
        ):
            raise StoreError(f"{key}: expected an object of pool name -> integer percent")
    admin = data.get("admin")
    if not isinstance(admin, dict) or not all(
        isinstance(k, str) and v in _ADMIN_VALUES for k, v in admin.items()
    ):
        raise StoreError("admin: expected an object of backend id -> admin state")
    added = data.get("added")
    if not isinstance(added, list):
        raise StoreError("added: expected a list of backends")
    for index, item in enumerate(added):
        if not (
            isinstance(item, dict)
            and isinstance(item.get("id"), str)
            and isinstance(item.get("pool"), str)
            and isinstance(item.get("address"), str)
            and type(item.get("weight")) is int
        ):
            raise StoreError(f"added[{index}]: expected {{id, pool, address, weight}}")
    removed = data.get("removed")
    if not isinstance(removed, dict) or not all(
        isinstance(k, str)
        and isinstance(v, dict)
        and isinstance(v.get("pool"), str)
        and isinstance(v.get("address"), str)
        for k, v in removed.items()
    ):
        raise StoreError("removed: expected an object of backend id -> {pool, address}")
    rollouts = data.get("rollouts")
    if rollouts is not None and not isinstance(rollouts, dict):
        raise StoreError("rollouts: expected an object (the rollout engine's state)")
    return data


class FileStore:
    """State in one JSON file, replaced atomically on every save: a temporary
    file in the same directory, fsync, rename over the old one, fsync of the
    directory. A file that cannot be read or parsed is reported and renamed to
    ``<path>.corrupt-<UTC timestamp>``, never deleted."""

    def __init__(self, path: str) -> None:
        self.path = path
        #: set when a bad file could not be moved aside: saving would destroy it
        self.read_only_reason: str | None = None

    def load(self) -> dict[str, Any] | None:
        try:
            with open(self.path, "rb") as f:
                raw = f.read()
        except FileNotFoundError:
            log.info("no saved state at %s: starting from the config", self.path)
            return None
        except OSError as exc:
            self._set_aside(f"cannot be read ({exc})")
            return None
        try:
            data = check_state(json.loads(raw))
        except RecursionError:
            self._set_aside("is corrupt (nested too deeply)")
            return None
        except (ValueError, StoreError) as exc:
            self._set_aside(f"is corrupt ({exc})")
            return None
        return data

    def _set_aside(self, problem: str) -> None:
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        target = f"{self.path}.corrupt-{stamp}"
        n = 1
        while os.path.exists(target):
            n += 1
            target = f"{self.path}.corrupt-{stamp}-{n}"
        try:
            os.rename(self.path, target)
        except OSError as exc:
            self.read_only_reason = (
                f"the state file {self.path} {problem} and could not be moved aside ({exc}); "
                "state changes are not saved until it is fixed or removed"
            )
            log.error("%s; starting from the config", self.read_only_reason)
            return
        log.error(
            "the state file %s %s; it was moved to %s. Starting from the config",
            self.path,
            problem,
            target,
        )

    def save(self, state: dict[str, Any]) -> None:
        if self.read_only_reason is not None:
            raise StoreError(self.read_only_reason)
        data = json.dumps(state, indent=2, sort_keys=True).encode("utf-8") + b"\n"
        directory = os.path.dirname(os.path.abspath(self.path))
        try:
            os.makedirs(directory, exist_ok=True)
        except FileExistsError:
            raise StoreError(f"{directory} is not a directory") from None
        fd, tmp = tempfile.mkstemp(
            prefix=f".{os.path.basename(self.path)}.", suffix=".tmp", dir=directory
        )
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        dir_fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


class BackgroundWriter:
    """Blocking writes on one worker thread, in submission order.

    State saves coalesce: while a save is queued, a newer state replaces it, so
    a burst of changes costs one or two writes and the last state always lands.
    ``flush`` waits until everything submitted so far is on disk; the admin API
    awaits it before answering a mutation.
    """

    def __init__(self) -> None:
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="zdproxy-store")
        self._pending: set[asyncio.Future[None]] = set()
        self._lock = threading.Lock()
        self._latest: tuple[StateStore, dict[str, Any], int] | None = None
        #: the last failure of a write, shown by the state API; cleared by a good save
        self.last_error: str | None = None
        #: generation of the newest state handed to ``save_state``
        self.requested = 0
        #: generation of the newest state known to be on disk
        self.saved = 0

    def save_state(self, store: StateStore, state: dict[str, Any]) -> None:
        with self._lock:
            self.requested += 1
            queued = self._latest is not None
            self._latest = (store, state, self.requested)
        if not queued:
            self.submit(self._save_latest)

    def _save_latest(self) -> None:
        with self._lock:
            latest, self._latest = self._latest, None
        if latest is None:
            return
        store, state, generation = latest
        try:
            store.save(state)
        except Exception as exc:
            self.last_error = f"cannot save state: {exc}"
            log.error("%s", self.last_error)
        else:
            self.last_error = None
            self.saved = max(self.saved, generation)

    def submit(self, job: Callable[..., None], *args: Any) -> None:
        """Run ``job(*args)`` on the worker; failures are logged, never raised."""
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            self._run(job, *args)  # no loop (start-up code, tests): run it here
            return
        future = loop.run_in_executor(self._executor, self._run, job, *args)
        self._pending.add(future)
        future.add_done_callback(self._pending.discard)

    def _run(self, job: Callable[..., None], *args: Any) -> None:
        try:
            job(*args)
        except Exception as exc:
            self.last_error = f"{getattr(job, '__name__', 'write')} failed: {exc}"
            log.exception("background write failed")

    async def flush(self) -> None:
        while self._pending:
            await asyncio.gather(*list(self._pending))

    async def close(self) -> None:
        await self.flush()
        self._executor.shutdown(wait=True)


class Persistence:
    """Connects a runtime to its store and its audit file.

    ``restore`` (at start, before traffic) merges the saved state into the
    runtime and fills the audit ring from the file; ``attach`` makes every later
    change go to disk through the background writer.
    """

    def __init__(
        self,
        runtime: Runtime,
        store: StateStore | None,
        events_file: str | None,
        writer: BackgroundWriter | None = None,
    ) -> None:
        self.runtime = runtime
        self.store = store
        self.events_file = events_file
        self.writer = writer or BackgroundWriter()
        #: while a hot upgrade hands over: nothing is written (see ``pause``)
        self.paused = False
        self._held: list[Event] = []

    @property
    def last_error(self) -> str | None:
        return self.writer.last_error

    def restore(self, handed: Mapping[str, Any] | None = None) -> bool:
        """Load and merge the saved state; True when there was one. ``handed``: the
        state line of a hot upgrade (``upgrade.Upgrader``), used where there is no
        file (the old process flushed the file and stopped writing it first)."""
        events = self.runtime.events
        if self.events_file is not None:
            events.preload(read_tail(self.events_file, self.runtime.config.admin.events_ring))
        elif handed is not None:
            events.preload(handed.get("events") or [])
        if handed is not None:
            # ids go on from the old process's, even with its newest events not on disk
            events.next_id = max(events.next_id, int(handed.get("next_event") or 1))
        if self.store is None:
            if handed is None or handed.get("runtime") is None:
                return False
            self.runtime.restore(check_state(handed["runtime"]))
            return True
        state = self.store.load()
        if state is None:
            return False
        self.runtime.restore(state)
        # the file now says what runs (the config may have won some fields)
        self.writer.save_state(self.store, self.runtime.export_state())
        return True

    def attach(self) -> None:
        if self.store is not None:
            self.runtime.subscribe_state(self._save)
        if self.events_file is not None:
            self.runtime.events.subscribe(self._append)

    def _save(self, state: dict[str, Any]) -> None:
        if self.store is not None and not self.paused:
            self.writer.save_state(self.store, state)

    def _append(self, event: Event) -> None:
        if self.paused:
            self._held.append(event)
        elif self.events_file is not None:
            self.writer.submit(append_line, self.events_file, encode(event))

    def pause(self) -> None:
        """Stop writing (a hot upgrade: the new process owns the files from now
        on); events are held for ``resume``."""
        self.paused = True

    def resume(self) -> None:
        """Write again (the hot upgrade failed): the current state, the held events."""
        self.paused = False
        self._save(self.runtime.export_state())
        held, self._held = self._held, []
        for event in held:
            self._append(event)

    async def flush(self) -> None:
        await self.writer.flush()

    def mark(self) -> int:
        """Where the saves stand; pass it to ``commit`` after a change."""
        return self.writer.requested

    async def commit(self, mark: int) -> str | None:
        """Wait until the changes made since ``mark`` are on disk; None when they
        are (or there was nothing to save), else why they are not."""
        await self.writer.flush()
        writer = self.writer
        if writer.requested == mark or writer.saved >= writer.requested:
            return None
        return writer.last_error or "cannot save state"

    async def close(self) -> None:
        await self.writer.close()
