"""Instructions per request of a zdproxy process, counted by valgrind (callgrind).

CPU time per request is noisy on a shared machine; an instruction count is not, so
a regression cannot hide in it. zdproxy runs under ``valgrind --tool=callgrind``
with the benchmark's config (every feature on, tests' 1 KiB keep-alive GETs), a
Python backend answers 1 KiB outside valgrind, and this driver sends requests
over keep-alive connections. Counters are zeroed before the measured requests
and dumped after (``callgrind_control``); an idle interval as long as the measured
one is counted the same way and subtracted (health checks, timers).

    python3 benchmarks/instructions.py --zdproxy-cmd .venv-test/bin/zdproxy

Counts are user-space instructions of the whole process (the kernel's are not
seen), one request at a time per connection: a figure to compare builds and
commits with, not the CPU cost at c=50.
"""

from __future__ import annotations

import argparse
import asyncio
import email.utils
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness.servers import HaproxyProxy, NginxProxy, Topology, free_port, zdproxy_yaml
from harness.system import Pinning

BODY = b"x" * 1024
#: the head nginx sends for a static file (the backends of benchmarks/run.py): what
#: the proxy's response-head rewriting sees there, Date changing every second
HEAD = (
    b"HTTP/1.1 200 OK\r\nServer: nginx/1.22.1\r\nDate: %s\r\n"
    b"Content-Type: application/octet-stream\r\nContent-Length: 1024\r\n"
    b"Last-Modified: Tue, 01 Dec 2026 05:00:00 GMT\r\nConnection: keep-alive\r\n"
    b'ETag: "692cf000-400"\r\nAccept-Ranges: bytes\r\n\r\n'
)


def response() -> bytes:
    return HEAD % email.utils.formatdate(usegmt=True).encode("ascii") + BODY


class _Backend(asyncio.Protocol):
    """Answers every request head with 1 KiB (GETs only, keep-alive), as nginx does."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        self.buf = b""

    def data_received(self, data: bytes) -> None:
        self.buf += data
        while (end := self.buf.find(b"\r\n\r\n")) >= 0:
            self.buf = self.buf[end + 4 :]
            self.transport.write(response())  # type: ignore[attr-defined]


def start_backends(ports: list[int]) -> None:
    loop = asyncio.new_event_loop()

    async def serve() -> None:
        for port in ports:
            await loop.create_server(_Backend, "127.0.0.1", port)

    loop.run_until_complete(serve())
    threading.Thread(target=loop.run_forever, daemon=True).start()


def read_response(sock: socket.socket) -> bytes:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("closed")
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = int(re.search(rb"(?i)content-length: *(\d+)", head).group(1))  # type: ignore[union-attr]
    while len(body) < length:
        body += sock.recv(65536)
    return head


def send_requests(port: int, count: int, connections: int) -> None:
    socks = [socket.create_connection(("127.0.0.1", port)) for _ in range(connections)]
    request = f"GET / HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n".encode()
    for i in range(count):
        sock = socks[i % connections]
        sock.sendall(request)
        head = read_response(sock)
        if not head.startswith(b"HTTP/1.1 200"):
            raise AssertionError(head[:200])
    for sock in socks:
        sock.close()


def callgrind_total(pid: int, out: Path, keep: Path | None = None) -> int:
    """Dump the counters since the last zeroing and return the instruction total
    (the dump copied to ``keep`` when given, for ``callgrind_annotate``)."""
    before = set(out.parent.glob(out.name + "*"))
    subprocess.run(["callgrind_control", "-d", str(pid)], check=True, capture_output=True)
    for _ in range(600):
        new = set(out.parent.glob(out.name + "*")) - before
        if new:
            dump = max(new, key=lambda p: p.stat().st_mtime)
            text = dump.read_text()
            match = re.search(r"^(?:summary|totals): *(\d+)", text, re.M)
            if match:
                if keep is not None:
                    shutil.copyfile(dump, keep)
                return int(match.group(1))
        time.sleep(0.1)
    raise TimeoutError("no callgrind dump")


def zero(pid: int) -> None:
    subprocess.run(["callgrind_control", "-z", str(pid)], check=True, capture_output=True)


def wait_port(port: int, proc: subprocess.Popen[bytes], seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError("zdproxy exited")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(f"port {port}")


def wait_healthy(port: int, seconds: float) -> None:
    """Until the health checks (rise: 2) let requests through."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        with socket.create_connection(("127.0.0.1", port)) as sock:
            sock.sendall(f"GET / HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n".encode())
            if read_response(sock).startswith(b"HTTP/1.1 200"):
                return
        time.sleep(0.5)
    raise TimeoutError("backends never healthy")


