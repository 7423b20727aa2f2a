"""Unit tests of the benchmark harness: parsing, config generation, reports.

Nothing here starts a server or measures time: ``pytest benchmarks/tests``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from harness import report, scenarios
from harness.balancing_bench import ReferenceRandomWeighted, ReferenceSmoothWeighted
from harness.profiling import top_functions
from harness.servers import (
    ONE_KIB_BODY,
    Backend,
    HaproxyProxy,
    NginxProxy,
    Topology,
    find_backend_state,
    zdproxy_yaml,
)
from harness.system import Pinning, cpu_seconds, process_tree
from harness.wrk import Workload, parse_wrk_output

TOPOLOGY = Topology(blue=(("blue-1", 9001), ("blue-2", 9002)), green=(("green-1", 9003),))
NO_PIN = Pinning(None, None)


def test_parse_wrk_output_reads_the_json_line() -> None:
    stdout = (
        "Running 2s test @ http://127.0.0.1:1/\n  Latency Distribution\n"
        'WRKJSON {"requests":1000,"duration_us":2000000,"bytes":5,"connect":1,"read":2,'
        '"write":0,"status":3,"timeout":4,"p50_us":100,"p90_us":200,"p99_us":900,'
        '"max_us":5000,"mean_us":120.5}\n'
    )
    result = parse_wrk_output(stdout)
    assert result.rps == 500.0
    assert result.socket_errors == 7
    assert result.errors == 10
    assert result.as_dict()["errors"] == 10


def test_parse_wrk_output_without_json_fails() -> None:
    with pytest.raises(ValueError):
        parse_wrk_output("wrk: connection refused\n")


def test_workload_scripts() -> None:
    upload = Workload(path="/upload", method="POST", body_bytes=1024).lua()
    assert 'wrk.method = "POST"' in upload
    assert 'string.rep("u", 1024)' in upload
    assert "done = function" in upload
    close = Workload(close=True).lua()
    assert 'wrk.headers["Connection"] = "close"' in close
    assert "wrk.body" not in Workload().lua()


def test_one_kib_body_is_one_kib() -> None:
    assert len(ONE_KIB_BODY.encode()) == 1024


def test_backend_config_serves_every_path(tmp_path: Path) -> None:
    backend = Backend("blue-1", 9001, tmp_path, "nginx", NO_PIN)
    text = backend.write_config().read_text()
    for needle in (
        "worker_processes 1;",
        "daemon off;",
        "master_process on;",
        "location = /64k",
        "mirror_request_body on;",
        "location = /healthz",
    ):
        assert needle in text
    assert (tmp_path / "www" / "64k").stat().st_size == 64 * 1024


def test_nginx_proxy_config_flip_and_drain(tmp_path: Path) -> None:
    proxy = NginxProxy(tmp_path, NO_PIN, TOPOLOGY, 8080, "nginx", 10000)
    normal = proxy.render()
    assert "keepalive 64;" in normal
    assert 'proxy_set_header Connection "";' in normal
    assert "proxy_http_version 1.1;" in normal
    assert "127.0.0.1:9001;" in normal and "127.0.0.1:9003" not in normal
    flipped = proxy.render(pool="green")
    assert "127.0.0.1:9003;" in flipped and "127.0.0.1:9001" not in flipped
    assert "127.0.0.1:9001 down;" in proxy.render(down=frozenset({"blue-1"}))


def test_haproxy_config(tmp_path: Path) -> None:
    text = HaproxyProxy(tmp_path, NO_PIN, TOPOLOGY, 8080, "haproxy", 10000).render()
    assert "nbthread 1" in text
    assert "http-reuse always" in text
    assert "balance roundrobin" in text
    assert "server green-1 127.0.0.1:9003 check weight 0" in text


@pytest.mark.parametrize("extras", [True, False])
def test_zdproxy_config_matches_the_contract(tmp_path: Path, extras: bool) -> None:
    text = zdproxy_yaml(TOPOLOGY, 8080, 9901, tmp_path / "state.json", extras, 10000)
    assert "token_env: ZDPROXY_ADMIN_TOKEN" in text
    assert ("max_connections" in text) is extras
    loader = pytest.importorskip("zdproxy.config.loader")
    config: Any = loader.load_config_text(text, "bench.yaml")
    assert config.pools["blue"].weight == 100
    assert config.pools["green"].weight == 0
    assert config.sticky.mode == "pool"
    assert config.health_check.path == "/healthz"


def test_find_backend_state_in_several_shapes() -> None:
    as_list = {"pools": [{"name": "blue", "backends": [{"id": "blue-1", "state": "draining"}]}]}
    as_map = {"pools": {"blue": {"backends": {"blue-1": {"state": "up"}}}}}
    assert find_backend_state(as_list, "blue-1") == "draining"
    assert find_backend_state(as_map, "blue-1") == "up"
    assert find_backend_state(as_map, "blue-9") is None
    assert find_backend_state("not json", "blue-1") is None


def test_process_accounting_sees_this_process() -> None:
    import os

    assert os.getpid() in process_tree(os.getpid())
    assert cpu_seconds([os.getpid()]) > 0
    assert process_tree(2**22 + 7) == []


def test_reference_pickers_follow_weights() -> None:
    smooth = ReferenceSmoothWeighted([0, 1, 2], [1, 2, 3])
    picks = [smooth.pick() for _ in range(600)]
    assert [picks.count(i) for i in range(3)] == [100, 200, 300]
    rand = ReferenceRandomWeighted([0, 1], [1, 0])
    assert {rand.pick() for _ in range(100)} == {0}


def test_top_functions_summarises_collapsed_stacks() -> None:
    collapsed = "process 1:main;a (x.py);b (x.py) 3\nprocess 1:main;a (x.py) 1\n"
    text = top_functions(collapsed)
    assert text.startswith("4 samples")
    assert "100.0  a (x.py)" in text
    assert " 75.0  b (x.py)" in text
    assert "100.0  a (x.py)" in text


def _run(proxy: str, rps: float, cpu: float | None, p99_us: int, errors: int = 0) -> dict[str, Any]:
    record: dict[str, Any] = {
        "case": "keepalive-c50",
        "proxy": proxy,
        "rps": rps,
        "requests": int(rps * 3),
        "p50_us": 500,
        "p99_us": p99_us,
        "max_us": 9000,
        "connect": 0,
        "read": errors,
        "write": 0,
        "timeout": 0,
        "status": 0,
        "errors": errors,
        "proxy_cpu_other_pct": 1.0,
    }
    if cpu is not None:
        record["cpu_us_per_req"] = cpu
    return record


def _results() -> dict[str, Any]:
    runs = [
        _run("nginx", 40000, 20.0, 5000),
        _run("nginx", 38000, 22.0, 5200),
        _run("nginx", 42000, 24.0, 5400),
        _run("zdproxy", 30000, 26.0, 8000, errors=1),
        _run("zdproxy-compiled", 36000, 30.0, 12000),
        _run("direct", 70000, None, 700),
    ]
    return {
        "meta": {
            "command": "python benchmarks/run.py",
            "machine": {"date": "2026-01-01 00:00 UTC", "cpu": "test"},
            "rounds": 3,
            "duration": 3,
            "pinning": "test",
            "elapsed_s": 60,
        },
        "cases": [{"key": "keepalive-c50", "scenario": "keepalive", "title": "1 KiB GET, c=50"}],
        "throughput": runs,
        "memory": [
            {
                "proxy": "nginx",
                "wanted": 10,
                "held": 10,
                "rss_before_kib": 1000,
                "rss_after_kib": 1010,
                "kib_per_connection": 1.0,
                "seconds_to_open": 0.1,
            },
            {
                "proxy": "zdproxy",
                "wanted": 10,
                "held": 10,
                "rss_before_kib": 1000,
                "rss_after_kib": 1040,
                "kib_per_connection": 4.0,
                "seconds_to_open": 0.1,
            },
        ],
        "balancing": [{"implementation": "ref", "backends": 2, "ns_per_pick": 100}],
        "events": [
            {
                "proxy": "zdproxy",
                "event": "flip",
                "requests": 100,
                "rps": 50.0,
                "p50_us": 1000,
                "p99_us": 4000,
                "max_us": 9000,
                "errors": 0,
                "status": 0,
                "served": {"blue-1": 20, "blue-2": 20, "green-1": 60},
                "note": None,
            }
        ],
        "skipped": ["zdproxy events: admin API answered 404"],
    }


def test_summary_takes_medians_and_sums_errors() -> None:
    summary = report.summarize(_results()["throughput"])
    nginx = summary["keepalive-c50"]["nginx"]
    assert nginx["rps"] == 40000
    assert nginx["cpu_us_per_req"] == 22.0
    assert nginx["p99_ms"] == 5.2
    assert (nginx["rps_min"], nginx["rps_max"]) == (38000, 42000)
    assert summary["keepalive-c50"]["zdproxy"]["errors"] == 1


def test_markdown_has_ratios_to_nginx_and_the_verdict() -> None:
    text = report.render_markdown(_results())
    zd_row = next(line for line in text.splitlines() if line.startswith("| zdproxy | 30,000"))
    assert "0.75x" in zd_row  # req/s
    assert "1.18x" in zd_row  # CPU per request: 26 / 22
    assert "1.54x" in zd_row  # p99: 8.0 / 5.2
    verdicts = text[text.index("Target check") :].split("###")[0]
    # the default build first, then the checkout, each with its own three checks
    assert verdicts.index("`zdproxy-compiled` (the compiled") < verdicts.index("`zdproxy` (this")
    compiled, checkout = verdicts.split("`zdproxy` (this checkout")
    assert "- NOT met: CPU/request 1.36x nginx" in compiled  # 30 / 22
    assert "- met: p99 2.31x" not in compiled and "- NOT met: p99 2.31x" in compiled
    assert "- met: 0 errors" in compiled
    assert "- met: CPU/request 1.18x nginx" in checkout
    assert "NOT met: 1 errors" in checkout
    assert "| zdproxy | 10 / 10 | 1.0 | 1.0 | 4.00 | 4.00x |" in text
    assert "admin API answered 404" in text
    assert "| zdproxy | flip | 50 | 1.00 | 4.00 | 9.0 | 0 | - | 20 / 20 / 60 |  |" in text


def test_write_reports(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    problems = report.write_reports(_results(), tmp_path)
    assert problems == []
    assert (tmp_path / "chart.png").stat().st_size > 0
    assert json.loads((tmp_path / "results.json").read_text())["meta"]["rounds"] == 3
    assert "## Machine" in (tmp_path / "RESULTS.md").read_text()


def _slice(
    requests: int, seconds: float, cpu_s: float, p99_us: int, **extra: Any
) -> dict[str, Any]:
    record: dict[str, Any] = {
        "case": "keepalive-c50",
        "proxy": "zdproxy",
        "requests": requests,
        "duration_us": int(seconds * 1e6),
        "bytes": requests * 1100,
        "connect": 0,
        "read": 0,
        "write": 0,
        "status": 0,
        "timeout": 0,
        "errors": 0,
        "p50_us": p99_us // 4,
        "p90_us": p99_us // 2,
        "p99_us": p99_us,
        "max_us": p99_us * 3,
        "mean_us": p99_us / 5,
        "rps": requests / seconds,
        "cpu_s": cpu_s,
        "cpu_us_per_req": round(cpu_s * 1e6 / requests, 2),
        "proxy_cpu_other_pct": 0.0,
    }
    record.update(extra)
    return record


def test_combined_slices_rate_from_sums_and_p99_is_the_median() -> None:
    # a slow second (half the requests for the same CPU) weighs by its requests
    slices = [
        _slice(50_000, 1.0, 1.0, 2000),
        _slice(25_000, 1.0, 1.0, 9000, read=2, errors=2, proxy_cpu_other_pct=30.0),
        _slice(50_000, 1.0, 1.0, 1800),
    ]
    out = scenarios.combine_slices(slices)
    assert out["requests"] == 125_000
    assert out["rps"] == 41666.7
    assert out["cpu_s"] == 3.0
    assert out["cpu_us_per_req"] == 24.0  # 3 s of CPU over 125,000 requests
    assert out["p99_us"] == 2000  # the median slice, not the slow one
    assert out["max_us"] == 27000
    assert (out["read"], out["errors"]) == (2, 2)
    assert out["proxy_cpu_other_pct"] == 10.0
    assert out["mean_us"] == round((400 * 50_000 + 1800 * 25_000 + 360 * 50_000) / 125_000, 1)
    assert out["slices"] == slices


def test_one_slice_is_the_record_itself() -> None:
    only = _slice(1000, 1.0, 0.02, 500)
    assert scenarios.combine_slices([only]) is only


def test_slices_without_cpu_have_no_cpu_figure() -> None:
    slices = [_slice(10, 1.0, 0.0, 100), _slice(10, 1.0, 0.0, 100)]
    for record in slices:
        del record["cpu_s"], record["cpu_us_per_req"]
    assert "cpu_us_per_req" not in scenarios.combine_slices(slices)


def test_slice_order_alternates_direction() -> None:
    a, b, c = (object() for _ in range(3))
    order = scenarios.slice_order([a, b, c], 3)  # type: ignore[list-item]
    assert order == [a, b, c, c, b, a, a, b, c]
    assert scenarios.slice_order([a, b], 1) == [a, b]  # type: ignore[list-item]
