"""Hot upgrade (SIGUSR2): a fresh ``zdproxy run`` takes over the listening sockets.

How the sockets travel: the new process is a child of the old one, so the
listening sockets (data and admin) are simply inherited (``pass_fds``), named
by an environment variable (``ZDPROXY_UPGRADE``: address -> descriptor, plus
the descriptor of a hand-over channel). SCM_RIGHTS over a unix socket would be
needed only if the new process were started by someone else (a rendezvous
path, its permissions, a race on who connects); a child needs none of that,
and the descriptors are in place before its first line of Python runs.

The hand-over channel is one end of a ``socketpair``. The old process writes
one JSON line: the runtime state (``Runtime.export_state``: weights, admin
states, API-added backends, rollout progress, the sticky signing key, ...)
and the recent events with the next event id. The new process starts from it
(from the state file instead when ``state.path`` is set: the old process
flushed it and stopped writing it first) and answers one JSON line:
``{"ready": PID}`` once it serves, or ``{"failed": [...]}`` with the reason
(the ``zdproxy check`` lines of an invalid config). A closed channel or an
exit before that is a failure too, as is no answer within ``UPGRADE_TIMEOUT``.

Only after ``ready`` does the old process stop accepting and drain through the
ordinary graceful shutdown. The listening sockets are the same open file
descriptions in both processes, so the accept backlog is shared: a connection
the old process never accepted is accepted by the new one, never reset.

Under systemd (``Type=notify``, ``NotifyAccess=all``) every process tells
systemd ``READY=1`` and ``MAINPID=<its pid>`` once it serves, so systemd
follows the new process. As PID 1 (a container), the old process cannot exit;
after draining it stays as a small supervisor (``Supervisor``) that reaps
children, forwards signals to the serving process and exits with its status.
It learns which process serves by the same ``MAINPID=`` message, sent to a
datagram socket of its own that the children see as ``NOTIFY_SOCKET``.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import json
import logging
import os
import select
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import FrameType
from typing import TYPE_CHECKING, Any

from zdproxy.config.schema import DEFAULT_SERVICE
from zdproxy.control.events import SYSTEM_ACTOR

if TYPE_CHECKING:
    from zdproxy.control.runtime import Runtime
    from zdproxy.server import Hook, ProxyServer

log = logging.getLogger("zdproxy.error")

#: names the inherited descriptors: {"listen": {ADDRESS: FD}, "admin": [ADDRESS, FD] | null,
#: "channel": FD}
ENV_HANDOVER = "ZDPROXY_UPGRADE"
#: "1": behave as PID 1 (stay as a supervisor after a hot upgrade); for tests and
#: for an init that is not zdproxy but does not reap (rare)
ENV_SUPERVISOR = "ZDPROXY_SUPERVISOR"
#: seconds the new process has to report ready (it runs the first health checks)
ENV_TIMEOUT = "ZDPROXY_UPGRADE_TIMEOUT"
UPGRADE_TIMEOUT = 60.0
#: seconds a keep-alive connection of the old process may wait for its next
#: request, answered with ``Connection: close``, before it is closed idle
IDLE_GRACE = 1.0
#: the longest hand-over line accepted (the state of thousands of backends fits)
MAX_LINE = 64 * 1024 * 1024


# ---- sd_notify ---------------------------------------------------------------


def sd_notify(message: str, environ: Mapping[str, str] | None = None) -> bool:
    """Send ``message`` to ``$NOTIFY_SOCKET`` (systemd's notify protocol: one
    datagram of ``KEY=VALUE`` lines; ``@`` is the abstract namespace). False when
    there is no socket or it cannot be reached (never raises: a notify failure
    must not stop a serving proxy)."""
    path = (environ if environ is not None else os.environ).get("NOTIFY_SOCKET")
    if not path or path[0] not in "/@":
        return False
    address = "\0" + path[1:] if path[0] == "@" else path
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.sendto(message.encode("utf-8"), address)
    except OSError as exc:
        log.warning("cannot notify %s: %s", path, exc)
        return False
    return True


def notify_ready() -> None:
    """This process serves: systemd (or the supervisor) now follows it."""
    sd_notify(f"READY=1\nMAINPID={os.getpid()}\nSTATUS=serving")


# ---- the new process's side ---------------------------------------------------


class Handover:
    """What the old process passed: listening sockets by address, the channel and
    the state line. Built once at start from ``$ZDPROXY_UPGRADE`` (removed from
    the environment, so that it is not passed on by mistake)."""

    def __init__(
        self,
        listeners: dict[str, socket.socket],
        admin: tuple[str, socket.socket] | None,
        channel: socket.socket,
    ) -> None:
        self.listeners = listeners
        self.admin = admin
        self.channel = channel
        #: the old process's state line (``read_state``)
        self.state: dict[str, Any] = {}

    @classmethod
    def from_environ(cls) -> Handover | None:
        raw = os.environ.pop(ENV_HANDOVER, None)
        if not raw:
            return None
        spec = json.loads(raw)
        listeners = {
            address: socket.socket(fileno=int(fd)) for address, fd in spec["listen"].items()
        }
        admin = None
        if spec.get("admin"):
            address, fd = spec["admin"]
            admin = (str(address), socket.socket(fileno=int(fd)))
        handover = cls(listeners, admin, socket.socket(fileno=int(spec["channel"])))
        handover.read_state()
        return handover

    def read_state(self) -> None:
        """Blocking, at start: the old process wrote the line before waiting."""
        self.channel.settimeout(30)
        line = _read_line(self.channel)
        self.state = json.loads(line) if line else {}

    def service_state(self, name: str) -> dict[str, Any]:
        """One service's part of the state line (an old process without services
        sent only the top-level one, which is the default service's)."""
        services = self.state.get("services")
        if isinstance(services, dict) and isinstance(services.get(name), dict):
            return services[name]  # type: ignore[no-any-return]
        return self.state if name == DEFAULT_SERVICE else {}

    def take_listeners(self, addresses: list[str]) -> dict[str, socket.socket]:
        """The passed listening sockets for these addresses (the rest are closed
        by ``close_unused``)."""
        taken: dict[str, socket.socket] = {}
        for address in addresses:
            sock = self.listeners.pop(address, None)
            if sock is not None:
                sock.setblocking(False)
                taken[address] = sock
        return taken

    def take_admin(self, address: str) -> socket.socket | None:
        if self.admin is None or self.admin[0] != address:
            return None
        sock = self.admin[1]
        self.admin = None
        sock.setblocking(False)
        return sock

    def close_unused(self) -> None:
        """Listeners the new config no longer has: the old process still holds
        them while it drains; this process lets go of its copies."""
        for sock in self.listeners.values():
            sock.close()
        self.listeners.clear()
        if self.admin is not None:
            self.admin[1].close()
            self.admin = None

    def report(self, message: dict[str, Any]) -> None:
        """Answer the old process (once); it acts on it at once."""
        try:
            self.channel.sendall(json.dumps(message).encode("utf-8") + b"\n")
        except OSError as exc:
            log.warning("hot upgrade: cannot answer the old process: %s", exc)
        finally:
            self.channel.close()


