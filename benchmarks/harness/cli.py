"""Command line of ``benchmarks/run.py``."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import secrets
import shlex
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, NoReturn

from . import report
from .balancing_bench import run_balancing
from .profiling import find_py_spy, run_profile
from .scenarios import (
    ALL_SCENARIOS,
    CASES,
    THROUGHPUT_SCENARIOS,
    Session,
    run_events,
    run_memory,
    run_throughput,
    warm_up,
)
from .servers import (
    LARGE_BODY_BYTES,
    ONE_KIB_BODY,
    UPLOAD_BYTES,
    Backend,
    Direct,
    FloorProxy,
    HaproxyProxy,
    ManagedProcess,
    NginxProxy,
    StartError,
    Target,
    Topology,
    ZdproxyAccessLogProxy,
    ZdproxyCompiledProxy,
    ZdproxyProxy,
    free_port,
    http_request,
    verify_upload_consumed,
)
from .system import (
    choose_pinning,
    ensure_apt_tools,
    ensure_pip_module,
    log,
    machine_info,
    raise_nofile,
)

HERE = Path(__file__).resolve().parent.parent  # benchmarks/
REPO = HERE.parent
ALL_PROXIES = ("direct", "nginx", "haproxy", "floor", "zdproxy", "zdproxy-compiled", "zdproxy-log")
#: run unless --proxies says otherwise; zdproxy-log (access log on) is opt-in, and
#: zdproxy-compiled runs when --zdproxy-compiled-cmd names it
DEFAULT_PROXIES = ("direct", "nginx", "haproxy", "floor", "zdproxy")


def _csv(choices: tuple[str, ...]) -> Any:
    def parse(text: str) -> list[str]:
        items = [item.strip() for item in text.split(",") if item.strip()]
        unknown = [item for item in items if item not in choices]
        if unknown:
            raise argparse.ArgumentTypeError(
                f"unknown {', '.join(unknown)}; choose from {', '.join(choices)}"
            )
        return items

    return parse


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="benchmarks/run.py",
        description="Benchmark zdproxy against nginx and HAProxy on this machine "
        "(loopback only). See docs/benchmarks.md.",
    )
    parser.add_argument(
        "--quick", action="store_true", help="smoke run: 1 round, 2 s per case, fewer connections"
    )
    parser.add_argument(
        "--scenarios",
        type=_csv(ALL_SCENARIOS),
        default=list(ALL_SCENARIOS),
        help=f"comma-separated, from {','.join(ALL_SCENARIOS)} (default: all)",
    )
    parser.add_argument(
        "--proxies",
        type=_csv(ALL_PROXIES),
        default=list(DEFAULT_PROXIES),
        help=f"comma-separated, from {','.join(ALL_PROXIES)} "
        f"(default: {','.join(DEFAULT_PROXIES)})",
    )
    parser.add_argument("--rounds", type=int, help="rounds per case (default 5; quick 1)")
    parser.add_argument(
        "--duration", type=int, help="seconds per target, case and round (default 3; quick 2)"
    )
    parser.add_argument(
        "--slices",
        type=int,
        help="wrk runs that --duration is cut into, taken in turns by the targets "
        "(default 3; quick 1)",
    )
    parser.add_argument("--warmup", type=int, help="warm-up seconds per proxy (default 2)")
    parser.add_argument(
        "--idle-connections",
        type=int,
        help="idle keep-alive connections in the memory scenario (default 10000; quick 2000)",
    )
    parser.add_argument(
        "--event-duration", type=int, help="seconds per events-scenario run (default 6; quick 4)"
    )
    parser.add_argument(
        "--zdproxy-cmd",
        help="command that runs zdproxy, e.g. 'zdproxy' or 'python -m zdproxy' "
        "(default: this checkout's zdproxy/cli.py, else zdproxy on PATH)",
    )
    parser.add_argument(
        "--zdproxy-compiled-cmd",
        help="command that runs zdproxy's compiled build (a virtualenv's bin/zdproxy after "
        "pip install .; compiled is the default): adds the zdproxy-compiled row",
    )
    parser.add_argument(
        "--out",
        type=Path,
        help="output directory (default benchmarks/results; quick: benchmarks/results/quick)",
    )
    parser.add_argument(
        "--profile",
        action="store_true",
        help="instead of benchmarking: run zdproxy under c=50 load and record it with py-spy",
    )
    parser.add_argument(
        "--profile-duration", type=int, default=15, help="seconds of py-spy sampling (default 15)"
    )
    parser.add_argument(
        "--report-only",
        action="store_true",
        help="rewrite RESULTS.md and chart.png from an existing results.json",
    )
    parser.add_argument(
        "--no-install", action="store_true", help="do not apt-get/pip install missing tools"
    )
    parser.add_argument("--keep-tmp", action="store_true", help="keep the temporary work dir")
    return parser


def resolve_settings(args: argparse.Namespace) -> dict[str, Any]:
    quick = bool(args.quick)
    return {
        "rounds": args.rounds or (1 if quick else 5),
        "duration": args.duration or (2 if quick else 3),
        "slices": max(1, args.slices or (1 if quick else 3)),
        "warmup": args.warmup if args.warmup is not None else (1 if quick else 2),
        "idle_connections": args.idle_connections or (2000 if quick else 10000),
        "event_duration": args.event_duration or (4 if quick else 6),
        "balancing_calls": 20_000 if quick else 200_000,
        "out": args.out or (HERE / "results" / "quick" if quick else HERE / "results"),
    }


def zdproxy_command(override: str | None) -> tuple[list[str] | None, dict[str, str], str]:
    """(argv prefix, extra env, description) for running zdproxy."""
    if override:
        return shlex.split(override), {}, f"--zdproxy-cmd {override!r}"
    if (REPO / "zdproxy" / "cli.py").exists():
        pythonpath = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)
        code = "import sys; from zdproxy.cli import main; sys.exit(main())"
        return [sys.executable, "-c", code], {"PYTHONPATH": pythonpath}, f"this checkout ({REPO})"
    installed = shutil.which("zdproxy")
    if installed:
        return [installed], {}, installed
    return None, {}, "not found"


def estimate_seconds(settings: dict[str, Any], scenarios: list[str], proxies: list[str]) -> float:
    cases = [c for c in CASES if c.scenario in scenarios]
    per_run = settings["duration"] + 0.6 * settings["slices"]
    total = settings["rounds"] * len(cases) * len(proxies) * per_run
    total += len(proxies) * (settings["warmup"] + 1) + 10
    n_proxies = len([p for p in proxies if p != "direct"])
    if "memory" in scenarios:
        total += n_proxies * (5 + settings["idle_connections"] / 1500)
    if "events" in scenarios:
        total += n_proxies * 4 * (settings["event_duration"] + 4)
    if "balancing" in scenarios:
        total += 15
    return float(total)


def _sigterm(_signum: int, _frame: Any) -> NoReturn:
    raise SystemExit(143)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    settings = resolve_settings(args)
    raw_args = sys.argv[1:] if argv is None else argv
    settings["command"] = " ".join(["python benchmarks/run.py", *map(shlex.quote, raw_args)])
    out_dir: Path = settings["out"]
    if args.report_only:
        results = json.loads((out_dir / "results.json").read_text())
        for problem in report.write_reports(results, out_dir):
            log("! " + problem)
        log(f"wrote {out_dir / 'RESULTS.md'}")
        return 0

    signal.signal(signal.SIGTERM, _sigterm)
    started = time.monotonic()
    install = not args.no_install
    proxies: list[str] = ["zdproxy"] if args.profile else args.proxies
    scenarios: list[str] = args.scenarios
    needed = ["wrk", "nginx"] + (["haproxy"] if "haproxy" in proxies else [])
    tools = ensure_apt_tools(needed, install)
    missing = [name for name in needed if name not in tools]
    if "wrk" in missing or "nginx" in missing:
        log(f"! cannot run without {' and '.join(m for m in missing if m != 'haproxy')}")
        return 2
    skipped: list[str] = []
    if "haproxy" in missing:
        skipped.append("haproxy: not installed")
        proxies = [p for p in proxies if p != "haproxy"]
    if not args.profile and not ensure_pip_module("matplotlib", "matplotlib", install):
        log("! matplotlib unavailable: no chart")
    nofile = raise_nofile(2 * settings["idle_connections"] + 4096)
    if "memory" in scenarios and nofile < settings["idle_connections"] + 1024:
        settings["idle_connections"] = max(100, nofile - 1024)
        skipped.append(
            f"memory: RLIMIT_NOFILE is {nofile}: measured with "
            f"{settings['idle_connections']} idle connections instead"
        )
    pinning = choose_pinning()
    workdir = Path(tempfile.mkdtemp(prefix="zdbench-"))
    workdir.chmod(0o755)  # nginx workers may run as another user
    if not args.profile:
        estimate = estimate_seconds(settings, scenarios, proxies)
        log(
            f"* {settings['rounds']} round(s) x {settings['duration']} s per case "
            f"in {settings['slices']} slice(s); "
            f"proxies {','.join(proxies)}; scenarios {','.join(scenarios)}; "
            f"about {estimate / 60:.1f} min"
        )
    log(f"* pinning: load and backends on CPU {pinning.load_cpu}, proxy on CPU {pinning.proxy_cpu}")
    try:
        return _run(args, settings, tools, pinning, workdir, proxies, scenarios, skipped, started)
    except KeyboardInterrupt:
        log("! interrupted")
        return 130
    finally:
        ManagedProcess.stop_all()
        if args.keep_tmp:
            log(f"* work dir kept: {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)


def _start_targets(
    names: list[str],
    tools: dict[str, str],
    session_args: dict[str, Any],
    topology: Topology,
    zd_override: str | None,
    skipped: list[str],
    zd_compiled: str | None = None,
) -> list[Target]:
    workdir: Path = session_args["workdir"]
    pinning = session_args["pinning"]
    idle = session_args["idle_connections"]
    direct_port = topology.blue[0][1]
    targets: list[Target] = []
    for name in names:
        target: Target
        if name == "direct":
            target = Direct(workdir / "direct", pinning, topology, direct_port)
        elif name == "nginx":
            target = NginxProxy(
                workdir / "nginx", pinning, topology, free_port(), tools["nginx"], idle
            )
        elif name == "haproxy":
            target = HaproxyProxy(
                workdir / "haproxy", pinning, topology, free_port(), tools["haproxy"], idle
            )
        elif name == "floor":
            target = FloorProxy(workdir / "floor", pinning, topology, free_port())
        else:
            override = zd_compiled if name == "zdproxy-compiled" else zd_override
            if name == "zdproxy-compiled" and not zd_compiled:
                skipped.append("zdproxy-compiled: no --zdproxy-compiled-cmd")
                continue
            command, extra_env, where = zdproxy_command(override)
            if command is None:
                msg = (
                    "zdproxy: not runnable: no zdproxy/cli.py in this checkout and no zdproxy "
                    "on PATH (pip install . or --zdproxy-cmd)"
                )
                log("! " + msg)
                skipped.append(msg)
                continue
            log(f"* zdproxy from {where}")
            env = dict(os.environ, **extra_env, ZDPROXY_ADMIN_TOKEN=secrets.token_hex(16))
            kind = {
                "zdproxy-log": ZdproxyAccessLogProxy,
                "zdproxy-compiled": ZdproxyCompiledProxy,
            }.get(name, ZdproxyProxy)
            target = kind(workdir / name, pinning, topology, free_port(), command, env, idle)
        try:
            target.start()
        except (StartError, OSError) as exc:
            target.stop()
            msg = f"{name}: failed to start, skipped: {exc}"
            log("! " + msg)
            skipped.append(msg)
            continue
        problems = preflight(target)
        for problem in problems:
            log(f"! {name}: {problem}")
            skipped.append(f"{name}: preflight: {problem}")
        log(f"* {name} ready on 127.0.0.1:{target.port} (pids {target.pids() or '-'})")
        targets.append(target)
    return targets


def preflight(target: Target) -> list[str]:
    """Each path answers as expected through ``target`` (errors would show in the runs)."""
    problems = []
    checks: list[tuple[str, str, bytes | None, Any]] = [
        ("GET", "/", None, lambda b: b == ONE_KIB_BODY.encode()),
        ("GET", "/64k", None, lambda b: len(b) == LARGE_BODY_BYTES),
        ("POST", "/upload", b"u" * UPLOAD_BYTES, lambda b: str(UPLOAD_BYTES).encode() in b),
    ]
    for method, path, body, ok in checks:
        try:
            status, answer = http_request(target.port, path, method, body, timeout=10.0)
        except OSError as exc:
            problems.append(f"{method} {path} failed: {exc}")
            continue
        if status != 200 or not ok(answer):
            problems.append(f"{method} {path} answered {status} {answer[:80]!r}")
    return problems


def _run(
    args: argparse.Namespace,
    settings: dict[str, Any],
    tools: dict[str, str],
    pinning: Any,
    workdir: Path,
    proxies: list[str],
    scenarios: list[str],
    skipped: list[str],
    started: float,
) -> int:
    out_dir: Path = settings["out"]
    ids = ("blue-1", "blue-2", "green-1")
    backends = {
        backend_id: Backend(
            backend_id,
            free_port(),
            workdir / f"backend-{backend_id}",
            tools["nginx"],
            pinning,
            worker_connections=4096,
        )
        for backend_id in ids
    }
    for backend in backends.values():
        backend.start()
    if not verify_upload_consumed(backends["blue-1"].port):
        log("! backend /upload answered before the whole body was sent")
        skipped.append("backends: /upload answered before reading the whole body")
    topology = Topology(
        blue=tuple((i, backends[i].port) for i in ("blue-1", "blue-2")),
        green=(("green-1", backends["green-1"].port),),
    )
    log(
        "* backends: "
        + ", ".join(
            f"{i} 127.0.0.1:{b.port} (pid {b.proc.pid if b.proc else '-'})"
            for i, b in backends.items()
        )
    )
    session_args = {
        "workdir": workdir,
        "pinning": pinning,
        "idle_connections": settings["idle_connections"],
    }
    targets = _start_targets(
        proxies, tools, session_args, topology, args.zdproxy_cmd, skipped, args.zdproxy_compiled_cmd
    )

    if args.profile:
        zd = next((t for t in targets if t.name == "zdproxy"), None)
        if zd is None:
            log("! profile: zdproxy did not start (see above)")
            return 1
        py_spy = find_py_spy(not args.no_install)
        if py_spy is None:
            log("! profile: py-spy not available (pip install py-spy)")
            return 1
        run_profile(zd, tools["wrk"], pinning, workdir, out_dir, args.profile_duration, py_spy)
        return 0

    session = Session(
        wrk_bin=tools["wrk"],
        pinning=pinning,
        workdir=workdir,
        backends=backends,
        targets=targets,
        duration=settings["duration"],
        skipped=skipped,
    )
    results: dict[str, Any] = {
        "meta": {
            "command": settings["command"],
            "machine": machine_info(tools),
            "rounds": settings["rounds"],
            "duration": settings["duration"],
            "slices": settings["slices"],
            "pinning": (
                f"wrk -t1 and the nginx backends on CPU {pinning.load_cpu}, "
                f"the proxy under test alone on CPU {pinning.proxy_cpu}"
                if pinning.proxy_cpu is not None
                else "none (fewer than 2 CPUs)"
            ),
            "event_duration": settings["event_duration"],
            "event_at": round(settings["event_duration"] * 0.35, 1),
            "idle_connections": settings["idle_connections"],
            "proxies": [t.name for t in targets],
        },
        "cases": [
            {
                "key": c.key,
                "scenario": c.scenario,
                "title": c.title,
                "connections": c.connections,
                "method": c.workload.method,
                "path": c.workload.path,
            }
            for c in CASES
            if c.scenario in scenarios
        ],
        "skipped": skipped,
    }

    def save() -> None:
        results["meta"]["elapsed_s"] = round(time.monotonic() - started, 1)
        for problem in report.write_reports(results, out_dir):
            log("! " + problem)

    if "balancing" in scenarios:
        log("== balancing: cost of choosing a backend")
        records, notes = run_balancing(settings["balancing_calls"])
        for note in notes:
            log("! " + note)
        skipped.extend(notes)
        results["balancing"] = records
        for record in records:
            log(
                f"  {record['implementation']:<50} n={record['backends']:<5} "
                f"{record['ns_per_pick']:>7,} ns"
            )

    cases = [c for c in CASES if c.scenario in scenarios and c.scenario in THROUGHPUT_SCENARIOS]
    if cases and targets:
        log(f"== warm-up ({settings['warmup']} s per target)")
        warm_up(session, settings["warmup"])
        log(
            f"== throughput: {len(cases)} cases x {len(targets)} targets x "
            f"{settings['rounds']} rounds"
        )
        results["throughput"] = run_throughput(
            session, cases, settings["rounds"], settings["slices"]
        )
        save()

    if "memory" in scenarios and targets:
        log(f"== memory: {settings['idle_connections']} idle keep-alive connections")
        results["memory"] = run_memory(session, settings["idle_connections"])
        save()

    if "events" in scenarios and targets:
        log("== events under load: flip, drain, backend kill")
        results["events"] = run_events(
            session, settings["event_duration"], results["meta"]["event_at"]
        )

    save()
    written = [out_dir / name for name in ("RESULTS.md", "results.json", "chart.png")]
    log("* wrote " + ", ".join(str(path) for path in written if path.exists()))
    log(f"* done in {(time.monotonic() - started) / 60:.1f} min")
    if skipped:
        log("* skipped or incomplete:")
        for msg in skipped:
            log("  - " + msg.splitlines()[0])
    with contextlib.suppress(Exception):
        print(
            "\n" + "\n".join(report.target_verdict(report.summarize(results.get("throughput", []))))
        )
    return 0
