#!/usr/bin/env python3
"""Reload and upgrade under load (a benchmark, not a test):
``python benchmarks/reload_bench.py [--duration 12] [--events 3] [--connections 30]``.

One nginx backend on loopback; in front of it, in turn: nginx (``nginx -s
reload``), HAProxy (``haproxy -sf``, without and with ``expose-fd listeners``
socket transfer, ``-x``), zdproxy (SIGHUP) and zdproxy (SIGUSR2). Each gets the
same wrk load (keep-alive, one thread) for ``--duration`` seconds, with
``--events`` reloads evenly spread inside it. The table: requests, socket
errors (connect, read, write, timeout), non-2xx answers, p99 and worst latency.

Every process is started here and ended by PID at the end (HAProxy's
processes by the PIDs its pid file named over the run). Everything on
loopback; the machine is shared, so read orders of magnitude.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from harness.wrk import Workload, parse_wrk_output, script_for  # noqa: E402

TOKEN = "reload-bench-token-0123456789"
PORTS = iter(range(27100, 27200))


def free_port() -> int:
    while True:
        port = next(PORTS)
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port


def wait_port(port: int, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as sock:
            sock.settimeout(0.2)
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listens on {port}")


class Procs:
    """Every PID started (or learnt from a pid file), ended at exit."""

    def __init__(self) -> None:
        self.pids: set[int] = set()
        self.popens: list[subprocess.Popen[bytes]] = []

    def start(self, argv: list[str], log: Path, **kwargs: Any) -> subprocess.Popen[bytes]:
        with open(log, "ab") as out:
            proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, **kwargs)
        self.popens.append(proc)
        self.pids.add(proc.pid)
        return proc

    def end_all(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for pid in list(self.pids):
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    self.pids.discard(pid)
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                for proc in self.popens:
                    proc.poll()
                alive = [pid for pid in self.pids if _alive(pid)]
                if not alive:
                    break
                time.sleep(0.05)
        for proc in self.popens:
            proc.poll()


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


# ---- the backend and the proxies -------------------------------------------------


def nginx_common(prefix: Path) -> str:
    temp = "\n".join(
        f"  {kind}_temp_path {prefix}/{kind}_temp;"
        for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    return f"""worker_processes 1;
daemon off;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log warn;
events {{ worker_connections 4096; }}
http {{
  access_log off;
  keepalive_requests 1000000;
{temp}
"""


def start_backend(procs: Procs, root: Path, port: int) -> None:
    prefix = root / "backend"
    prefix.mkdir()
    conf = prefix / "nginx.conf"
    conf.write_text(
        nginx_common(prefix)
        + f"""  server {{
    listen 127.0.0.1:{port} backlog=4096;
    location / {{ default_type text/plain; return 200 "{"x" * 1023}\\n"; }}
  }}
}}
"""
    )
    procs.start(
        ["nginx", "-p", str(prefix), "-c", str(conf), "-e", str(prefix / "e.log")],
        prefix / "out.log",
    )
    wait_port(port)


class Proxy:
    name = ""

    def __init__(self, procs: Procs, root: Path, backend: int) -> None:
        self.procs = procs
        self.root = root / self.name.replace(" ", "-").replace("(", "").replace(")", "")
        self.root.mkdir()
        self.backend = backend
        self.port = free_port()

    def start(self) -> None:
        raise NotImplementedError

    def reload(self) -> None:
        raise NotImplementedError


class Nginx(Proxy):
    name = "nginx -s reload"

    def start(self) -> None:
        self.conf = self.root / "nginx.conf"
        self.conf.write_text(
            nginx_common(self.root)
            + f"""  upstream app {{ server 127.0.0.1:{self.backend}; keepalive 64; }}
  server {{
    listen 127.0.0.1:{self.port} backlog=4096;
    location / {{ proxy_pass http://app; proxy_http_version 1.1;
                 proxy_set_header Connection ""; }}
  }}
}}
"""
        )
        self.argv = [
            "nginx",
            "-p",
            str(self.root),
            "-c",
            str(self.conf),
            "-e",
            str(self.root / "e.log"),
        ]
        self.procs.start(self.argv, self.root / "out.log")
        wait_port(self.port)

    def reload(self) -> None:
        subprocess.run([*self.argv, "-s", "reload"], check=True, capture_output=True)


class HAProxy(Proxy):
    name = "haproxy -sf"
    transfer = False

    def start(self) -> None:
        self.conf = self.root / "haproxy.cfg"
        self.pidfile = self.root / "haproxy.pid"
        self.sock = self.root / "admin.sock"
        expose = f"  stats socket {self.sock} mode 600 level admin expose-fd listeners\n"
        self.conf.write_text(
            "global\n  maxconn 4096\n"
            + (expose if self.transfer else "")
            + f"""defaults
  mode http
  timeout connect 2s
  timeout client 30s
  timeout server 30s
  option http-keep-alive
frontend web
  bind 127.0.0.1:{self.port}
  default_backend app
backend app
  http-reuse always
  server b1 127.0.0.1:{self.backend}