def _read_line(sock: socket.socket) -> bytes:
    chunks: list[bytes] = []
    size = 0
    while True:
        chunk = sock.recv(65536)
        if not chunk:
            break
        chunks.append(chunk)
        size += len(chunk)
        if chunk.endswith(b"\n") or size > MAX_LINE:
            break
    return b"".join(chunks).strip()


def report_start_failure(problems: list[str]) -> None:
    """``zdproxy run`` could not start (invalid config, port in use): when this
    was a hot upgrade, tell the old process why before exiting."""
    raw = os.environ.pop(ENV_HANDOVER, None)
    if not raw:
        return
    with contextlib.suppress(OSError, ValueError, KeyError):
        channel = socket.socket(fileno=int(json.loads(raw)["channel"]))
        Handover({}, None, channel).report({"failed": problems})


# ---- the old process's side ---------------------------------------------------


@dataclass
class UpgradeResult:
    #: "ok" (the new process serves), "failed" (it did not; this one serves on),
    #: "refused" (not started: one is already running, or stopping)
    result: str
    reason: str = ""
    pid: int | None = None
    problems: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {"result": self.result, "reason": self.reason, "pid": self.pid}


class Upgrader:
    """Runs one hot upgrade at a time for ``server``."""

    def __init__(self, server: ProxyServer, argv: list[str] | None = None) -> None:
        self.server = server
        #: the arguments this process was started with (``run -c FILE ...``)
        self.argv = list(sys.argv[1:] if argv is None else argv)
        self.busy = False
        self.supervisor_mode = os.getpid() == 1 or os.environ.get(ENV_SUPERVISOR) == "1"
        #: set when this process handed over and must stay as a supervisor
        self.supervision: Supervisor | None = None
        self._notify: socket.socket | None = None
        self._tasks: set[asyncio.Task[UpgradeResult]] = set()

    def on_signal(self) -> None:
        """SIGUSR2."""
        task = asyncio.get_running_loop().create_task(self.upgrade("sigusr2"))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def upgrade(self, actor: str) -> UpgradeResult:
        server = self.server
        if self.busy:
            log.warning("hot upgrade by %s refused: one is already in progress", actor)
            return self._count(UpgradeResult("refused", "a hot upgrade is already in progress"))
        if server.stopping:
            log.warning("hot upgrade by %s refused: shutting down", actor)
            return self._count(UpgradeResult("refused", "shutting down"))
        if server.config_path is None:
            log.warning("hot upgrade by %s refused: not started with a config file", actor)
            return self._count(UpgradeResult("refused", "not started with a config file"))
        self.busy = True
        await server.started.wait()
        log.info("hot upgrade by %s: starting a new process", actor)
        try:
            result = await self._attempt()
        except Exception as exc:
            log.exception("hot upgrade failed")
            result = UpgradeResult("failed", f"{type(exc).__name__}: {exc}")
        if result.result == "ok":
            log.info("hot upgrade: pid %s serves; this process drains and exits", result.pid)
            await self._retire(result)
        else:
            log.error("hot upgrade failed, this process serves on: %s", result.reason)
            for line in result.problems:
                log.error("%s", line)
            await self._resume()
            self.busy = False
        return self._count(result)

    def _count(self, result: UpgradeResult) -> UpgradeResult:
        """A failed or refused upgrade, in this process's metrics and events (a
        successful one is recorded by the new process: this one stops writing)."""
        if result.result != "ok":
            runtime = self.server.runtime
            runtime.upgrades[result.result] = runtime.upgrades.get(result.result, 0) + 1
            after = {**result.to_json(), "problems": result.problems}
            runtime.events.record(SYSTEM_ACTOR, "process.upgrade", str(os.getpid()), None, after)
        return result

    def took_over(self, handover: Handover) -> None:
        """This process serves after a hot upgrade: count it and say so."""
        from zdproxy import __version__

        runtime = self.server.runtime
        runtime.upgrades["ok"] = runtime.upgrades.get("ok", 0) + 1
        before = {"pid": handover.state.get("parent")}
        after = {"result": "ok", "pid": os.getpid(), "version": __version__}
        runtime.events.record(SYSTEM_ACTOR, "process.upgrade", str(os.getpid()), before, after)

    async def _attempt(self) -> UpgradeResult:
        server = self.server
        await _run_hooks(server.pause_hooks)
        for persistence in server.persistences:
            # the new process reads the state files: they must be complete and stay so
            persistence.pause()
            await persistence.flush()
        parent, child = socket.socketpair()
        try:
            proc = self._spawn(child)
        finally:
            child.close()
        try:
            with parent:
                parent.setblocking(False)
                loop = asyncio.get_running_loop()
                await loop.sock_sendall(parent, self._state_line())
                reply = await self._await_reply(parent, proc)
        except BaseException:
            _end_child(proc)
            raise
        if reply.result != "ok":
            _end_child(proc)
        return reply

    def _spawn(self, channel: socket.socket) -> subprocess.Popen[bytes]:
        server = self.server
        pairs = zip(server.config.listen, server.sockets, strict=True)
        listen = {str(address): sock.fileno() for address, sock in pairs}
        admin = server.admin_socket
        spec = {
            "listen": listen,
            "admin": [str(server.config.admin.listen), admin.fileno()] if admin else None,
            "channel": channel.fileno(),
        }
        env = dict(os.environ)
        env[ENV_HANDOVER] = json.dumps(spec)
        # only the first process is the supervisor; the new one is a plain server
        env.pop(ENV_SUPERVISOR, None)
        if self.supervisor_mode:
            env["NOTIFY_SOCKET"] = "@" + self._notify_socket()[1:]
        fds = [*listen.values(), channel.fileno(), *([admin.fileno()] if admin else [])]
        return subprocess.Popen(
            [sys.executable, "-m", "zdproxy.cli", *self.argv], pass_fds=fds, env=env
        )

    def _notify_socket(self) -> str:
        """The supervisor's notify socket (abstract), bound before the first child
        starts so that no ``MAINPID=`` message is missed."""
        if self._notify is None:
            _become_subreaper()
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            sock.bind(f"\0zdproxy-supervisor-{os.getpid()}-{time.monotonic_ns()}")
            sock.setblocking(False)
            self._notify = sock
        name = self._notify.getsockname()
        return name.decode() if isinstance(name, bytes) else str(name)

    def _state_line(self) -> bytes:
        services = self.server.services
        health: dict[str, Any] = {"health": {}, "ejections": {}}
        for service in services.values():
            if service.health is not None:
                # keyed by backend id, unique across services: one map for all
                for key, part in service.health.export().items():
                    health[key].update(part)
        state = {
            "parent": os.getpid(),
            **_runtime_state(self.server.runtime),
            "services": {name: _runtime_state(s.runtime) for name, s in services.items()},
            **health,
        }
        return json.dumps(state).encode("utf-8") + b"\n"

    async def _await_reply(
        self, channel: socket.socket, proc: subprocess.Popen[bytes]
    ) -> UpgradeResult:
        loop = asyncio.get_running_loop()
        timeout = float(os.environ.get(ENV_TIMEOUT) or UPGRADE_TIMEOUT)
        deadline = loop.time() + timeout
        buffer = b""
        while b"\n" not in buffer:
            remaining = deadline - loop.time()
            if remaining <= 0:
                return UpgradeResult(
                    "failed",
                    f"the new process (pid {proc.pid}) was not ready within {timeout:g}s",
                    proc.pid,
                )
            try:
                chunk = await asyncio.wait_for(loop.sock_recv(channel, 65536), min(remaining, 1))
            except TimeoutError:
                continue
            if not chunk:
                return await self._died(proc)
            buffer += chunk
        reply = json.loads(buffer.split(b"\n", 1)[0])
        if "ready" in reply:
            return UpgradeResult("ok", pid=int(reply["ready"]))
        problems = [str(p) for p in reply.get("failed", [])]
        reason = f"the new process (pid {proc.pid}) did not start: " + (
            problems[0] if len(problems) == 1 else f"{len(problems)} problem(s), logged below"
        )
        return UpgradeResult("failed", reason, proc.pid, problems)

    async def _died(self, proc: subprocess.Popen[bytes]) -> UpgradeResult:
        """The channel closed without an answer: the new process is exiting."""
        for _ in range(100):
            if proc.poll() is not None:
                break
            await asyncio.sleep(0.05)
        code = proc.poll()
        if code is None:
            return UpgradeResult(
                "failed",
                f"the new process (pid {proc.pid}) closed the "
                "hand-over channel before it was ready",
                proc.pid,
            )
        return UpgradeResult(
            "failed",
            f"the new process (pid {proc.pid}) exited with status {code} before "
            "it was ready (see its log lines above)",
            proc.pid,
        )

    async def _retire(self, result: UpgradeResult) -> None:
        """The new process serves: hand everything over to it and drain."""
        server = self.server
        await _run_hooks(server.retire_hooks)
        if self.supervisor_mode and result.pid is not None:
            assert self._notify is not None
            self.supervision = Supervisor(result.pid, self._notify)
        server.request_stop(idle_grace=IDLE_GRACE)

    async def _resume(self) -> None:
        server = self.server
        for persistence in server.persistences:
            persistence.resume()
        await _run_hooks(server.resume_hooks)


