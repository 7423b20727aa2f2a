#!/usr/bin/env python3
"""TLS cost, zdproxy against nginx: ``python benchmarks/tls_bench.py [--duration 10]``.

Both proxies terminate TLS with the same certificate (EC P-256, made here by
openssl) and the same settings (TLS 1.2+, ALPN http/1.1), one process (nginx: one
worker) pinned to its own CPU, in front of the same two nginx backends, driven by
the same wrk over https:

* keep-alive: requests/s and proxy CPU per request over a few long connections
  (the cost of encrypting, once the handshake is paid);
* plain: the same proxies over http, keep-alive, for reference (what TLS adds
  per request is keepalive minus plain);
* new handshake: every request on a new connection (``Connection: close``; wrk
  does not resume sessions), so each one pays a full handshake.

Ratios are zdproxy / nginx. Loopback only, bounded by ``--duration`` per run.
The figures go to stdout and, as JSON, to ``--out``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from harness.servers import (  # noqa: E402
    Backend,
    ManagedProcess,
    _nginx_argv,
    _nginx_common,
    _nginx_temp_paths,
    free_port,
    wait_port,
)
from harness.system import choose_pinning, find_tool, log, tree_cpu_seconds  # noqa: E402
from harness.wrk import Workload, parse_wrk_output, script_for  # noqa: E402

ROOT = HERE.parent


def make_certificate(directory: Path) -> tuple[Path, Path]:
    cert, key = directory / "bench.pem", directory / "bench.key"
    subprocess.run(
        [
            "openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
            "-nodes", "-keyout", str(key), "-out", str(cert), "-days", "2",
            "-subj", "/CN=bench.test", "-addext", "subjectAltName=DNS:bench.test",
        ],
        check=True,
        capture_output=True,
        timeout=60,
    )  # fmt: skip
    return cert, key


def nginx_tls_conf(
    prefix: Path, plain: int, port: int, backends: list[int], cert: Path, key: Path
) -> str:
    servers = "\n".join(f"    server 127.0.0.1:{p};" for p in backends)
    return (
        _nginx_common(prefix, 4096)
        + f"""http {{
  access_log off;
  keepalive_requests 1000000;
  keepalive_timeout 75s;
{_nginx_temp_paths(prefix)}
  upstream backends {{
{servers}
    keepalive 64;
  }}
  server {{
    listen 127.0.0.1:{plain} backlog=4096;
    listen 127.0.0.1:{port} ssl backlog=4096;
    ssl_certificate {cert};
    ssl_certificate_key {key};
    ssl_protocols TLSv1.2 TLSv1.3;
    ssl_session_cache off;
    ssl_session_tickets off;
    location / {{
      proxy_pass http://backends;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_set_header X-Forwarded-Proto $scheme;
    }}
  }}
}}
"""
    )


def zdproxy_conf(plain: int, port: int, backends: list[int], cert: Path, key: Path) -> str:
    members = "".join(f"      - address: 127.0.0.1:{p}\n" for p in backends)
    return f"""listen:
  - 127.0.0.1:{plain}
  - address: 127.0.0.1:{port}
    tls: {{cert: {cert}, key: {key}}}
