"""results.json -> RESULTS.md (tables with ratios to nginx) and chart.png."""

from __future__ import annotations

import json
import statistics
from collections.abc import Iterable
from pathlib import Path
from typing import Any

PROXY_ORDER = ("direct", "nginx", "haproxy", "floor", "zdproxy", "zdproxy-compiled", "zdproxy-log")
TARGET_CPU_RATIO = 1.3
TARGET_P99_RATIO = 2.0


def _order(name: str) -> tuple[int, str]:
    return (PROXY_ORDER.index(name) if name in PROXY_ORDER else len(PROXY_ORDER), name)


def _median(values: Iterable[float | int | None]) -> float | None:
    present = [float(v) for v in values if v is not None]
    return statistics.median(present) if present else None


def summarize(runs: list[dict[str, Any]]) -> dict[str, dict[str, dict[str, Any]]]:
    """case -> proxy -> medians over rounds (errors summed over rounds)."""
    grouped: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for run in runs:
        grouped.setdefault((run["case"], run["proxy"]), []).append(run)
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for (case, proxy), items in grouped.items():
        rps = [float(r["rps"]) for r in items]
        out.setdefault(case, {})[proxy] = {
            "rounds": len(items),
            "rps": _median(rps),
            "rps_min": min(rps),
            "rps_max": max(rps),
            "p50_ms": _median(r["p50_us"] / 1000 for r in items),
            "p99_ms": _median(r["p99_us"] / 1000 for r in items),
            "cpu_us_per_req": _median(r.get("cpu_us_per_req") for r in items),
            "errors": sum(int(r["errors"]) for r in items),
            "socket_errors": sum(
                int(r["connect"]) + int(r["read"]) + int(r["write"]) + int(r["timeout"])
                for r in items
            ),
            "non_2xx": sum(int(r["status"]) for r in items),
            "requests": sum(int(r["requests"]) for r in items),
        }
    return out


def _ratio(value: float | None, base: float | None) -> float | None:
    if value is None or base is None or base == 0:
        return None
    return value / base


def _fmt(value: float | None, spec: str, suffix: str = "") -> str:
    return "-" if value is None else f"{value:{spec}}{suffix}"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join("---" for _ in header) + " |"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines


def throughput_table(per_proxy: dict[str, dict[str, Any]]) -> list[str]:
    base = per_proxy.get("nginx", {})
    rows = []
    for proxy in sorted(per_proxy, key=_order):
        s = per_proxy[proxy]
        errors = f"{s['errors']:,}"
        if s["errors"]:
            errors += f" ({s['socket_errors']:,} socket, {s['non_2xx']:,} non-2xx)"
        rows.append(
            [
                proxy,
                f"{s['rps']:,.0f}",
                f"{s['rps_min']:,.0f}-{s['rps_max']:,.0f}",
                f"{s['p50_ms']:.2f}",
                f"{s['p99_ms']:.2f}",
                errors,
                _fmt(s["cpu_us_per_req"], ".1f"),
                _fmt(_ratio(s["rps"], base.get("rps")), ".2f", "x"),
                _fmt(_ratio(s["cpu_us_per_req"], base.get("cpu_us_per_req")), ".2f", "x"),
                _fmt(_ratio(s["p99_ms"], base.get("p99_ms")), ".2f", "x"),
            ]
        )
    return _table(
        [
            "proxy",
            "req/s (median)",
            "req/s range",
            "p50 ms",
            "p99 ms",
            "errors",
            "proxy CPU us/req",
            "req/s vs nginx",
            "CPU/req vs nginx",
            "p99 vs nginx",
        ],
        rows,
    )


#: the zdproxy rows the target is checked for, the default build first
_BUILDS = (
    ("zdproxy-compiled", "the compiled build, what `pip install .` gives"),
    ("zdproxy", "this checkout, run from source"),
)


def target_verdict(summary: dict[str, dict[str, dict[str, Any]]]) -> list[str]:
    """Each zdproxy build against the anchors' target at c=50 keep-alive."""
    case = summary.get("keepalive-c50", {})
    ng = case.get("nginx")
    builds = [(name, what) for name, what in _BUILDS if case.get(name)]
    if not ng or not builds:
        return ["Target check (zdproxy vs nginx, 1 KiB keep-alive c=50): not measured."]
    lines = ["Target check (zdproxy vs nginx, 1 KiB keep-alive c=50):"]
    for name, what in builds:
        zd = case[name]
        cpu = _ratio(zd["cpu_us_per_req"], ng["cpu_us_per_req"])
        p99 = _ratio(zd["p99_ms"], ng["p99_ms"])
        checks = [
            (
                f"CPU/request {_fmt(cpu, '.2f', 'x')} nginx (target <= {TARGET_CPU_RATIO}x)",
                cpu is not None and cpu <= TARGET_CPU_RATIO,
            ),
            (
                f"p99 {_fmt(p99, '.2f', 'x')} nginx (target <= {TARGET_P99_RATIO}x)",
                p99 is not None and p99 <= TARGET_P99_RATIO,
            ),
            (f"{zd['errors']} errors (target 0)", zd["errors"] == 0),
        ]
        lines += ["", f"`{name}` ({what}):", ""]
        lines += [f"- {'met' if ok else 'NOT met'}: {text}" for text, ok in checks]
    return lines


