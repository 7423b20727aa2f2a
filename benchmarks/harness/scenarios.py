"""The scenarios and the loop that runs them.

Throughput cases run in rounds; in each round every target runs every case,
targets interleaved (rotated each round) so that slow drift of the machine
spreads over all of them. Within a round, a target's time on a case is cut into
slices taken in turns with the other targets (``combine_slices``): the CPU time
per request of these shared machines moves by 15 % from one second to the next
(docs/benchmarks.md), and a single block per target would catch one such second
and not the others. The proxies run side by side for the whole session, pinned
to the same CPU; only the one under load does work.
"""

from __future__ import annotations

import contextlib
import resource
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .memory import measure_idle_memory
from .servers import UPLOAD_BYTES, Backend, EventError, Target
from .system import Pinning, cpu_busy_seconds, log, tree_cpu_seconds
from .wrk import Workload, WrkResult, finish_wrk, run_wrk, start_wrk, wrk_argv


@dataclass(frozen=True)
class Case:
    key: str
    scenario: str
    title: str
    workload: Workload
    connections: int


CASES: tuple[Case, ...] = (
    Case("keepalive-c10", "keepalive", "1 KiB GET, keep-alive, c=10", Workload(), 10),
    Case("keepalive-c50", "keepalive", "1 KiB GET, keep-alive, c=50", Workload(), 50),
    Case("keepalive-c200", "keepalive", "1 KiB GET, keep-alive, c=200", Workload(), 200),
    Case("large-c50", "large", "64 KiB responses, keep-alive, c=50", Workload(path="/64k"), 50),
    Case(
        "upload-c10",
        "upload",
        "1 MiB POST uploads, keep-alive, c=10",
        Workload(path="/upload", method="POST", body_bytes=UPLOAD_BYTES),
        10,
    ),
    Case(
        "close-c50",
        "close",
        "1 KiB GET, new connection per request (Connection: close), c=50",
        Workload(close=True),
        50,
    ),
)

THROUGHPUT_SCENARIOS = ("keepalive", "large", "upload", "close")
ALL_SCENARIOS = (*THROUGHPUT_SCENARIOS, "memory", "balancing", "events")
EVENTS = ("steady", "flip", "drain", "kill")
EVENT_BACKEND = "blue-1"


@dataclass
class Session:
    """Everything a scenario needs: tools, pinning, backends, targets, output."""

    wrk_bin: str
    pinning: Pinning
    workdir: Path
    backends: dict[str, Backend]
    targets: list[Target]
    duration: int
    skipped: list[str] = field(default_factory=list)

    def wrk(self, target: Target, workload: Workload, connections: int, duration: int) -> list[str]:
        return wrk_argv(
            self.wrk_bin, self.pinning, target.port, workload, connections, duration, self.workdir
        )


def measure(session: Session, target: Target, case: Case, duration: int) -> dict[str, Any]:
    """One wrk run against ``target`` with the proxy's CPU time around it."""
    root = target.proc.pid if target.proc is not None else None
    proxy_cpu = session.pinning.proxy_cpu
    busy_before = cpu_busy_seconds(proxy_cpu) if proxy_cpu is not None else 0.0
    cpu_before = tree_cpu_seconds(root) if root else 0.0
    started = time.monotonic()
    result = run_wrk(session.wrk(target, case.workload, case.connections, duration), duration)
    cpu_after = tree_cpu_seconds(root) if root else 0.0
    wall = time.monotonic() - started
    busy_after = cpu_busy_seconds(proxy_cpu) if proxy_cpu is not None else 0.0
    record: dict[str, Any] = {"case": case.key, "proxy": target.name, **result.as_dict()}
    cpu = cpu_after - cpu_before
    if target.is_proxy and result.requests:
        record["cpu_s"] = round(cpu, 3)
        record["cpu_us_per_req"] = round(cpu * 1e6 / result.requests, 2)
    if proxy_cpu is not None and wall > 0:
        # time the proxy's CPU spent on anything but the proxy: other processes, interrupts
        other = max(0.0, (busy_after - busy_before) - cpu)
        record["proxy_cpu_other_pct"] = round(100 * other / wall, 1)
    return record


def warm_up(session: Session, seconds: int) -> None:
    warm = Case("warmup", "warmup", "warm-up", Workload(), 50)
    for target in session.targets:
        with contextlib.suppress(RuntimeError):
            measure(session, target, warm, seconds)


