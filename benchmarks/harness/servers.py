"""The processes of a benchmark: nginx backends and the proxies under test.

Every process is started by us, tracked by PID and stopped by PID (its own
tree only). Configs are generated into one temporary directory per run.
"""

from __future__ import annotations

import contextlib
import functools
import http.client
import json
import os
import re
import resource
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .system import Pinning, log, process_tree

ONE_KIB_BODY = ("zdproxy-bench " * 80)[:1023] + "\n"  # exactly 1024 bytes
assert len(ONE_KIB_BODY) == 1024
LARGE_BODY_BYTES = 64 * 1024
UPLOAD_BYTES = 1024 * 1024
STATUS_PATH = "/_zdbench_status"


class StartError(RuntimeError):
    """A process did not come up; the message says why (with its log tail)."""


class EventError(RuntimeError):
    """An operation of the events scenario is not available or failed."""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_port(port: int, timeout: float, proc: ManagedProcess | None = None) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and not proc.alive():
            return False
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.5):
            return True
        time.sleep(0.05)
    return False


def http_request(
    port: int,
    path: str,
    method: str = "GET",
    body: bytes | None = None,
    headers: dict[str, str] | None = None,
    timeout: float = 5.0,
) -> tuple[int, bytes]:
    """One HTTP/1.1 request to 127.0.0.1:port; (status, body). Raises OSError on failure."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


# ----------------------------------------------------------------- process handling


class ManagedProcess:
    """A child process we started, with its output in a log file."""

    registry: list[ManagedProcess] = []

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        logfile: Path,
        env: dict[str, str] | None = None,
        cwd: Path | None = None,
    ) -> None:
        self.name = name
        self.argv = list(argv)
        self.logfile = logfile
        self.env = env
        self.cwd = cwd
        self.popen: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with self.logfile.open("ab") as out:
            self.popen = subprocess.Popen(
                self.argv,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=self.env,
                cwd=self.cwd,
            )
        ManagedProcess.registry.append(self)

    @property
    def pid(self) -> int:
        assert self.popen is not None
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def tree(self) -> list[int]:
        return process_tree(self.pid) if self.alive() else []

    def log_tail(self, lines: int = 15) -> str:
        try:
            text = self.logfile.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.strip().splitlines()[-lines:])

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 8.0) -> None:
        """Signal the main process, wait, then SIGKILL whatever is left of its tree."""
        if self.popen is None:
            return
        pids = self.tree()
        if self.alive():
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, sig)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.popen.wait(timeout)
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.popen.wait(5)
        if self in ManagedProcess.registry:
            ManagedProcess.registry.remove(self)

    def kill_tree(self) -> None:
        """SIGKILL the process and its descendants at once (a crash, for the events scenario)."""
        for pid in self.tree():
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        if self.popen is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.popen.wait(5)

    @classmethod
    def stop_all(cls) -> None:
        for proc in list(reversed(cls.registry)):
            proc.stop(timeout=3.0)


@functools.cache
def _nginx_build(nginx_bin: str) -> str:
    done = subprocess.run([nginx_bin, "-V"], capture_output=True, text=True, check=False)
    return done.stderr + done.stdout


def _nginx_supports_e(nginx_bin: str) -> bool:
    match = re.search(r"nginx/(\d+)\.(\d+)\.(\d+)", _nginx_build(nginx_bin))
    if match is None:
        return False
    return tuple(int(x) for x in match.groups()) >= (1, 19, 5)


def _nginx_has_stub_status(nginx_bin: str) -> bool:
    return "http_stub_status_module" in _nginx_build(nginx_bin)


def _nginx_argv(nginx_bin: str, conf: Path, prefix: Path) -> list[str]:
    argv = [nginx_bin, "-p", str(prefix), "-c", str(conf)]
    if _nginx_supports_e(nginx_bin):
        argv += ["-e", str(prefix / "error.log")]
    return argv


def _nginx_common(prefix: Path, worker_connections: int) -> str:
    return f"""worker_processes 1;
