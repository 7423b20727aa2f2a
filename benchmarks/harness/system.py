"""Machine facts, tool installation, CPU pinning and per-process-tree accounting.

Everything here reads ``/proc`` directly: the proxy's CPU cost is the sum of
``utime + stime`` of every process in its tree (nginx master and worker,
HAProxy, zdproxy and any worker processes it forks), and its memory is the sum
of their ``VmRSS``.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import importlib
import os
import platform
import resource
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

CLK_TCK = os.sysconf("SC_CLK_TCK")
APT_TOOLS = {"wrk": "wrk", "nginx": "nginx", "haproxy": "haproxy"}


def log(message: str) -> None:
    print(message, flush=True)


def find_tool(name: str) -> str | None:
    """``shutil.which`` that also looks in the sbin directories (nginx, haproxy)."""
    found = shutil.which(name)
    if found:
        return found
    for directory in ("/usr/sbin", "/sbin", "/usr/local/sbin"):
        candidate = Path(directory) / name
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    return None


def ensure_apt_tools(names: list[str], install: bool) -> dict[str, str]:
    """Paths of the tools in ``names``; installs the missing ones with apt-get."""
    missing = [name for name in names if find_tool(name) is None]
    if missing and install:
        if os.geteuid() != 0 or shutil.which("apt-get") is None:
            log(f"! missing {', '.join(missing)} and cannot apt-get install them (not root/apt)")
        else:
            packages = [APT_TOOLS[name] for name in missing]
            log(f"* installing {' '.join(packages)} with apt-get")
            env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
            subprocess.run(["apt-get", "update"], check=False, env=env, timeout=600)
            subprocess.run(
                ["apt-get", "install", "-y", "--no-install-recommends", *packages],
                check=False,
                env=env,
                timeout=900,
            )
    paths: dict[str, str] = {}
    for name in names:
        path = find_tool(name)
        if path:
            paths[name] = path
    return paths


def ensure_pip_module(module: str, package: str, install: bool) -> bool:
    """Import ``module``, pip-installing ``package`` first when it is missing."""
    try:
        importlib.import_module(module)
        return True
    except ImportError:
        pass
    if not install:
        return False
    log(f"* installing {package} with pip")
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", package], check=False, timeout=600
    )
    importlib.invalidate_caches()
    try:
        importlib.import_module(module)
        return True
    except ImportError:
        return False


def raise_nofile(wanted: int) -> int:
    """Raise RLIMIT_NOFILE (soft, and hard when allowed) to ``wanted``; return the soft limit.

    Child processes (proxies, wrk) inherit it.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target_hard = hard if hard == resource.RLIM_INFINITY or hard >= wanted else wanted
    for new_hard in (target_hard, hard):
        new_soft = wanted if new_hard == resource.RLIM_INFINITY else min(wanted, new_hard)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, new_soft), new_hard))
            break
        except (ValueError, OSError):
            continue
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


@dataclass(frozen=True)
class Pinning:
    """Which CPUs the load side (wrk, backends) and the proxy under test run on."""

    load_cpu: int | None
    proxy_cpu: int | None

    def prefix(self, cpu: int | None) -> list[str]:
        taskset = shutil.which("taskset")
        if cpu is None or taskset is None:
            return []
        return [taskset, "-c", str(cpu)]

    def load(self) -> list[str]:
        return self.prefix(self.load_cpu)

    def proxy(self) -> list[str]:
        return self.prefix(self.proxy_cpu)


def choose_pinning() -> Pinning:
    """CPU 0 for load and backends, CPU 1 for the proxy; no pinning on one CPU."""
    try:
        cpus = sorted(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - non-Linux
        return Pinning(None, None)
    if len(cpus) < 2:
        log("! fewer than 2 CPUs available: nothing is pinned, figures will be noisier")
        return Pinning(None, None)
    if shutil.which("taskset") is None:
        log("! taskset not found (util-linux): proxies are not pinned")
        return Pinning(None, None)
    pinning = Pinning(cpus[0], cpus[1])
    # the harness itself (and so every child it does not pin) stays off the proxy's CPU
    with contextlib.suppress(OSError):
        os.sched_setaffinity(0, {cpus[0]})
    return pinning


# ----------------------------------------------------------------- /proc accounting


def _stat_fields(pid: int) -> list[str] | None:
    try:
        data = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # the command name is in parentheses and may contain spaces
    return data[data.rfind(")") + 2 :].split()


def process_tree(root: int) -> list[int]:
    """``root`` and all its live descendants."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        fields = _stat_fields(int(entry))
        if fields is None or len(fields) < 2:
            continue
        children.setdefault(int(fields[1]), []).append(int(entry))
    if _stat_fields(root) is None:
        return []
    tree, todo = [], [root]
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo.extend(children.get(pid, ()))
    return tree


def cpu_seconds(pids: list[int]) -> float:
    """Sum of user+system CPU seconds of ``pids`` (all threads of each)."""
    ticks = 0
    for pid in pids:
        fields = _stat_fields(pid)
        if fields is None or len(fields) < 13:
            continue
        ticks += int(fields[11]) + int(fields[12])
    return ticks / CLK_TCK


def tree_cpu_seconds(root: int) -> float:
    return cpu_seconds(process_tree(root))


def cpu_busy_seconds(cpu: int) -> float:
    """Seconds CPU ``cpu`` spent running tasks (user, nice, system) or stolen by the
    hypervisor, since boot (/proc/stat). Interrupt and softirq time are left out:
    on loopback much of it is the proxy's own network traffic."""
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/stat").read_text().splitlines():
            if line.startswith(f"cpu{cpu} "):
                ticks = [int(x) for x in line.split()[1:]]
                user, nice, system, steal = ticks[0], ticks[1], ticks[2], ticks[7]
                return (user + nice + system + steal) / CLK_TCK
    return 0.0


def rss_kib(pids: list[int]) -> int:
    """Sum of VmRSS of ``pids`` in KiB."""
    total = 0
    for pid in pids:
        try:
            text = Path(f"/proc/{pid}/status").read_text()
        except OSError:
            continue
        for line in text.splitlines():
            if line.startswith("VmRSS:"):
                total += int(line.split()[1])
                break
    return total


# ----------------------------------------------------------------- machine description


def _first_line(command: list[str]) -> str:
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return "not installed"
    text = (done.stdout + done.stderr).strip()
    return text.splitlines()[0] if text else "unknown"


def machine_info(tools: dict[str, str]) -> dict[str, str]:
    model = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    mem_total = "unknown"
    with contextlib.suppress(OSError, IndexError, ValueError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem_total = f"{int(line.split()[1]) // 1024} MiB"
    os_name = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/etc/os-release").read_text().splitlines():
            if line.startswith("PRETTY_NAME="):
                os_name = line.split("=", 1)[1].strip('"')
    info = {
        "date": _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu": model,
        "cores": str(os.cpu_count() or 0),
        "memory": mem_total,
        "os": os_name,
        "kernel": platform.release(),
        "python": platform.python_version(),
    }
    if "nginx" in tools:
        info["nginx"] = _first_line([tools["nginx"], "-v"]).removeprefix("nginx version: ")
    if "haproxy" in tools:
        info["haproxy"] = _first_line([tools["haproxy"], "-v"]).split(" - ")[0]
    if "wrk" in tools:
        info["wrk"] = _first_line([tools["wrk"], "-v"]).split(" Copyright")[0]
    return info