def _runtime_state(runtime: Runtime) -> dict[str, Any]:
    """One service's part of the hand-over: what its ``Persistence.restore`` takes."""
    return {
        "runtime": runtime.export_state(),
        "events": runtime.events.list(),
        "next_event": runtime.events.next_id,
    }


async def _run_hooks(hooks: list[Hook]) -> None:
    for hook in hooks:
        try:
            await hook()
        except Exception:
            log.exception("hot upgrade: error in %s", getattr(hook, "__qualname__", hook))


def _end_child(proc: subprocess.Popen[bytes]) -> None:
    """A new process that failed (or is late) must not linger, holding the sockets."""
    if proc.poll() is None:
        proc.kill()
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(5)


def _become_subreaper() -> None:
    """Orphans (the old process's child once that one exits) are reparented to us
    instead of to init, so the supervisor can wait for them. PID 1 is anyway."""
    if os.getpid() == 1 or not sys.platform.startswith("linux"):
        return
    pr_set_child_subreaper = 36
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(pr_set_child_subreaper, 1, 0, 0, 0)
    except (OSError, AttributeError) as exc:
        log.warning("cannot become a child subreaper: %s", exc)


# ---- PID 1: stay as a supervisor ------------------------------------------------

#: signals passed on to the serving process
FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR2, signal.SIGUSR1)