daemon off;
master_process on;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log warn;
worker_rlimit_nofile {worker_connections + 1024};
events {{ worker_connections {worker_connections}; }}
"""


def _nginx_temp_paths(prefix: Path) -> str:
    return "\n".join(
        f"  {kind}_temp_path {prefix}/{kind}_temp;"
        for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )


# ----------------------------------------------------------------- backends


@dataclass
class Backend:
    """One nginx backend: 1 KiB at /, 64 KiB at /64k, 1 MiB POST at /upload, /healthz."""

    backend_id: str
    port: int
    prefix: Path
    nginx_bin: str
    pinning: Pinning
    worker_connections: int = 4096
    proc: ManagedProcess | None = field(default=None, repr=False)

    def write_config(self) -> Path:
        www = self.prefix / "www"
        www.mkdir(parents=True, exist_ok=True)
        (www / "64k").write_bytes(b"z" * LARGE_BODY_BYTES)
        # POST to a static file is answered 405 by nginx's static module, after the mirror
        # module (mirror_request_body on) has read the whole request body; error_page
        # turns that into a 200. So /upload really consumes the upload before answering.
        (www / "upload").write_bytes(b"")
        conf = self.prefix / "nginx.conf"
        status = ""
        if _nginx_has_stub_status(self.nginx_bin):
            # per-backend request counters, to check where traffic went during events
            status = f"    location = {STATUS_PATH} {{ stub_status; }}\n"
        conf.write_text(
            _nginx_common(self.prefix, self.worker_connections)
            + f"""http {{
  access_log off;
  sendfile on;
  tcp_nopush on;
  keepalive_requests 1000000;
  keepalive_timeout 75s;
  open_file_cache max=16;
{_nginx_temp_paths(self.prefix)}
  server {{
    listen 127.0.0.1:{self.port} backlog=4096;
    root {www};
    location = / {{ default_type text/plain; return 200 "{ONE_KIB_BODY[:-1]}\\n"; }}
    location = /healthz {{ default_type text/plain; return 200 "ok\\n"; }}
    location = /64k {{ default_type application/octet-stream; }}
    location = /upload {{
      client_max_body_size 2m;
      client_body_buffer_size 2m;
      mirror /_sink;
      mirror_request_body on;
      error_page 405 =200 @uploaded;
    }}
    location = /_sink {{ internal; return 204; }}
    location @uploaded {{ default_type text/plain; return 200 "uploaded $content_length\\n"; }}
    location / {{ return 404; }}
{status}  }}
}}
"""
        )
        return conf

    def requests(self) -> int | None:
        """Requests this backend has served since it started (nginx stub_status)."""
        if not _nginx_has_stub_status(self.nginx_bin):
            return None
        try:
            status, body = http_request(self.port, STATUS_PATH, timeout=2.0)
        except OSError:
            return None
        lines = body.decode(errors="replace").splitlines()
        if status != 200 or len(lines) < 3:
            return None
        counters = lines[2].split()
        return int(counters[2]) if len(counters) == 3 and counters[2].isdigit() else None

    def start(self) -> None:
        self.prefix.mkdir(parents=True, exist_ok=True)
        conf = self.write_config()
        self.proc = ManagedProcess(
            f"backend {self.backend_id}",
            self.pinning.load() + _nginx_argv(self.nginx_bin, conf, self.prefix),
            self.prefix / "stdout.log",
        )
        self.proc.start()
        if not wait_port(self.port, 10.0, self.proc):
            raise StartError(f"backend {self.backend_id} did not start:\n{self._tail()}")

    def _tail(self) -> str:
        assert self.proc is not None
        error_log = self.prefix / "error.log"
        text = error_log.read_text(errors="replace") if error_log.exists() else ""
        return (text.strip() + "\n" + self.proc.log_tail()).strip()

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.stop()

    def crash(self) -> None:
        if self.proc is not None:
            self.proc.kill_tree()


@dataclass(frozen=True)
class Topology:
    """blue-1, blue-2 (both in the blue pool, weight 100) and green-1 (weight 0)."""

    blue: tuple[tuple[str, int], ...]
    green: tuple[tuple[str, int], ...]

    def pool(self, name: str) -> tuple[tuple[str, int], ...]:
        return self.blue if name == "blue" else self.green


# ----------------------------------------------------------------- proxies under test


class Target:
    """Something wrk can be pointed at. ``pids`` are the processes whose CPU and RSS count."""

    name = "target"
    is_proxy = True

    def __init__(self, prefix: Path, pinning: Pinning, topology: Topology, port: int) -> None:
        self.prefix = prefix
        self.pinning = pinning
        self.topology = topology
        self.port = port
        self.proc: ManagedProcess | None = None

    def start(self) -> None:
        raise NotImplementedError

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.stop()

    def pids(self) -> list[int]:
        return self.proc.tree() if self.proc is not None else []

    def idle_capacity(self) -> int | None:
        """How many idle client connections this target can hold, when it is bounded
        below what the memory scenario asks for."""
        return None

    def wait_ready(self, timeout: float) -> None:
        """Data port open and GET / answered 200 (backends may need health checks first)."""
        if not wait_port(self.port, min(timeout, 15.0), self.proc):
            raise StartError(self.describe_failure("did not open its port"))
        deadline = time.monotonic() + timeout
        last = "no answer"
        while time.monotonic() < deadline:
            if self.proc is not None and not self.proc.alive():
                raise StartError(self.describe_failure("exited"))
            try:
                status, _ = http_request(self.port, "/", timeout=2.0)
                if status == 200:
                    return
                last = f"GET / answered {status}"
            except OSError as exc:
                last = f"GET / failed: {exc}"
            time.sleep(0.2)
        raise StartError(self.describe_failure(f"not ready after {timeout:.0f}s ({last})"))

    def describe_failure(self, what: str) -> str:
        tail = self.proc.log_tail() if self.proc is not None else ""
        code = ""
        if self.proc is not None and self.proc.popen is not None:
            rc = self.proc.popen.poll()
            code = f" (exit status {rc})" if rc is not None else ""
        return f"{self.name} {what}{code}" + (f":\n{tail}" if tail else "")

    # events scenario: every proxy implements these with its own native mechanism
    def events_unavailable(self) -> str | None:
        return "no runtime operations for this target"

    def flip(self, to: str) -> None:
        raise EventError("not supported")

    def drain(self, backend_id: str) -> None:
        raise EventError("not supported")

    def undrain(self, backend_id: str) -> None:
        raise EventError("not supported")

    def wait_backend_up(self, backend_id: str, timeout: float) -> bool:
        time.sleep(1.0)
        return True


class Direct(Target):
    """wrk straight to one backend: the ceiling, no proxy CPU."""

    name = "direct"
    is_proxy = False

    def start(self) -> None:
        self.wait_ready(10.0)

    def stop(self) -> None:
        pass

    def pids(self) -> list[int]:
        return []


class FloorProxy(Target):
    """``benchmarks/floor_proxy.py``: a minimal Python proxy (httptools framing,
    X-Forwarded-For, round robin over keep-alive upstreams), not part of zdproxy:
    the floor of what Python on uvloop costs per request, for reference."""

    name = "floor"
    #: the script run (a variant can be tried in its place: tail_bench.py --floor-script)
    script = Path(__file__).resolve().parent.parent / "floor_proxy.py"

    def start(self) -> None:
        self.prefix.mkdir(parents=True, exist_ok=True)
        ports = [str(port) for _, port in self.topology.blue]
        argv = [*self.pinning.proxy(), sys.executable, str(self.script), str(self.port), *ports]
        self.proc = ManagedProcess(self.name, argv, self.prefix / "floor.log")
        self.proc.start()
        self.wait_ready(20.0)


class NginxProxy(Target):
    name = "nginx"

    def __init__(
        self,
        prefix: Path,
        pinning: Pinning,
        topology: Topology,
        port: int,
        nginx_bin: str,
        max_connections: int,
    ) -> None:
        super().__init__(prefix, pinning, topology, port)
        self.nginx_bin = nginx_bin
        self.worker_connections = max_connections + 2048
        self.conf = prefix / "nginx.conf"

    def render(self, pool: str = "blue", down: frozenset[str] = frozenset()) -> str:
        servers = "\n".join(
            f"    server 127.0.0.1:{port}{' down' if backend_id in down else ''};  # {backend_id}"
            for backend_id, port in self.topology.pool(pool)
        )
        return (
            _nginx_common(self.prefix, self.worker_connections)
            + f"""http {{
  access_log off;
  keepalive_requests 1000000;
  keepalive_timeout 75s;
{_nginx_temp_paths(self.prefix)}
  upstream backends {{
{servers}
    keepalive 64;
    keepalive_requests 1000000;
  }}
  server {{
    listen 127.0.0.1:{self.port} backlog=4096;
    client_max_body_size 2m;
    client_body_buffer_size 256k;
    location / {{
      proxy_pass http://backends;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_request_buffering off;
      proxy_buffer_size 16k;
      proxy_buffers 8 16k;
    }}
  }}
}}
"""
        )

    def start(self) -> None:
        self.prefix.mkdir(parents=True, exist_ok=True)
        self.conf.write_text(self.render())
        self.proc = ManagedProcess(
            "nginx",
            self.pinning.proxy() + _nginx_argv(self.nginx_bin, self.conf, self.prefix),
            self.prefix / "stdout.log",
        )
        self.proc.start()
        self.wait_ready(15.0)

    def describe_failure(self, what: str) -> str:
        error_log = self.prefix / "error.log"
        extra = error_log.read_text(errors="replace").strip() if error_log.exists() else ""
        return super().describe_failure(what) + (f"\n{extra}" if extra else "")

    def _reload(self, text: str) -> None:
        assert self.proc is not None
        self.conf.write_text(text)
        os.kill(self.proc.pid, signal.SIGHUP)

    def events_unavailable(self) -> str | None:
        return None

    def flip(self, to: str) -> None:
        self._reload(self.render(pool=to))

    def drain(self, backend_id: str) -> None:
        # nginx OSS 1.22 has no runtime drain: mark the server down and reload
        self._reload(self.render(down=frozenset({backend_id})))

    def undrain(self, backend_id: str) -> None:
        self._reload(self.render())


class HaproxyProxy(Target):
    name = "haproxy"

    def __init__(
        self,
        prefix: Path,
        pinning: Pinning,
        topology: Topology,
        port: int,
        haproxy_bin: str,
        max_connections: int,
    ) -> None:
        super().__init__(prefix, pinning, topology, port)
        self.haproxy_bin = haproxy_bin
        # HAProxy reserves two descriptors per connection (client and server side) and
        # refuses to start when RLIMIT_NOFILE cannot hold 2 x maxconn
        nofile = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        self.maxconn = min(max_connections + 1000, (nofile - 64) // 2)
        self.socket_path = prefix / "admin.sock"

    def idle_capacity(self) -> int | None:
        # keep room for health checks and the harness's own probes
        return self.maxconn - 50

    def render(self) -> str:
        servers = [
            f"  server {backend_id} 127.0.0.1:{port} check"
            for backend_id, port in self.topology.blue
        ] + [
            f"  server {backend_id} 127.0.0.1:{port} check weight 0"
            for backend_id, port in self.topology.green
        ]
        return f"""global
  nbthread 1
  maxconn {self.maxconn}
  stats socket {self.socket_path} mode 600 level admin