def proxy_argv(
    proxy: str, command: list[str], work: Path, topology: Topology, port: int, sticky: str
) -> list[str]:
    """The command line of the proxy to count, its config written into ``work``."""
    if proxy == "floor":
        script = Path(__file__).resolve().parent / "floor_proxy.py"
        return [sys.executable, str(script), str(port), *(str(p) for _, p in topology.blue)]
    if proxy == "nginx":
        nginx = shutil.which("nginx") or "/usr/sbin/nginx"
        target = NginxProxy(work, Pinning(None, None), topology, port, nginx, 1000)
        conf = work / "nginx.conf"
        # one process: the one valgrind counts does all the work
        conf.write_text(target.render().replace("master_process on;", "master_process off;"))
        return [nginx, "-p", str(work), "-c", str(conf), "-e", str(work / "error.log")]
    if proxy == "haproxy":
        haproxy = shutil.which("haproxy") or "/usr/sbin/haproxy"
        conf = work / "haproxy.cfg"
        target = HaproxyProxy(work, Pinning(None, None), topology, port, haproxy, 1000)
        conf.write_text(target.render())
        return [haproxy, "-db", "-f", str(conf)]
    admin = free_port()
    conf = work / "zdproxy.yaml"
    text = zdproxy_yaml(topology, port, admin, work / "state.json", False, 1000)
    # every request is cookie-less: with backend, each one gets a pin (the worst case)
    conf.write_text(text.replace("  mode: pool\n", f"  mode: {sticky}\n"))
    return [*command, "run", "-c", str(conf)]


def measure(
    command: list[str],
    requests: int,
    connections: int,
    sticky: str = "pool",
    proxy: str = "zdproxy",
    keep: Path | None = None,
) -> dict[str, float]:
    ports = [free_port() for _ in range(3)]
    start_backends(ports)
    topology = Topology(
        blue=(("blue-1", ports[0]), ("blue-2", ports[1])), green=(("green-1", ports[2]),)
    )
    work = Path(tempfile.mkdtemp(prefix="zd-instr-"))
    work.chmod(0o755)  # nginx may run as another user
    port = free_port()
    argv = proxy_argv(proxy, command, work, topology, port, sticky)
    out = work / "callgrind.out"
    env = {**os.environ, "ZDPROXY_ADMIN_TOKEN": "bench"}
    valgrind = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}"]
    proc = subprocess.Popen(
        [*valgrind, *argv],
        cwd=work,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=(work / "valgrind.log").open("wb"),
    )
    try:
        wait_port(port, proc, 600)
        wait_healthy(port, 300)
        send_requests(port, max(200, requests // 10), connections)  # warm up
        zero(proc.pid)
        started = time.monotonic()
        send_requests(port, requests, connections)
        elapsed = time.monotonic() - started
        busy = callgrind_total(proc.pid, out, keep)
        zero(proc.pid)
        time.sleep(elapsed)
        idle = callgrind_total(proc.pid, out)
    finally:
        proc.terminate()
        proc.wait(60)
        shutil.rmtree(work, ignore_errors=True)
    return {
        "requests": requests,
        "instructions_per_request": (busy - idle) / requests,
        "idle_instructions": idle,
        "seconds": elapsed,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--zdproxy-cmd", default=f"{shlex.quote(sys.executable)} -m zdproxy.cli")
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--connections", type=int, default=10)
    parser.add_argument("--sticky", choices=("off", "pool", "backend"), default="pool")
    parser.add_argument(
        "--proxy", choices=("zdproxy", "nginx", "haproxy", "floor"), default="zdproxy"
    )
    parser.add_argument(
        "--keep",
        type=Path,
        help="copy the measured interval's callgrind dump here (for callgrind_annotate)",
    )
    args = parser.parse_args()
    result = measure(
        shlex.split(args.zdproxy_cmd),
        args.requests,
        args.connections,
        args.sticky,
        args.proxy,
        args.keep,
    )
    print(
        f"{result['instructions_per_request']:,.0f} instructions per request "
        f"({args.requests} requests in {result['seconds']:.1f} s under callgrind, "
        f"idle interval {result['idle_instructions']:,} subtracted)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