admin: {{enabled: false}}
state: {{path: null}}
health_check: {{enabled: false}}
log: {{level: warning}}
pools:
  blue:
    weight: 100
    backends:
{members}shutdown_timeout: 2s
"""


def run_wrk(
    wrk: str, load_prefix: list[str], url: str, workload: Workload, conns: int, secs: int, d: Path
) -> Any:
    argv = [
        *load_prefix, wrk, "-t1", f"-c{conns}", f"-d{secs}s", "--timeout", "5s", "--latency",
        "-s", str(script_for(workload, d)), url,
    ]  # fmt: skip
    done = subprocess.run(argv, capture_output=True, text=True, timeout=secs + 30, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"wrk failed: {done.stderr[-500:]}")
    return parse_wrk_output(done.stdout)


#: (scenario, https?, workload); "plain" is the same proxy over http, for reference
SCENARIOS = (
    ("plain", False, Workload()),
    ("keepalive", True, Workload()),
    ("handshake", True, Workload(close=True)),
)


def measure(
    name: str,
    proc: ManagedProcess,
    wrk: str,
    load_prefix: list[str],
    ports: tuple[int, int],
    args: Any,
    d: Path,
) -> dict[str, Any]:
    """``ports``: (plain, tls)."""
    out: dict[str, Any] = {}
    for scenario, tls, workload in SCENARIOS:
        conns = args.handshake_connections if workload.close else args.connections
        url = f"https://127.0.0.1:{ports[1]}/" if tls else f"http://127.0.0.1:{ports[0]}/"
        # a short warm-up, then the measured run with the proxy's CPU counted
        run_wrk(wrk, load_prefix, url, workload, conns, 1, d)
        cpu = tree_cpu_seconds(proc.pid)
        result = run_wrk(wrk, load_prefix, url, workload, conns, args.duration, d)
        cpu = tree_cpu_seconds(proc.pid) - cpu
        figures = {
            "rps": round(result.rps, 1),
            "requests": result.requests,
            "errors": result.errors,
            "p50_ms": round(result.p50_us / 1000, 2),
            "p99_ms": round(result.p99_us / 1000, 2),
            "cpu_seconds": round(cpu, 2),
            "cpu_us_per_request": round(cpu * 1e6 / result.requests, 1)
            if result.requests
            else None,
        }
        log(f"  {name} {scenario}: {figures}")
        out[scenario] = figures
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=int, default=10, help="seconds per measured run")
    parser.add_argument("--connections", type=int, default=50, help="keep-alive connections")
    parser.add_argument("--handshake-connections", type=int, default=20)
    parser.add_argument("--out", type=Path, default=HERE / "results" / "tls.json")
    args = parser.parse_args()
    nginx, wrk = find_tool("nginx"), find_tool("wrk")
    if nginx is None or wrk is None or shutil.which("openssl") is None:
        log("needs nginx, wrk and openssl")
        return 2
    pinning = choose_pinning()
    work = Path(tempfile.mkdtemp(prefix="zdproxy-tls-bench-"))
    results: dict[str, Any] = {}
    try:
        cert, key = make_certificate(work)
        backends = []
        for n in (1, 2):
            backend = Backend(f"b{n}", free_port(), work / f"b{n}", nginx, pinning)
            backend.start()
            backends.append(backend)
        ports = [b.port for b in backends]

        port, plain = free_port(), free_port()
        prefix = work / "nginx"
        prefix.mkdir()
        conf = prefix / "nginx.conf"
        conf.write_text(nginx_tls_conf(prefix, plain, port, ports, cert, key))
        proc = ManagedProcess(
            "nginx", pinning.proxy() + _nginx_argv(nginx, conf, prefix), prefix / "out.log"
        )
        proc.start()
        if not wait_port(port, 10, proc):
            raise RuntimeError("nginx did not start: " + proc.log_tail())
        results["nginx"] = measure("nginx", proc, wrk, pinning.load(), (plain, port), args, work)
        proc.stop()

        port, plain = free_port(), free_port()
        conf = work / "zdproxy.yaml"
        conf.write_text(zdproxy_conf(plain, port, ports, cert, key))
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        command = [sys.executable, "-m", "zdproxy.cli", "run", "-c", str(conf)]
        proc = ManagedProcess("zdproxy", pinning.proxy() + command, work / "zdproxy.log", env)
        proc.start()
        if not wait_port(port, 15, proc):
            raise RuntimeError("zdproxy did not start: " + proc.log_tail())
        results["zdproxy"] = measure(
            "zdproxy", proc, wrk, pinning.load(), (plain, port), args, work
        )
        proc.stop()
    finally:
        ManagedProcess.stop_all()
        with contextlib.suppress(OSError):
            shutil.rmtree(work)
    ratios = {
        scenario: {
            "rps": round(
                results["zdproxy"][scenario]["rps"] / results["nginx"][scenario]["rps"], 2
            ),
            "cpu_per_request": round(
                results["zdproxy"][scenario]["cpu_us_per_request"]
                / results["nginx"][scenario]["cpu_us_per_request"],
                2,
            ),
        }
        for scenario, _, _ in SCENARIOS
    }
    # what TLS adds per keep-alive request, in each proxy (CPU microseconds)
    overhead = {
        name: round(r["keepalive"]["cpu_us_per_request"] - r["plain"]["cpu_us_per_request"], 1)
        for name, r in results.items()
    }
    report = {
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "settings": vars(args) | {"out": str(args.out)},
        "results": results,
        "ratios_zdproxy_over_nginx": ratios,
        "tls_cpu_us_per_keepalive_request": overhead,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps({"results": results, "ratios": ratios, "tls_overhead_us": overhead}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