def combine_slices(slices: list[dict[str, Any]]) -> dict[str, Any]:
    """One round's record for a target from its slices: counts and times summed,
    rates from the sums, latency percentiles the median of the slices' (wrk
    reports percentiles, not histograms that could be merged), the max the max.
    The slices themselves are kept under ``"slices"``."""
    first = slices[0]
    if len(slices) == 1:
        return first
    out: dict[str, Any] = {"case": first["case"], "proxy": first["proxy"]}
    for key in ("requests", "duration_us", "bytes", "errors", *_ERROR_KEYS):
        out[key] = sum(s[key] for s in slices)
    seconds = out["duration_us"] / 1e6
    out["rps"] = round(out["requests"] / seconds, 1) if seconds else 0.0
    for key in ("p50_us", "p90_us", "p99_us"):
        out[key] = int(statistics.median(s[key] for s in slices))
    out["max_us"] = max(s["max_us"] for s in slices)
    requests = out["requests"]
    out["mean_us"] = (
        round(sum(s["mean_us"] * s["requests"] for s in slices) / requests, 1) if requests else 0.0
    )
    if all("cpu_s" in s for s in slices):
        out["cpu_s"] = round(sum(s["cpu_s"] for s in slices), 3)
        out["cpu_us_per_req"] = round(out["cpu_s"] * 1e6 / requests, 2) if requests else None
    if all("proxy_cpu_other_pct" in s for s in slices):
        out["proxy_cpu_other_pct"] = round(
            sum(s["proxy_cpu_other_pct"] * s["duration_us"] for s in slices)
            / max(out["duration_us"], 1),
            1,
        )
    out["slices"] = slices
    return out


_ERROR_KEYS = ("connect", "read", "write", "status", "timeout")


def slice_order(targets: list[Target], slices: int) -> list[Target]:
    """The order targets take their slices in: forwards, then backwards, and so
    on, so that no target always runs right after the same other one."""
    order: list[Target] = []
    for n in range(slices):
        order += targets if n % 2 == 0 else targets[::-1]
    return order