def memory_table(records: list[dict[str, Any]]) -> list[str]:
    base = next((r for r in records if r["proxy"] == "nginx"), None)
    base_kib = base["kib_per_connection"] if base else None
    rows = []
    for r in sorted(records, key=lambda r: _order(r["proxy"])):
        rows.append(
            [
                r["proxy"],
                f"{r['held']:,} / {r['wanted']:,}",
                f"{r['rss_before_kib'] / 1024:.1f}",
                f"{r['rss_after_kib'] / 1024:.1f}",
                _fmt(r["kib_per_connection"], ".2f"),
                _fmt(_ratio(r["kib_per_connection"], base_kib), ".2f", "x"),
                f"{r['seconds_to_open']:.1f}",
            ]
        )
    return _table(
        [
            "proxy",
            "idle connections held",
            "RSS before MiB",
            "RSS after MiB",
            "KiB per connection",
            "vs nginx",
            "seconds to open",
        ],
        rows,
    )


def balancing_table(records: list[dict[str, Any]]) -> list[str]:
    sizes = sorted({int(r["backends"]) for r in records})
    names = list(dict.fromkeys(r["implementation"] for r in records))
    cell = {(r["implementation"], int(r["backends"])): r["ns_per_pick"] for r in records}
    rows = [[name] + [_fmt(cell.get((name, n)), ",.0f") for n in sizes] for name in names]
    return _table(["ns per pick"] + [f"{n} backends" for n in sizes], rows)


def events_table(records: list[dict[str, Any]]) -> list[str]:
    nginx = {r["event"]: r for r in records if r["proxy"] == "nginx"}
    rows = []
    for r in sorted(records, key=lambda r: _order(r["proxy"])):
        served = r.get("served")
        shares = "-"
        if served and sum(served.values()):
            total = sum(served.values())
            shares = " / ".join(f"{100 * served[k] / total:.0f}" for k in sorted(served))
        if "requests" not in r:
            rows.append(
                [r["proxy"], r["event"], "-", "-", "-", "-", "-", "-", shares, r.get("note") or ""]
            )
            continue
        base = nginx.get(r["event"])
        errors = f"{r['errors']:,}"
        if r["errors"]:
            errors += f" ({r['errors'] - r['status']:,} socket, {r['status']:,} non-2xx)"
        rows.append(
            [
                r["proxy"],
                r["event"],
                f"{r['rps']:,.0f}",
                f"{r['p50_us'] / 1000:.2f}",
                f"{r['p99_us'] / 1000:.2f}",
                f"{r['max_us'] / 1000:.1f}",
                errors,
                _fmt(
                    _ratio(r["p99_us"], base["p99_us"] if base and "p99_us" in base else None),
                    ".2f",
                    "x",
                ),
                shares,
                r.get("note") or "",
            ]
        )
    return _table(
        [
            "proxy",
            "event",
            "req/s",
            "p50 ms",
            "p99 ms",
            "max ms",
            "failed requests",
            "p99 vs nginx",
            "served by blue-1 / blue-2 / green-1 (%)",
            "note",
        ],
        rows,
    )


def noise_note(runs: list[dict[str, Any]]) -> list[str]:
    """How busy the proxy's CPU was with anything else while the proxies were measured."""
    other = [float(r["proxy_cpu_other_pct"]) for r in runs if "proxy_cpu_other_pct" in r]
    if not other:
        return []
    median, worst = statistics.median(other), max(other)
    text = (
        f"Other activity on the proxy's CPU during the runs (other processes, interrupts): "
        f"{median:.0f} % of the time (median over runs; worst run {worst:.0f} %)."
    )
    if median > 5:
        text += (
            " **The machine was not quiet**: req/s and latencies are disturbed; "
            "CPU per request much less so."
        )
    return [text, ""]


def _sliced(meta: dict[str, Any]) -> str:
    slices = int(meta.get("slices", 1))
    if slices <= 1:
        return ""
    return f" in {slices} slices taken in turns by the targets (p99: median of the slices')"