defaults
  mode http
  timeout connect 2s
  timeout client 60s
  timeout server 30s
  timeout http-keep-alive 60s
  timeout http-request 10s
  retries 2
  option redispatch 1
  retry-on conn-failure empty-response

frontend fe
  bind 127.0.0.1:{self.port}
  maxconn {self.maxconn}
  default_backend be

backend be
  balance roundrobin
  http-reuse always
  option httpchk GET /healthz
  default-server inter 1s rise 2 fall 3
{chr(10).join(servers)}
"""

    def start(self) -> None:
        self.prefix.mkdir(parents=True, exist_ok=True)
        conf = self.prefix / "haproxy.cfg"
        conf.write_text(self.render())
        self.proc = ManagedProcess(
            "haproxy",
            [*self.pinning.proxy(), self.haproxy_bin, "-db", "-f", str(conf)],
            self.prefix / "stdout.log",
        )
        self.proc.start()
        self.wait_ready(15.0)

    def command(self, line: str, output: bool = False) -> str:
        """One runtime API command; commands that change state print nothing on success."""
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(5.0)
            sock.connect(str(self.socket_path))
            sock.sendall(line.encode() + b"\n")
            chunks = []
            while chunk := sock.recv(65536):
                chunks.append(chunk)
        answer = b"".join(chunks).decode(errors="replace").strip()
        if answer and not output:
            raise EventError(f"haproxy '{line}': {answer}")
        return answer

    def events_unavailable(self) -> str | None:
        return None if self.socket_path.exists() else "no admin socket"

    def flip(self, to: str) -> None:
        other = "green" if to == "blue" else "blue"
        for backend_id, _ in self.topology.pool(to):
            self.command(f"set server be/{backend_id} state ready")
            self.command(f"set weight be/{backend_id} 1")
        for backend_id, _ in self.topology.pool(other):
            self.command(f"set server be/{backend_id} state drain")

    def drain(self, backend_id: str) -> None:
        self.command(f"set server be/{backend_id} state drain")

    def undrain(self, backend_id: str) -> None:
        self.command(f"set server be/{backend_id} state ready")

    def wait_backend_up(self, backend_id: str, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError, EventError):
                lines = self.command("show stat", output=True).splitlines()
                header = lines[0].lstrip("# ").split(",")
                column = header.index("status")
                for line in lines[1:]:
                    cells = line.split(",")
                    if cells[:2] == ["be", backend_id] and cells[column].startswith("UP"):
                        return True
            time.sleep(0.25)
        return False


def zdproxy_yaml(
    topology: Topology,
    port: int,
    admin_port: int,
    state_path: Path,
    extras: bool,
    max_connections: int,
    access_log: Path | None = None,
) -> str:
    """The zdproxy config of the benchmark, in the contract's format, every feature on.

    ``extras`` adds keys beyond docs' contract (connection limit for the 10k idle
    connections scenario); the harness retries without them if they are refused.
    """

    def backends(pool: tuple[tuple[str, int], ...]) -> str:
        return "".join(
            f"      - id: {backend_id}\n        address: 127.0.0.1:{backend_port}\n"
            for backend_id, backend_port in pool
        )

    text = f"""# generated by benchmarks/run.py