def run_throughput(
    session: Session,
    cases: list[Case],
    rounds: int,
    slices: int = 1,
    progress: Callable[[str], None] = log,
) -> list[dict[str, Any]]:
    """``rounds`` records per target and case, each over ``session.duration``
    seconds cut into ``slices`` wrk runs taken in turns (whole seconds, at least
    one each: a duration of 5 s in 3 slices is three 1 s runs)."""
    runs: list[dict[str, Any]] = []
    targets = session.targets
    seconds = max(1, session.duration // max(slices, 1))
    for round_no in range(rounds):
        shift = round_no % len(targets) if targets else 0
        order = targets[shift:] + targets[:shift]
        for case in cases:
            taken: dict[str, list[dict[str, Any]]] = {t.name: [] for t in order}
            for target in slice_order(order, slices):
                if _died(session, target):
                    continue
                try:
                    taken[target.name].append(measure(session, target, case, seconds))
                except RuntimeError as exc:
                    log(f"! {case.key} {target.name}: {exc}")
                time.sleep(0.2)
            for target in order:
                if not taken[target.name]:
                    continue
                record = combine_slices(taken[target.name])
                record["round"] = round_no + 1
                runs.append(record)
                cpu = record.get("cpu_us_per_req")
                progress(
                    f"  round {round_no + 1}/{rounds} {case.key:<15} {target.name:<8} "
                    f"{record['rps']:>10,.0f} req/s  p99 {record['p99_us'] / 1000:7.2f} ms  "
                    f"errors {record['errors']:>5}"
                    + (f"  cpu {cpu:7.1f} us/req" if cpu is not None else "")
                )
    return runs


def _died(session: Session, target: Target) -> bool:
    if target.proc is None or target.proc.alive():
        return False
    msg = f"{target.name}: died during the run\n{target.describe_failure('exited')}"
    if msg not in session.skipped:
        session.skipped.append(msg)
        log("! " + msg)
    return True


def run_memory(session: Session, connections: int) -> list[dict[str, Any]]:
    records = []
    for target in session.targets:
        if not target.is_proxy:
            continue
        count = connections
        capacity = target.idle_capacity()
        if capacity is not None and capacity < count:
            count = capacity
            note = (
                f"memory: {target.name} measured with {count} idle connections, not "
                f"{connections}: its connection limit is bounded by RLIMIT_NOFILE "
                f"({resource.getrlimit(resource.RLIMIT_NOFILE)[0]})"
            )
            session.skipped.append(note)
            log("! " + note)
        log(f"  {target.name}: opening {count} idle keep-alive connections")
        try:
            result = measure_idle_memory(target.port, count, target.pids)
        except (OSError, TimeoutError) as exc:
            session.skipped.append(f"memory: {target.name}: {exc!r}")
            continue
        record = {"proxy": target.name, **result.as_dict()}
        records.append(record)
        log(
            f"  {target.name}: held {result.held}/{count}, RSS "
            f"{result.rss_before_kib / 1024:.1f} -> {result.rss_after_kib / 1024:.1f} MiB, "
            f"{record['kib_per_connection']} KiB/connection"
            + (f" (first error: {result.first_error})" if result.first_error else "")
        )
        time.sleep(1.0)
    return records


def _restore(session: Session, target: Target, event: str) -> str | None:
    """Put things back after an event; returns a note when that did not fully work."""
    try:
        if event == "flip":
            target.flip("blue")
            time.sleep(1.0)
        elif event == "drain":
            target.undrain(EVENT_BACKEND)
            if not target.wait_backend_up(EVENT_BACKEND, 15.0):
                return f"{EVENT_BACKEND} not up again 15 s after enable"
        elif event == "kill":
            session.backends[EVENT_BACKEND].start()
            if not target.wait_backend_up(EVENT_BACKEND, 20.0):
                return f"{EVENT_BACKEND} not up again 20 s after restart"
    except (EventError, OSError) as exc:
        return f"restore after {event} failed: {exc}"
    return None


def _shares(served: dict[str, int] | None) -> str:
    if not served or not sum(served.values()):
        return "-"
    total = sum(served.values())
    return " ".join(f"{k} {100 * v / total:.0f}%" for k, v in served.items())


def _served(session: Session, before: dict[str, int | None]) -> dict[str, int] | None:
    """Requests each backend served since ``before`` (None when a counter is missing)."""
    out = {}
    for backend_id, backend in session.backends.items():
        now, then = backend.requests(), before.get(backend_id)
        if now is None or then is None or now < then:
            return None
        out[backend_id] = now - then
    return out


def run_events(session: Session, duration: int, event_at: float) -> list[dict[str, Any]]:
    """Per proxy: a steady run, then one run each with a flip, a drain and a backend kill
    ``event_at`` seconds in; failed requests and latency of each run."""
    records: list[dict[str, Any]] = []
    for target in session.targets:
        if not target.is_proxy:
            continue
        reason = target.events_unavailable()
        if reason is not None:
            msg = f"events: {target.name} skipped: {reason}"
            session.skipped.append(msg)
            log("! " + msg)
            continue
        for event in EVENTS:
            argv = session.wrk(target, Workload(), 50, duration)
            served_before = {i: b.requests() for i, b in session.backends.items()}
            wrk = start_wrk(argv)
            time.sleep(event_at)
            note = None
            action_ms = None
            started = time.monotonic()
            try:
                if event == "flip":
                    target.flip("green")
                elif event == "drain":
                    target.drain(EVENT_BACKEND)
                elif event == "kill":
                    session.backends[EVENT_BACKEND].crash()
                action_ms = round((time.monotonic() - started) * 1000, 1)
            except (EventError, OSError) as exc:
                note = f"{event} failed: {exc}"
            try:
                result: WrkResult | None = finish_wrk(wrk, duration + 30)
            except RuntimeError as exc:
                result = None
                note = f"{note}; {exc}" if note else str(exc)
            served = _served(session, served_before) if event != "kill" else None
            restore_note = _restore(session, target, event) if event != "steady" else None
            record: dict[str, Any] = {"proxy": target.name, "event": event}
            if result is not None:
                record.update(result.as_dict())
            record["served"] = served
            record["action_ms"] = action_ms
            record["note"] = "; ".join(n for n in (note, restore_note) if n) or None
            records.append(record)
            if result is not None:
                log(
                    f"  {target.name:<8} {event:<7} {result.rps:>10,.0f} req/s  "
                    f"p99 {result.p99_us / 1000:7.2f} ms  max {result.max_us / 1000:8.1f} ms  "
                    f"errors {result.errors}  served {_shares(served)}"
                    + (f"  ({record['note']})" if record["note"] else "")
                )
            else:
                log(f"  {target.name:<8} {event:<7} no result: {record['note']}")
            if note and event != "steady" and "failed" in note:
                session.skipped.append(f"events: {target.name} {event}: {note}")
            time.sleep(1.0)
    return records