def render_markdown(results: dict[str, Any]) -> str:
    meta = results["meta"]
    machine = meta["machine"]
    lines = [
        "# zdproxy benchmark results",
        "",
        f"Generated {machine['date']} by `{meta['command']}` "
        f"({meta['rounds']} round(s) of {meta['duration']} s per case{_sliced(meta)}, medians; "
        f"whole run {meta.get('elapsed_s', 0) / 60:.1f} min). "
        "How to run and read this: [docs/benchmarks.md](../../docs/benchmarks.md).",
        "",
        "Absolute req/s move by 20-30 % between runs on a shared machine; compare the "
        "ratios, which are taken within one run. CPU per request is the proxy's own "
        "user+system time (all its processes) divided by requests completed.",
        "",
        "## Machine",
        "",
    ]
    lines += _table(["", ""], [[k, str(v)] for k, v in machine.items()])
    lines += ["", f"Pinning: {meta['pinning']}", ""]
    lines += noise_note(results.get("throughput", []))

    summary = summarize(results.get("throughput", []))
    if summary:
        lines += ["## Throughput, latency and CPU per request", ""]
        lines += [*target_verdict(summary), ""]
        for case in results.get("cases", []):
            if case["key"] not in summary:
                continue
            lines += [f"### {case['title']}", ""]
            lines += [*throughput_table(summary[case["key"]]), ""]
        lines += ["![req/s and CPU per request](chart.png)", ""]

    if results.get("memory"):
        lines += [
            "## Memory per idle keep-alive connection",
            "",
            "RSS of all the proxy's processes before and after opening the idle "
            "connections (each made one GET / first), divided by the connections still open.",
            "",
        ]
        lines += [*memory_table(results["memory"]), ""]

    if results.get("balancing"):
        lines += [
            "## Cost of choosing a backend",
            "",
            "In-process micro-benchmark (best of 5 timings), one pool of N backends.",
            "",
        ]
        lines += [*balancing_table(results["balancing"]), ""]

    if results.get("events"):
        lines += [
            "## Events under load (1 KiB GET keep-alive, c=50)",
            "",
            f"One wrk run per event, the event {meta.get('event_at', '?')} s into a "
            f"{meta.get('event_duration', '?')} s run. flip: all traffic to the green pool "
            "(zdproxy: admin API; nginx: upstream rewrite + reload; HAProxy: runtime API); "
            "drain: blue-1 (zdproxy: admin API; nginx: `down` + reload; HAProxy: state "
            "drain); kill: SIGKILL of blue-1's nginx processes.",
            "",
        ]
        lines += [*events_table(results["events"]), ""]

    if results.get("skipped"):
        lines += ["## Skipped or incomplete", ""]
        lines += ["- " + msg.replace("\n", " / ") for msg in results["skipped"]] + [""]
    return "\n".join(lines)


def render_chart(results: dict[str, Any], path: Path) -> str | None:
    """Grouped bars of req/s and CPU us/req for the keep-alive cases; an error or None."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        return f"chart: matplotlib not available ({exc})"
    summary = summarize(results.get("throughput", []))
    cases = [c["key"] for c in results.get("cases", []) if c["scenario"] == "keepalive"]
    cases = [c for c in cases if c in summary]
    if not cases:
        path.unlink(missing_ok=True)  # no stale chart next to new results
        return None
    proxies = sorted({p for c in cases for p in summary[c]}, key=_order)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    width = 0.8 / max(1, len(proxies))
    labels = [c.removeprefix("keepalive-").replace("c", "c=") for c in cases]
    for ax, metric, title in (
        (axes[0], "rps", "requests/s (higher is better)"),
        (axes[1], "cpu_us_per_req", "proxy CPU us per request (lower is better)"),
    ):
        for i, proxy in enumerate(proxies):
            if metric == "cpu_us_per_req" and proxy == "direct":
                continue
            values = [summary[c].get(proxy, {}).get(metric) or 0 for c in cases]
            xs = [j + (i - (len(proxies) - 1) / 2) * width for j in range(len(cases))]
            bars = ax.bar(xs, values, width, label=proxy)
            ax.bar_label(bars, fmt="%.0f" if metric == "rps" else "%.1f", fontsize=7)
        ax.set_xticks(range(len(cases)), labels)
        ax.set_title(title)
        ax.set_xlabel("1 KiB GET, keep-alive, concurrency")
    axes[0].legend()
    fig.suptitle(f"zdproxy benchmark, {results['meta']['machine']['date']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None


def write_reports(results: dict[str, Any], out_dir: Path) -> list[str]:
    """Writes results.json, RESULTS.md and chart.png; returns problems (chart only)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    problems = []
    chart_error = render_chart(results, out_dir / "chart.png")
    if chart_error:
        problems.append(chart_error)
        if chart_error not in results.setdefault("skipped", []):
            results["skipped"].append(chart_error)
    (out_dir / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    (out_dir / "RESULTS.md").write_text(render_markdown(results))
    return problems
