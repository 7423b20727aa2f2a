"""The c=200 tail: zdproxy alone under wrk at c=200, with figures to find the cause.

Starts the benchmark's three nginx backends and one proxy (zdproxy with the
benchmark's config, or nginx, or the floor proxy), pinned as in ``run.py``, then
runs wrk at the given concurrency several times and prints req/s, p50, p99 and
max for each run, with the proxy's CPU per request and, for zdproxy, how many
upstream connections it opened (``GET /api/v1/state`` has no such figure: the
count comes from ``/proc/PID/net``-free means, the backends' accepted
connections, read from nginx ``stub_status``).

    python3 benchmarks/tail_bench.py --proxy zdproxy --connections 200 --runs 3
    python3 benchmarks/tail_bench.py --proxy zdproxy --set limits.max_idle_upstream_per_backend=256
    python3 benchmarks/tail_bench.py --proxy floor --connections 50 --path /64k

Loopback only, bounded: every process it starts is stopped by PID at the end.
"""

from __future__ import annotations

import argparse
import os
import re
import secrets
import shutil
import sys
import tempfile
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness.servers import (
    STATUS_PATH,
    Backend,
    FloorProxy,
    ManagedProcess,
    NginxProxy,
    Target,
    Topology,
    ZdproxyProxy,
    free_port,
)
from harness.system import choose_pinning, cpu_seconds
from harness.wrk import (
    Workload,
    latency_ladder,
    parse_wrk_output,
    run_wrk,
    run_wrk_stdout,
    wrk_argv,
)


def accepted(backend: Backend) -> int:
    """Connections the backend accepted so far (nginx stub_status)."""
    url = f"http://127.0.0.1:{backend.port}{STATUS_PATH}"
    text = urllib.request.urlopen(url, timeout=5).read().decode()
    return int(re.search(r"\n\s*(\d+)\s+\d+\s+\d+", text).group(1))  # type: ignore[union-attr]


TCP_COUNTERS = ("DelayedACKs", "TCPWantZeroWindowAdv", "TCPToZeroWindowAdv", "TCPLossProbes")


def tcp_counters() -> dict[str, int]:
    """This network namespace's TcpExt counters (``/proc/net/netstat``): run the
    bench in a namespace of its own (``unshare -n``) to see only its traffic."""
    lines = Path("/proc/net/netstat").read_text().splitlines()
    for names, values in zip(lines[::2], lines[1::2], strict=True):
        if names.startswith("TcpExt:"):
            return dict(zip(names.split()[1:], map(int, values.split()[1:]), strict=True))
    return {}


def with_settings(base: str, settings: list[str]) -> str:
    """Apply ``section.key=value`` overrides to the generated YAML (two levels)."""
    text = base
    for item in settings:
        key, _, value = item.partition("=")
        section, _, name = key.partition(".")
        if f"\n{section}:\n" in text:
            text = text.replace(f"\n{section}:\n", f"\n{section}:\n  {name}: {value}\n", 1)
        else:
            text += f"{section}:\n  {name}: {value}\n"
    return text


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--proxy", choices=("zdproxy", "nginx", "floor"), default="zdproxy")
    parser.add_argument("--zdproxy-cmd", default=f"{sys.executable} -m zdproxy.cli")
    parser.add_argument("--connections", type=int, default=200)
    parser.add_argument("--duration", type=int, default=5)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument(
        "--floor-script", type=Path, help="a variant of floor_proxy.py to run as the floor"
    )
    parser.add_argument("--path", default="/", help="request path, e.g. /64k")
    parser.add_argument("--set", action="append", default=[], help="zdproxy config override")
    args = parser.parse_args()
    pinning = choose_pinning()
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    wrk = shutil.which("wrk") or "wrk"
    work = Path(tempfile.mkdtemp(prefix="zdtail-"))
    work.chmod(0o755)
    try:
        backends = [
            Backend(name, free_port(), work / name, nginx, pinning, worker_connections=4096)
            for name in ("blue-1", "blue-2", "green-1")
        ]
        for backend in backends:
            backend.start()
        topology = Topology(
            blue=tuple((b.backend_id, b.port) for b in backends[:2]),
            green=((backends[2].backend_id, backends[2].port),),
        )
        target: Target
        if args.proxy == "nginx":
            target = NginxProxy(work / "nginx", pinning, topology, free_port(), nginx, 1000)
        elif args.proxy == "floor":
            target = FloorProxy(work / "floor", pinning, topology, free_port())
            if args.floor_script is not None:
                target.script = args.floor_script.resolve()
        else:
            env = dict(os.environ, ZDPROXY_ADMIN_TOKEN=secrets.token_hex(8))
            zd = ZdproxyProxy(
                work / "zd", pinning, topology, free_port(), args.zdproxy_cmd.split(), env, 1000
            )
            zd.adjust = lambda text: with_settings(text, args.set)  # type: ignore[method-assign]
            zd.start()
            target = zd
        if target.proc is None:
            target.start()
        workload = Workload(path=args.path)
        warm = wrk_argv(wrk, pinning, target.port, workload, args.connections, 2, work)
        run_wrk(warm, 2)
        print(f"{args.proxy} c={args.connections} {args.path} load {os.getloadavg()[0]:.1f}")
        for _ in range(args.runs):
            before_cpu = cpu_seconds(target.pids())
            before_conns = sum(accepted(b) for b in backends[:2])
            before_tcp = tcp_counters()
            argv = wrk_argv(
                wrk, pinning, target.port, workload, args.connections, args.duration, work
            )
            stdout = run_wrk_stdout(argv, args.duration)
            result = parse_wrk_output(stdout)
            cpu = cpu_seconds(target.pids()) - before_cpu
            conns = sum(accepted(b) for b in backends[:2]) - before_conns
            after_tcp = tcp_counters()
            per_k = {
                name: (after_tcp.get(name, 0) - before_tcp.get(name, 0))
                * 1000
                / max(result.requests, 1)
                for name in TCP_COUNTERS
            }
            print(
                f"  {result.rps:9,.0f} req/s  p50 {result.p50_us / 1000:6.2f} ms  "
                f"p99 {result.p99_us / 1000:7.2f} ms  max {result.max_us / 1000:7.1f} ms  "
                f"cpu {cpu / max(result.requests, 1) * 1e6:5.1f} us/req  "
                f"upstream connects {conns} ({conns / max(result.requests, 1):.3f}/req)  "
                f"errors {result.errors}"
            )
            print("    latency ms: " + latency_ladder(stdout))
            print("    per 1000 requests: " + "  ".join(f"{k} {v:.1f}" for k, v in per_k.items()))
    finally:
        ManagedProcess.stop_all()
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
