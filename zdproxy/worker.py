"""A data-path worker process (``workers: N``; see ``zdproxy.workers``).

Started by the control process as ``python -m zdproxy.worker CONFIG`` with the
listening sockets and the channel inherited (fds in the environment). It runs
the same ``ProxyServer`` data path as one process, without the control parts
(admin API, health checks, rollouts, state): its Runtime replicas take the
control's state from the channel, its counters go back there.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import socket
import sys
from functools import partial
from typing import Any

from zdproxy import heap
from zdproxy.balancing.model import Backend
from zdproxy.balancing.retry import RetryBudget
from zdproxy.config.loader import ConfigError, load_config
from zdproxy.config.schema import Config
from zdproxy.control.runtime import Runtime
from zdproxy.health.drain import TunnelDrainer
from zdproxy.proxy.settings import DataPathSettings
from zdproxy.server import ProxyServer
from zdproxy.services import route_table
from zdproxy.workers import (
    ENV_CHANNEL,
    ENV_INDEX,
    ENV_LISTEN,
    REPORT_EVERY,
    RecordingObserver,
    apply_message_state,
    take_counters,
)

log = logging.getLogger("zdproxy.error")


class WorkerProcess:
    def __init__(self, config: Config, config_path: str) -> None:
        # workers: 1, or this process would start workers of its own
        self.server = ProxyServer(config.model_copy(update={"workers": 1}), config_path)
        self.observer = RecordingObserver()
        self.index = int(os.environ.get(ENV_INDEX, "0"))
        self._writer: asyncio.StreamWriter | None = None

    async def run(self) -> None:
        server = self.server
        listen = [int(fd) for fd in os.environ[ENV_LISTEN].split(",") if fd]
        sockets = [socket.socket(fileno=fd) for fd in listen]
        server.bind({str(a): s for a, s in zip(server.config.listen, sockets, strict=True)})
        channel = socket.socket(fileno=int(os.environ[ENV_CHANNEL]))
        reader, self._writer = await asyncio.open_unix_connection(sock=channel)
        # the first state first: until then every backend is "starting", unroutable
        first = json.loads(await reader.readline())
        apply_message_state(server, first)
        heap.settle()  # before the first request: see server.serve
        await server.start()
        ctx = server.ctx
        assert ctx is not None
        ctx.observer = self.observer
        loop = asyncio.get_running_loop()
        self._start_tunnel_drainers(loop)
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, server.request_stop)
        # reload and upgrade are the control process's; a stray signal must not kill
        for sig in (signal.SIGHUP, signal.SIGUSR2):
            loop.add_signal_handler(sig, lambda: None)
        loop.add_signal_handler(signal.SIGUSR1, server.reopen_logs)
        self._send({"ready": os.getpid()})
        self._send({"ack": first.get("seq", 0)})
        log.info("worker %d serving (pid %d)", self.index, os.getpid())
        reporter = loop.create_task(self._report())
        listener = loop.create_task(self._listen(reader))
        await server.wait_stopped()
        reporter.cancel()
        listener.cancel()
        # the last counters: requests finished while draining are counted
        self._send(take_counters(server, self.observer))
        await self._writer.drain()
        self._writer.close()

    def _start_tunnel_drainers(self, loop: asyncio.AbstractEventLoop) -> None:
        """Tunnels (WebSocket) to a backend that drained, or drains past its
        timeout, are closed here: they are this worker's. The replica's admin
        states come from the control process (which turns DRAINING into DRAINED)."""
        services = list(self.server.services.values())
        for service in services:
            drainer = TunnelDrainer(service)
            others = [s.runtime for s in services if s is not service]
            drainer.foreign = partial(_owned_by_any, others)
            drainer.start(loop)

    async def _listen(self, reader: asyncio.StreamReader) -> None:
        server = self.server
        while True:
            line = await reader.readline()
            if not line:
                # the control process is gone: no one to report to, stop as SIGTERM does
                log.error("worker %d: control process gone, stopping", self.index)
                server.request_stop()
                return
            message: dict[str, Any] = json.loads(line)
            if "state" in message:
                apply_message_state(server, message)
                # counters first: once the control sees this ack, the in-flight
                # figures it holds are this worker's as of the new state (a drain
                # must not end on a report older than a request still running)
                self._send(take_counters(server, self.observer))
                self._send({"ack": message.get("seq", 0)})
            elif message.get("reload"):
                self._reload()
            elif "stop" in message:
                server.request_stop(float(message["stop"]))

    def _reload(self) -> None:
        """Data-path settings (timeouts, limits, routes, sticky) from the file, as the
        control's reload applied them; listeners, admin, state and log stay."""
        server = self.server
        assert server.config_path is not None
        try:
            new = load_config(server.config_path)
        except ConfigError:
            return  # the control process refused it too and said why
        old = server.config
        kept = new.model_copy(
            update={
                "listen": old.listen,
                "admin": old.admin,
                "state": old.state,
                "log": old.log,
                "workers": 1,
            }
        )
        ctx = server.ctx
        # built before anything changes: one that cannot be built changes nothing
        settings = DataPathSettings.from_config(kept, ctx.fd_cap) if ctx is not None else None
        routes = route_table(kept, server.services)
        server.config = kept
        for name, service in server.services.items():
            service.config = config = kept.service_config(name)
            service.selector.configure(config.sticky, config.draining, service.selector.secret)
        if ctx is not None and settings is not None:
            ctx.install(settings)
            ctx.routes = routes
            ctx.retry_policy = RetryBudget(kept.retries.budget_percent)
        heap.settle()
        log.info("worker %d: config reloaded", self.index)

    async def _report(self) -> None:
        while True:
            await asyncio.sleep(REPORT_EVERY)
            self._send(take_counters(self.server, self.observer))

    def _send(self, message: dict[str, Any]) -> None:
        writer = self._writer
        if writer is not None and not writer.is_closing():
            writer.write(json.dumps(message, separators=(",", ":")).encode() + b"\n")


def _owned_by_any(runtimes: list[Runtime], backend: Backend) -> bool:
    return any(runtime.backends.get(backend.id) is backend for runtime in runtimes)


def main() -> int:
    from zdproxy.cli import _run_loop, setup_logging

    path = sys.argv[1]
    try:
        config = load_config(path)
    except ConfigError as exc:
        for problem in exc.problems:
            print(problem, file=sys.stderr)
        return 1
    setup_logging(config.log.format, config.log.level)
    worker = WorkerProcess(config, path)

    async def run() -> int:
        await worker.run()
        return 0

    return _run_loop(run())


if __name__ == "__main__":
    sys.exit(main())