class Supervisor:
    """After a hot upgrade as PID 1: reap every child, forward signals to the
    process that serves, exit with its status when it exits. Blocking, no event
    loop (the old server has ended)."""

    def __init__(self, serving: int, notify: socket.socket) -> None:
        self.serving = serving
        self.notify = notify
        #: systemd's socket when there is one: messages are passed on
        self.upstream = os.environ.get("NOTIFY_SOCKET")

    def run(self) -> int:
        log.info("supervising pid %d (this process stays as PID 1)", self.serving)
        for sig in FORWARDED:
            signal.signal(sig, self._forward)
        while True:
            with contextlib.suppress(InterruptedError):
                select.select([self.notify], [], [], 0.2)
            self._read_notify()
            code = self._reap()
            if code is not None:
                return code

    def _forward(self, signum: int, frame: FrameType | None) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.serving, signum)

    def _read_notify(self) -> None:
        while True:
            try:
                data = self.notify.recv(4096)
            except (BlockingIOError, InterruptedError):
                return
            for line in data.decode("utf-8", "replace").splitlines():
                key, _, value = line.partition("=")
                if key == "MAINPID" and value.isdigit():
                    self.serving = int(value)
                    log.info("supervisor: pid %d serves now", self.serving)
            if self.upstream:
                sd_notify(data.decode("utf-8", "replace"))

    def _reap(self) -> int | None:
        """The exit code to end with once the serving process ended, else None."""
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                # no child left at all: the serving one is gone without a status
                return 0 if not _alive(self.serving) else None
            if pid == 0:
                return None
            # a MAINPID sent just before the old process exited is read first
            self._read_notify()
            if pid == self.serving:
                code = os.waitstatus_to_exitcode(status)
                return code if code >= 0 else 128 - code


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
