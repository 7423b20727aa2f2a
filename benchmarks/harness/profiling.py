"""``--profile``: zdproxy under wrk load (1 KiB GET keep-alive, c=50) sampled by py-spy.

Writes ``profile.svg`` (flame graph, by line), ``profile.raw.txt`` (collapsed
stacks, by function) and ``profile-top.txt`` (the functions with the most
samples, self and inclusive) into the results directory.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

from .servers import Target
from .system import Pinning, log
from .wrk import Workload, finish_wrk, start_wrk, wrk_argv


def find_py_spy(install: bool) -> str | None:
    found = shutil.which("py-spy")
    if found is None and install:
        log("* installing py-spy with pip")
        subprocess.run(
            [sys.executable, "-m", "pip", "install", "--quiet", "py-spy"], check=False, timeout=600
        )
        found = shutil.which("py-spy") or shutil.which(str(Path(sys.executable).parent / "py-spy"))
    return found


_PROCESS_FRAME = re.compile(r'^process \d+:(?:"[^"]*"|[^;]*);?')
NO_PYTHON_FRAME = "(no Python frame: native code, e.g. the event loop's I/O)"


def top_functions(collapsed: str, limit: int = 30) -> str:
    """A text summary of py-spy's collapsed stacks: self and inclusive sample shares."""
    own: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    total = 0
    for line in collapsed.splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        # with --subprocesses the first frame is 'process PID:"command line"', and the
        # command line may itself contain ';'
        stack = _PROCESS_FRAME.sub("", stack)
        frames = [f for f in stack.split(";") if f] or [NO_PYTHON_FRAME]
        total += count
        own[frames[-1]] += count
        for frame in set(frames):
            inclusive[frame] += count
    if not total:
        return "no samples\n"
    out = [
        f"{total} samples. Self time at the event loop's run() is time in uvloop's C code",
        "(system calls, callbacks' dispatch); py-spy --native would break it down.",
        "",
        "self %  function (file)",
    ]
    out += [f"{100 * n / total:6.1f}  {frame}" for frame, n in own.most_common(limit)]
    out += ["", "incl %  function (file)"]
    out += [f"{100 * n / total:6.1f}  {frame}" for frame, n in inclusive.most_common(limit)]
    return "\n".join(out) + "\n"


def run_profile(
    target: Target,
    wrk_bin: str,
    pinning: Pinning,
    workdir: Path,
    out_dir: Path,
    duration: int,
    py_spy: str,
) -> list[str]:
    """Profile ``target`` (zdproxy) while wrk drives c=50; returns the files written."""
    assert target.proc is not None
    out_dir.mkdir(parents=True, exist_ok=True)
    load_seconds = 2 * duration + 6
    argv = wrk_argv(wrk_bin, pinning, target.port, Workload(), 50, load_seconds, workdir)
    wrk = start_wrk(argv)
    time.sleep(2.0)
    written = []
    base = [
        *pinning.load(),
        py_spy,
        "record",
        "--pid",
        str(target.proc.pid),
        "--subprocesses",
        "--nonblocking",
        "--rate",
        "250",
        "--duration",
        str(duration),
    ]
    svg = out_dir / "profile.svg"
    raw = out_dir / "profile.raw.txt"
    for extra, path in (
        (["--format", "flamegraph"], svg),
        (["--format", "raw", "--function"], raw),
    ):
        log(f"  py-spy record -> {path}")
        done = subprocess.run(
            [*base, *extra, "-o", str(path)],
            capture_output=True,
            text=True,
            timeout=duration + 60,
            check=False,
        )
        if done.returncode != 0 or not path.exists():
            message = (done.stderr or done.stdout).strip()[-800:]
            log(f"! py-spy failed ({done.returncode}): {message}")
            continue
        written.append(str(path))
    result = finish_wrk(wrk, load_seconds + 30)
    log(
        f"  load during profiling: {result.rps:,.0f} req/s, p99 {result.p99_us / 1000:.2f} ms, "
        f"errors {result.errors} (py-spy sampling slows the proxy somewhat)"
    )
    if raw.exists():
        top = out_dir / "profile-top.txt"
        top.write_text(top_functions(raw.read_text()))
        written.append(str(top))
        print(top.read_text()[:4000])
    return written