"""
        )
        self._run([])
        wait_port(self.port)

    def _run(self, extra: list[str]) -> None:
        argv = ["haproxy", "-D", "-f", str(self.conf), "-p", str(self.pidfile), *extra]
        subprocess.run(argv, check=True, capture_output=True)
        self._learn_pids()

    def _learn_pids(self) -> list[int]:
        pids = [int(p) for p in self.pidfile.read_text().split()]
        self.procs.pids.update(pids)
        return pids

    def reload(self) -> None:
        old = self._learn_pids()
        extra = ["-x", str(self.sock)] if self.transfer else []
        self._run([*extra, "-sf", *map(str, old)])


class HAProxyTransfer(HAProxy):
    name = "haproxy -sf -x (socket transfer)"
    transfer = True


class Zdproxy(Proxy):
    name = "zdproxy SIGHUP"
    sig = signal.SIGHUP

    def start(self) -> None:
        import yaml

        self.admin = free_port()
        self.address = f"127.0.0.1:{self.backend}"
        config = {
            "listen": [f"127.0.0.1:{self.port}"],
            "admin": {"listen": f"127.0.0.1:{self.admin}"},
            "state": {"path": None},
            "health_check": {"enabled": False},
            "log": {"level": "warning"},
            "pools": {
                "app": {"weight": 100, "backends": [{"address": f"127.0.0.1:{self.backend}"}]}
            },
        }
        path = self.root / "zdproxy.yaml"
        path.write_text(yaml.safe_dump(config))
        env = {**os.environ, "ZDPROXY_ADMIN_TOKEN": TOKEN}
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(HERE.parent), env.get("PYTHONPATH")]))
        self.procs.start(
            [sys.executable, "-m", "zdproxy.cli", "run", "-c", str(path)],
            self.root / "zdproxy.log",
            env=env,
        )
        wait_port(self.admin)
        self.serving = self._pid()

    def _pid(self) -> int:
        request = urllib.request.Request(
            f"http://127.0.0.1:{self.admin}/api/v1/state",
            headers={"Authorization": f"Bearer {TOKEN}"},
        )
        with urllib.request.urlopen(request, timeout=5) as response:
            return int(json.loads(response.read())["pid"])

    def reload(self) -> None:
        os.kill(self.serving, self.sig)
        if self.sig == signal.SIGUSR2:
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                try:
                    pid = self._pid()
                except OSError:
                    pid = self.serving
                if pid != self.serving:
                    self.serving = pid
                    self.procs.pids.add(pid)
                    return
                time.sleep(0.05)
            raise RuntimeError("no new zdproxy process")


class ZdproxyUpgrade(Zdproxy):
    name = "zdproxy SIGUSR2"
    sig = signal.SIGUSR2


# ---- the run ---------------------------------------------------------------------


def measure(
    proxy: Proxy, duration: int, events: int, connections: int, scripts: Path
) -> dict[str, Any]:
    script = script_for(Workload(), scripts)
    argv = [
        "wrk",
        "-t1",
        f"-c{connections}",
        f"-d{duration}s",
        "--timeout",
        "5s",
        "--latency",
        "-s",
        str(script),
        f"http://127.0.0.1:{proxy.port}/",
    ]
    wrk = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    problems: list[str] = []

    def fire() -> None:
        for _ in range(events):
            time.sleep(duration / (events + 1))
            try:
                proxy.reload()
            except Exception as exc:  # report, keep the load going
                problems.append(f"{type(exc).__name__}: {exc}")

    firing = threading.Thread(target=fire)
    firing.start()
    stdout, stderr = wrk.communicate(timeout=duration + 60)
    firing.join()
    if wrk.returncode != 0:
        raise RuntimeError(f"wrk failed: {stderr[-500:]}")
    result = parse_wrk_output(stdout)
    return {
        "proxy": proxy.name,
        "requests": result.requests,
        "socket_errors": result.socket_errors,
        "errors_by_kind": {k: getattr(result, k) for k in ("connect", "read", "write", "timeout")},
        "non_2xx": result.status,
        "p99_ms": result.p99_us / 1000,
        "max_ms": result.max_us / 1000,
        "problems": problems,
    }


def table(rows: list[dict[str, Any]], events: int, duration: int, connections: int) -> str:
    lines = [
        f"wrk -t1 -c{connections} -d{duration}s, {events} reloads evenly spread, 1 KiB answers",
        "",
        "| proxy, reload | requests | socket errors | non-2xx | p99 | worst latency |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        kinds = ", ".join(f"{k} {v}" for k, v in row["errors_by_kind"].items() if v)
        errors = f"{row['socket_errors']}" + (f" ({kinds})" if kinds else "")
        lines.append(
            f"| {row['proxy']} | {row['requests']} | {errors} | {row['non_2xx']} "
            f"| {row['p99_ms']:.1f} ms | {row['max_ms']:.1f} ms |"
        )
    return "\n".join(lines)


PROXIES: list[Callable[[Procs, Path, int], Proxy]] = [
    Nginx,
    HAProxy,
    HAProxyTransfer,
    Zdproxy,
    ZdproxyUpgrade,
]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=int, default=12)
    parser.add_argument("--events", type=int, default=3)
    parser.add_argument("--connections", type=int, default=30)
    parser.add_argument("--json", type=Path, default=None, help="also write the rows here")
    args = parser.parse_args()
    for tool in ("wrk", "nginx", "haproxy"):
        if shutil.which(tool) is None and not Path(f"/usr/sbin/{tool}").exists():
            print(f"reload_bench: {tool} is missing (apt-get install {tool})", file=sys.stderr)
            return 1
    os.environ["PATH"] += os.pathsep + "/usr/sbin"
    procs = Procs()
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="zdproxy-reload-bench-") as tmp:
        root = Path(tmp)
        try:
            backend = free_port()
            start_backend(procs, root, backend)
            for make in PROXIES:
                proxy = make(procs, root, backend)
                proxy.start()
                row = measure(proxy, args.duration, args.events, args.connections, root)
                print(json.dumps(row), flush=True)
                rows.append(row)
        finally:
            procs.end_all()
    print()
    print(table(rows, args.events, args.duration, args.connections))
    if args.json is not None:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
