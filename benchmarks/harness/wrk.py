"""Running wrk: one Lua script per case, results as JSON from wrk's ``done`` hook."""

from __future__ import annotations

import json
import subprocess
from dataclasses import asdict, dataclass
from pathlib import Path

from .system import Pinning

_DONE = r"""
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'WRKJSON {"requests":%d,"duration_us":%d,"bytes":%d,' ..
    '"connect":%d,"read":%d,"write":%d,"status":%d,"timeout":%d,' ..
    '"p50_us":%d,"p90_us":%d,"p99_us":%d,"max_us":%d,"mean_us":%.1f}\n',
    summary.requests, summary.duration, summary.bytes,
    e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99),
    latency.max, latency.mean))
  io.write("WRKLADDER")
  for _, p in ipairs({90, 95, 98, 99, 99.5, 99.9}) do
    io.write(string.format(" p%g=%.2f", p, latency:percentile(p) / 1000))
  end
  io.write("\n")
end
"""


@dataclass(frozen=True)
class Workload:
    """What each wrk connection sends."""

    path: str = "/"
    method: str = "GET"
    body_bytes: int = 0
    close: bool = False

    def lua(self) -> str:
        lines = [f'wrk.method = "{self.method}"', f'wrk.path = "{self.path}"']
        if self.body_bytes:
            lines.append(f'wrk.body = string.rep("u", {self.body_bytes})')
            lines.append('wrk.headers["Content-Type"] = "application/octet-stream"')
        if self.close:
            lines.append('wrk.headers["Connection"] = "close"')
        return "\n".join(lines) + "\n" + _DONE


@dataclass
class WrkResult:
    requests: int
    duration_us: int
    bytes: int
    connect: int
    read: int
    write: int
    status: int
    timeout: int
    p50_us: int
    p90_us: int
    p99_us: int
    max_us: int
    mean_us: float

    @property
    def rps(self) -> float:
        return self.requests / (self.duration_us / 1e6) if self.duration_us else 0.0

    @property
    def socket_errors(self) -> int:
        return self.connect + self.read + self.write + self.timeout

    @property
    def errors(self) -> int:
        """Socket errors plus non-2xx/3xx responses."""
        return self.socket_errors + self.status

    def as_dict(self) -> dict[str, float | int]:
        out: dict[str, float | int] = dict(asdict(self))
        out["rps"] = round(self.rps, 1)
        out["errors"] = self.errors
        return out


def parse_wrk_output(stdout: str) -> WrkResult:
    for line in stdout.splitlines():
        if line.startswith("WRKJSON "):
            return WrkResult(**json.loads(line.removeprefix("WRKJSON ")))
    raise ValueError("wrk printed no WRKJSON line:\n" + stdout[-2000:])


def script_for(workload: Workload, directory: Path) -> Path:
    name = f"{workload.method.lower()}{workload.path.replace('/', '_')}"
    name += f"_{workload.body_bytes}" if workload.body_bytes else ""
    name += "_close" if workload.close else ""
    path = directory / f"wrk_{name}.lua"
    path.write_text(workload.lua())
    return path


def wrk_argv(
    wrk_bin: str,
    pinning: Pinning,
    port: int,
    workload: Workload,
    connections: int,
    duration: float,
    script_dir: Path,
) -> list[str]:
    return [
        *pinning.load(),
        wrk_bin,
        "-t1",
        f"-c{connections}",
        f"-d{max(1, round(duration))}s",
        "--timeout",
        "5s",
        "--latency",
        "-s",
        str(script_for(workload, script_dir)),
        f"http://127.0.0.1:{port}{workload.path}",
    ]


def run_wrk(argv: list[str], duration: float) -> WrkResult:
    """Run wrk to completion (bounded: killed after duration + 30 s)."""
    return parse_wrk_output(run_wrk_stdout(argv, duration))


def run_wrk_stdout(argv: list[str], duration: float) -> str:
    """wrk's output (its latency ladder too: ``latency_ladder``)."""
    done = subprocess.run(argv, capture_output=True, text=True, timeout=duration + 30, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"wrk failed ({done.returncode}): {done.stderr.strip()[-500:]}")
    return done.stdout


def latency_ladder(stdout: str) -> str:
    """The upper percentiles in ms (``p90=1.20 p95=...``), from the ``done`` hook."""
    for line in stdout.splitlines():
        if line.startswith("WRKLADDER "):
            return line.removeprefix("WRKLADDER ")
    return ""


def start_wrk(argv: list[str]) -> subprocess.Popen[str]:
    """wrk in the background (events scenario); finish with ``finish_wrk``."""
    return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish_wrk(proc: subprocess.Popen[str], timeout: float) -> WrkResult:
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        raise RuntimeError("wrk did not finish in time") from None
    if proc.returncode != 0:
        raise RuntimeError(f"wrk failed ({proc.returncode}): {stderr.strip()[-500:]}")
    return parse_wrk_output(stdout)