listen:
  - 127.0.0.1:{port}
admin:
  listen: 127.0.0.1:{admin_port}
  token_env: ZDPROXY_ADMIN_TOKEN
state:
  path: {state_path}
pools:
  blue:
    weight: 100
    backends:
{backends(topology.blue)}  green:
    weight: 0
    backends:
{backends(topology.green)}health_check:
  path: /healthz
  interval: 1s
  timeout: 500ms
  rise: 2
  fall: 3
sticky:
  mode: pool
  cookie: zd_affinity
draining:
  timeout: 30s
timeouts:
  connect: 2s
  request_header: 10s
  upstream_response: 30s
  idle: 120s
limits:
  max_header_bytes: 65536
  max_body_bytes: 0
"""
    if extras:
        text += f"  max_connections: {max_connections + 1000}\n"
    if access_log is not None:
        text += f"log:\n  access_log: json\n  access_log_path: {access_log}\n"
    return text + "shutdown_timeout: 5s\n"


class ZdproxyProxy(Target):
    name = "zdproxy"
    #: where the JSON access log goes; None: off (the default config)
    access_log: Path | None = None

    def __init__(
        self,
        prefix: Path,
        pinning: Pinning,
        topology: Topology,
        port: int,
        command: list[str],
        env: dict[str, str],
        max_connections: int,
    ) -> None:
        super().__init__(prefix, pinning, topology, port)
        self.command = command
        self.env = env
        self.admin_port = free_port()
        self.token = env["ZDPROXY_ADMIN_TOKEN"]
        self.max_connections = max_connections
        self.conf = prefix / "zdproxy.yaml"

    def argv(self) -> list[str]:
        return [*self.command, "run", "-c", str(self.conf)]

    def adjust(self, text: str) -> str:
        """The generated config as written (subclasses change settings here)."""
        return text

    def start(self) -> None:
        self.prefix.mkdir(parents=True, exist_ok=True)
        failures = []
        for extras in (True, False):
            text = zdproxy_yaml(
                self.topology,
                self.port,
                self.admin_port,
                self.prefix / "zdproxy-state.json",
                extras,
                self.max_connections,
                self.access_log,
            )
            self.conf.write_text(self.adjust(text))
            with contextlib.suppress(FileNotFoundError):
                (self.prefix / "zdproxy-state.json").unlink()
            self.proc = ManagedProcess(
                self.name, self.pinning.proxy() + self.argv(), self.prefix / "zdproxy.log", self.env
            )
            self.proc.start()
            try:
                self.wait_ready(25.0)
                return
            except StartError as exc:
                failures.append(str(exc))
                self.proc.stop(timeout=3.0)
                if "max_connections" not in str(exc):
                    break
                log("  zdproxy refused limits.max_connections; retrying with contract keys only")
        raise StartError("\n".join(failures))

    # ------------------------------------------------------------- admin API
    def admin(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        conn = http.client.HTTPConnection("127.0.0.1", self.admin_port, timeout=5.0)
        try:
            headers = {"Authorization": f"Bearer {self.token}"}
            payload = None
            if body is not None:
                payload = json.dumps(body).encode()
                headers["Content-Type"] = "application/json"
            conn.request(method, path, body=payload, headers=headers)
            response = conn.getresponse()
            raw = response.read()
        finally:
            conn.close()
        try:
            data: Any = json.loads(raw) if raw else None
        except ValueError:
            data = raw.decode(errors="replace")
        return response.status, data

    def _call(self, method: str, path: str, body: Any = None) -> Any:
        try:
            status, data = self.admin(method, path, body)
        except OSError as exc:
            raise EventError(f"admin API {method} {path}: {exc}") from exc
        if not 200 <= status < 300:
            raise EventError(f"admin API {method} {path} answered {status}: {data}")
        return data

    def events_unavailable(self) -> str | None:
        try:
            status, data = self.admin("GET", "/api/v1/state")
        except OSError as exc:
            return f"admin API not reachable on 127.0.0.1:{self.admin_port} ({exc})"
        if status != 200:
            return f"admin API GET /api/v1/state answered {status}: {data}"
        return None

    def flip(self, to: str) -> None:
        self._call("POST", "/api/v1/flip", {"to": to})

    def drain(self, backend_id: str) -> None:
        self._call("POST", f"/api/v1/backends/{backend_id}/drain")

    def undrain(self, backend_id: str) -> None:
        self._call("POST", f"/api/v1/backends/{backend_id}/enable")

    def backend_state(self, backend_id: str) -> str | None:
        status, data = self.admin("GET", "/api/v1/state")
        if status != 200:
            return None
        return find_backend_state(data, backend_id)

    def wait_backend_up(self, backend_id: str, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError):
                if self.backend_state(backend_id) == "up":
                    return True
            time.sleep(0.25)
        return False


def find_backend_state(data: Any, backend_id: str) -> str | None:
    """The ``state`` of the backend with ``id == backend_id`` anywhere in a state document."""
    if isinstance(data, dict):
        if data.get("id") == backend_id and isinstance(data.get("state"), str):
            return str(data["state"])
        values: list[Any] = list(data.values())
        # backends may also be keyed by id: {"backends": {"blue-1": {"state": "up"}}}
        for key, value in data.items():
            if (
                key == backend_id
                and isinstance(value, dict)
                and isinstance(value.get("state"), str)
            ):
                return str(value["state"])
    elif isinstance(data, list):
        values = data
    else:
        return None
    for value in values:
        found = find_backend_state(value, backend_id)
        if found is not None:
            return found
    return None


def verify_upload_consumed(port: int) -> bool:
    """The backend's /upload must read the whole body before answering.

    Sends the head and half of a 1 MiB body: no answer may come yet; after the
    other half, a 200 must.
    """
    head = f"POST /upload HTTP/1.1\r\nHost: bench\r\nContent-Length: {UPLOAD_BYTES}\r\n\r\n"
    half = UPLOAD_BYTES // 2
    with socket.create_connection(("127.0.0.1", port), 5.0) as sock:
        sock.sendall(head.encode() + b"u" * half)
        sock.settimeout(0.5)
        try:
            if sock.recv(1024):
                return False
        except TimeoutError:
            pass
        sock.settimeout(5.0)
        sock.sendall(b"u" * (UPLOAD_BYTES - half))
        return sock.recv(4096).startswith(b"HTTP/1.1 200")


class ZdproxyAccessLogProxy(ZdproxyProxy):
    """zdproxy with the JSON access log written to a file: the cost of the log is
    the difference to ``zdproxy`` in the same run (opt-in: ``--proxies``)."""

    name = "zdproxy-log"

    def start(self) -> None:
        self.access_log = self.prefix / "access.log"
        super().start()


class ZdproxyCompiledProxy(ZdproxyProxy):
    """zdproxy's compiled (mypyc) build beside the pure one, from
    ``--zdproxy-compiled-cmd`` (e.g. a virtualenv with ``pip install .``)."""

    name = "zdproxy-compiled"
