#!/usr/bin/env python3
"""req/s and CPU per request with 1 and 2 workers:
``python benchmarks/workers_bench.py [--duration 10]``.

The same zdproxy config with ``workers: 1`` then ``workers: 2``, in front of one
nginx backend (1 KiB at /), driven by the same wrk run: keep-alive (64
connections) and a new connection per request (``Connection: close``). CPU is
the whole zdproxy process tree's (control process and workers), from /proc.
The share of requests each worker answered comes from ``/api/v1/state``.
Nothing is pinned: two workers need both cores. Loopback only, bounded by
``--duration`` per run. Figures to stdout and, as JSON, to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import yaml

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from harness.servers import Backend, free_port, wait_port  # noqa: E402
from harness.system import Pinning, find_tool, tree_cpu_seconds  # noqa: E402

ROOT = HERE.parent
TOKEN = "bench-token-0123456789abcdef0123"


def state(admin_port: int) -> dict[str, Any]:
    request = urllib.request.Request(
        f"http://127.0.0.1:{admin_port}/api/v1/state",
        headers={"Authorization": f"Bearer {TOKEN}"},
    )
    with urllib.request.urlopen(request, timeout=5) as answer:
        result: dict[str, Any] = json.load(answer)
        return result


def run_wrk(url: str, duration: int, close: bool) -> tuple[float, int, int]:
    """(requests/s, requests, socket errors + non-2xx)."""
    argv = ["wrk", "-t2", "-c64", f"-d{duration}s", url]
    if close:
        argv[1:1] = ["-H", "Connection: close"]
    out = subprocess.run(argv, capture_output=True, text=True, timeout=duration + 30).stdout
    rate = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    total = int(re.search(r"(\d+) requests in", out).group(1))  # type: ignore[union-attr]
    errors = sum(int(n) for n in re.findall(r"(?:connect|read|write|timeout) (\d+)", out))
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    return rate, total, errors + (int(non2xx.group(1)) if non2xx else 0)


def measure(workers: int, backend_port: int, duration: int, work: Path) -> list[dict[str, Any]]:
    port, admin_port = free_port(), free_port()
    config = {
        "listen": [f"127.0.0.1:{port}"],
        "admin": {"listen": f"127.0.0.1:{admin_port}", "token_env": "BENCH_TOKEN"},
        "state": {"path": None},
        "health_check": {"enabled": False},
        "workers": workers,
        "pools": {"blue": {"weight": 100, "backends": [{"address": f"127.0.0.1:{backend_port}"}]}},
    }
    path = work / f"workers{workers}.yaml"
    path.write_text(yaml.safe_dump(config))
    env = {**os.environ, "BENCH_TOKEN": TOKEN, "PYTHONPATH": str(ROOT)}
    with open(work / f"workers{workers}.log", "ab") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "zdproxy.cli", "run", "-c", str(path)],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
        )
    try:
        wait_port(admin_port, 30.0)
        deadline = time.monotonic() + 30
        while workers > 1 and time.monotonic() < deadline:
            listed = state(admin_port).get("workers") or []
            if len(listed) == workers and all(w["ready"] for w in listed):
                break
            time.sleep(0.1)
        url = f"http://127.0.0.1:{port}/"
        run_wrk(url, 2, close=False)  # warm-up
        rows = []
        for close in (False, True):
            before = state(admin_port).get("workers") or []
            cpu = tree_cpu_seconds(proc.pid)
            rate, total, errors = run_wrk(url, duration, close)
            cpu = tree_cpu_seconds(proc.pid) - cpu
            time.sleep(0.5)  # the workers' last counters
            after = state(admin_port).get("workers") or []
            shares = [a["requests"] - b["requests"] for a, b in zip(after, before, strict=True)]
            rows.append(
                {
                    "workers": workers,
                    "connections": "new per request" if close else "keep-alive (64)",
                    "requests_per_s": round(rate),
                    "requests": total,
                    "errors": errors,
                    "cpu_us_per_request": round(cpu / total * 1e6, 1),
                    "per_worker_requests": shares,
                }
            )
        return rows
    finally:
        proc.terminate()
        proc.wait(30)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--duration", type=int, default=10)
    parser.add_argument("--out", default=str(HERE / "results" / "workers.json"))
    args = parser.parse_args()
    nginx = find_tool("nginx")
    if nginx is None or find_tool("wrk") is None:
        print("needs nginx and wrk", file=sys.stderr)
        return 1
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        backend = Backend("b1", free_port(), work / "b1", nginx, Pinning(None, None))
        backend.start()
        try:
            rows = [row for n in (1, 2) for row in measure(n, backend.port, args.duration, work)]
        finally:
            backend.stop()
    print(f"{'workers':>7} {'connections':<18} {'req/s':>8} {'CPU us/req':>10} errors  per worker")
    for row in rows:
        print(
            f"{row['workers']:>7} {row['connections']:<18} {row['requests_per_s']:>8} "
            f"{row['cpu_us_per_request']:>10} {row['errors']:>6}  {row['per_worker_requests']}"
        )
    Path(args.out).write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
