"""Control-plane hardening through real processes: a change that cannot be saved
is refused and undone, deep JSON, an oversized Authorization header kept out of
the log, the dashboard's security headers, listeners that cannot be bound, the
audit log in the process log (``zdproxy run`` and ``zdproxy demo``), the actor of
every kind of change, and expired affinity pins."""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from support import (
    Backend,
    ZdproxyProcess,
    base_config,
    free_port,
    in_thread,
    port_open,
    raw_request,
    wait_for,
)
from support_control import (
    DEPLOY_TOKEN,
    TOKEN_ENV,
    AdminClient,
    AdminProxy,
    actl,
    admin_config,
    dummy_pools,
)

from zdproxy.balancing.sticky import Pin, StickyCodec

DEEP = b"[" * 30_000 + b"]" * 30_000

MUTATIONS: list[tuple[str, str, Any]] = [
    ("PUT", "/api/v1/split", {"blue": 50, "green": 50}),
    ("POST", "/api/v1/flip", {"to": "green"}),
    ("POST", "/api/v1/backends", {"pool": "green", "address": "127.0.0.1:1", "id": "green-9"}),
    ("DELETE", "/api/v1/backends/blue-2", None),
    ("POST", "/api/v1/backends/blue-1/drain", None),
    ("POST", "/api/v1/backends/blue-1/disable", None),
    ("POST", "/api/v1/backends/green-2/enable", None),
]


@pytest.fixture
def proxy(tmp_path: Path) -> Iterator[AdminProxy]:
    process = AdminProxy(admin_config(dummy_pools(), tmp_path / "state.json"), tmp_path).start()
    yield process
    process.stop()


@pytest.fixture
async def admin(proxy: AdminProxy) -> AsyncIterator[AdminClient]:
    async with AdminClient(proxy.admin_url) as client:
        yield client


async def restart(process: AdminProxy) -> AdminProxy:
    assert process.stop() == 0
    return AdminProxy(process.config, process.workdir).start()


# ---- a change that cannot be saved ---------------------------------------------------


async def test_a_change_that_cannot_be_saved_is_refused_and_undone(tmp_path: Path) -> None:
    state_dir = tmp_path / "state"
    state_dir.mkdir()
    state_path = state_dir / "state.json"
    process = AdminProxy(admin_config(dummy_pools(), state_path), tmp_path).start()
    try:
        async with AdminClient(process.admin_url) as admin:
            await admin.ok("PUT", "/api/v1/split", {"blue": 80, "green": 20})
            await admin.ok("POST", "/api/v1/backends/green-2/disable")
            saved = state_path.read_bytes()
            before = await admin.state()
            events = await admin.events()
            # a file where the state directory was: no write can succeed, even as root
            aside = tmp_path / "state.aside"
            state_dir.rename(aside)
            state_dir.write_text("not a directory")
            for method, path, body in MUTATIONS:
                answer = await admin.call(method, path, body)
                assert answer.status == 503, (method, path, answer)
                assert answer.error.startswith("the change was not applied: cannot save state:")
                assert answer.error.endswith(f"{state_dir} is not a directory")
            after = await admin.state()
            assert after["pools"] == before["pools"]  # served = saved: every change undone
            assert after["persistence"]["last_error"].startswith("cannot save state:")
            assert await admin.events() == events
            done = await actl(process.admin_url, "flip", "green")
            assert done.returncode == 1 and done.stdout == ""
            assert done.stderr.startswith("zdproxy ctl: 503: the change was not applied:")
            # the directory is back: the refused changes were never written, the next
            # change is saved with the state that was served
            state_dir.unlink()
            aside.rename(state_dir)
            assert state_path.read_bytes() == saved
            await admin.ok("POST", "/api/v1/backends/blue-2/disable")
            assert (await admin.state())["persistence"]["last_error"] is None
        process = await restart(process)
        async with AdminClient(process.admin_url) as admin:
            state = await admin.state()
            weights = {name: pool["weight"] for name, pool in state["pools"].items()}
            assert weights == {"blue": 80, "green": 20}
            backends = {b["id"]: b for p in state["pools"].values() for b in p["backends"]}
            assert sorted(backends) == ["blue-1", "blue-2", "green-1", "green-2"]
            assert {k: b["state"] for k, b in backends.items()} == {
                "blue-1": "up",
                "blue-2": "disabled",
                "green-1": "up",
                "green-2": "disabled",
            }
            assert [e["action"] for e in await admin.events()] == [
                "split",
                "backend.disable",
                "backend.disable",
            ]
    finally:
        process.stop()
    # both runs log to one file: each refused change was logged once, as an error
    undone = [line for line in process.log().splitlines() if "the change was undone" in line]
    assert len(undone) == len(MUTATIONS) + 1
    assert all(" ERROR zdproxy.admin: " in line for line in undone)
    assert not list(tmp_path.rglob("*.tmp"))


# ---- deep JSON -----------------------------------------------------------------------


async def test_deeply_nested_json_bodies_are_400(admin: AdminClient, proxy: AdminProxy) -> None:
    before = await admin.state()
    for method, path, _ in MUTATIONS:
        answer = await admin.call(
            method, path, data=DEEP, headers={"Content-Type": "application/json"}
        )
        assert answer.status == 400, (method, path, answer)
        assert answer.error == "invalid JSON body: nested too deeply"
    assert (await admin.call("GET", "/healthz", token=None)).status == 200
    assert (await admin.state())["pools"] == before["pools"]
    assert await admin.events() == []
    assert "Traceback" not in proxy.log()


def _event(n: int) -> dict[str, Any]:
    return {
        "id": n,
        "time": "2026-01-02T10:00:00.000Z",
        "actor": "default",
        "action": "flip",
        "target": "green",
        "before": {"blue": 100, "green": 0},
        "after": {"blue": 0, "green": 100},
        "note": None,
    }


async def test_deeply_nested_state_and_events_files_do_not_stop_the_start(
    tmp_path: Path,
) -> None:
    state_path = tmp_path / "state.json"
    state_path.write_bytes(DEEP)
    events_file = tmp_path / "state.json.events.jsonl"
    events_file.write_bytes(json.dumps(_event(1)).encode() + b"\n" + DEEP + b"\n")
    process = AdminProxy(admin_config(dummy_pools(), state_path), tmp_path).start()
    try:
        async with AdminClient(process.admin_url) as admin:
            state = await admin.state()
            assert state["pools"]["blue"]["weight"] == 100  # the config's
            assert await admin.events() == [_event(1)]
            aside = list(tmp_path.glob("state.json.corrupt-*"))
            assert len(aside) == 1 and aside[0].read_bytes() == DEEP
            result = await admin.ok("POST", "/api/v1/flip", {"to": "green"})
            assert result["event"]["id"] == 2
            assert json.loads(state_path.read_text())["weights"]["green"] == 100
    finally:
        process.stop()
    log = process.log()
    assert "is corrupt (nested too deeply)" in log and "skipped 1 unreadable line" in log
    assert "Traceback" not in log


# ---- an oversized Authorization header -----------------------------------------------


async def test_an_oversized_authorization_header_never_reaches_the_log(
    admin: AdminClient, proxy: AdminProxy
) -> None:
    secret = "zdsecret" + os.urandom(8).hex() + "k" * 9000
    for name in ("Authorization", "Cookie"):
        value = f"Bearer {secret}" if name == "Authorization" else f"session={secret}"
        request = f"GET /api/v1/state HTTP/1.1\r\nHost: h\r\n{name}: {value}\r\n\r\n"
        answer = raw_request(proxy.admin_port, request.encode())
        status = int(answer.split(b" ", 2)[1])
        assert 400 <= status < 500, answer[:200]
    assert (await admin.call("GET", "/healthz", token=None)).status == 200
    await admin.state()
    assert proxy.stop() == 0
    log = proxy.log()
    assert "refused a malformed request" in log
    assert secret[:16] not in log and "kkkkkkkk" not in log
    assert "Traceback" not in log


# ---- security headers ----------------------------------------------------------------

DASHBOARD_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self'; "
        "connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'none'; "
        "frame-ancestors 'none'"
    ),
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}


async def test_dashboard_and_api_security_headers(admin: AdminClient) -> None:
    for path in ("/", "/static/app.js", "/static/style.css", "/static/nope.js"):
        answer = await admin.call("GET", path, token=None)
        assert answer.status == (404 if "nope" in path else 200), path
        for name, value in DASHBOARD_HEADERS.items():
            assert answer.headers.getall(name) == [value], (path, name)
    page = (await admin.call("GET", "/", token=None)).body
    # the policy allows no inline script or style: the page must need none
    assert re.findall(rb"<script[^>]*>", page) == [b'<script src="/static/app.js">']
    assert b"style=" not in page and b"<style" not in page
    assert not re.search(rb"\son[a-z]+=", page.lower())  # no inline event handlers
    for method, path, token in [
        ("GET", "/api/v1/state", True),
        ("GET", "/api/v1/events", True),
        ("GET", "/metrics", True),
        ("GET", "/api/v1/openapi.json", True),
        ("GET", "/api/v1/state", None),  # 401
        ("POST", "/api/v1/flip", True),  # 400
        ("GET", "/api/v1/nothing", True),  # 404
        ("GET", "/healthz", None),
    ]:
        answer = await admin.call(method, path, token=token)
        assert answer.headers.getall("X-Content-Type-Options") == ["nosniff"], path
        assert answer.headers.getall("Cache-Control") == ["no-store"], path
        assert "Content-Security-Policy" not in answer.headers


# ---- listeners that cannot be bound --------------------------------------------------


def _run(config: dict[str, Any], workdir: Path) -> subprocess.CompletedProcess[str]:
    path = workdir / "zdproxy.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    env = {**os.environ, **TOKEN_ENV}
    return subprocess.run(
        [sys.executable, "-m", "zdproxy.cli", "run", "-c", str(path)],
        capture_output=True,
        text=True,
        cwd=workdir,
        env=env,
        timeout=30,
    )


def _listening(host: str) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, 0))
    sock.listen()
    return sock


@pytest.mark.parametrize("holder", ["127.0.0.1", "0.0.0.0"])
def test_a_data_port_in_use_is_one_line_and_exit_1(tmp_path: Path, holder: str) -> None:
    with _listening(holder) as taken:
        port = taken.getsockname()[1]
        config = base_config({"blue": {"weight": 100, "backends": [{"address": "127.0.0.1:9"}]}})
        config["listen"] = [f"127.0.0.1:{port}"]
        done = _run(config, tmp_path)
    assert done.returncode == 1
    assert done.stdout == ""
    assert done.stderr == f"zdproxy: cannot listen on 127.0.0.1:{port}: address already in use\n"


def test_an_admin_port_in_use_is_one_line_and_exit_1(tmp_path: Path) -> None:
    with _listening("127.0.0.1") as taken:
        port = taken.getsockname()[1]
        config = admin_config(dummy_pools(), tmp_path / "state.json")
        config["admin"]["listen"] = f"127.0.0.1:{port}"
        done = _run(config, tmp_path)
    assert done.returncode == 1
    assert done.stdout == ""
    assert done.stderr == f"zdproxy: cannot listen on 127.0.0.1:{port}: address already in use\n"
    assert not (tmp_path / "state.json").exists()


def test_check_and_run_refuse_overlapping_listeners(tmp_path: Path) -> None:
    port = free_port()
    config = base_config({"blue": {"weight": 100, "backends": [{"address": "127.0.0.1:9"}]}})
    config["listen"] = [f"0.0.0.0:{port}", f"127.0.0.1:{port}"]
    path = tmp_path / "zdproxy.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    line = (
        f"{path}:3: listen.1: 127.0.0.1:{port} overlaps 0.0.0.0:{port} (at listen.0): "
        f"0.0.0.0:{port} takes port {port} on every address, so both cannot be bound\n"
    )
    check = subprocess.run(
        [sys.executable, "-m", "zdproxy.cli", "check", "-c", str(path)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert (check.returncode, check.stdout, check.stderr) == (1, "", line)
    run = _run(config, tmp_path)
    assert (run.returncode, run.stdout, run.stderr) == (1, "", line)


# ---- the audit log in the process log ------------------------------------------------


async def test_every_change_is_recorded_under_the_named_token(
    admin: AdminClient, proxy: AdminProxy
) -> None:
    done: list[str] = []
    for method, path, body in [
        ("PUT", "/api/v1/split", {"blue": 50, "green": 50}),
        ("POST", "/api/v1/flip", {"to": "green"}),
        ("POST", "/api/v1/backends", {"pool": "green", "address": "127.0.0.1:1", "id": "g3"}),
        ("POST", "/api/v1/backends/blue-1/drain", None),
        ("POST", "/api/v1/backends/blue-1/disable", None),
        ("POST", "/api/v1/backends/blue-1/enable", None),
        ("DELETE", "/api/v1/backends/blue-2", None),
    ]:
        answer = await admin.call(method, path, body, token=DEPLOY_TOKEN)
        assert answer.status in (200, 201), (path, answer)
        event = answer.json()["event"]
        assert event["actor"] == "deploy", path
        done.append(event["action"])
    assert done == [
        "split",
        "flip",
        "backend.add",
        "backend.drain",
        "backend.disable",
        "backend.enable",
        "backend.remove",
    ]
    events = await admin.events()
    # a drain of an idle backend completes on its own (actor zdproxy) at any moment
    ours = [(e["actor"], e["action"]) for e in events if e["actor"] != "zdproxy"]
    assert ours == [("deploy", a) for a in done]
    assert {e["action"] for e in events if e["actor"] == "zdproxy"} <= {"backend.drained"}
    assert proxy.stop() == 0
    lines = [line for line in proxy.log().splitlines() if " zdproxy.admin: " in line]
    audit = [line.split(" zdproxy.admin: ", 1)[1] for line in lines if " by deploy: " in line]
    expected = [
        r"split blue,green by deploy: blue=100 green=0 -> blue=50 green=50",
        r"flip green by deploy: blue=50 green=50 -> blue=0 green=100",
        r"backend\.add g3 by deploy: - -> up",
        r"backend\.drain blue-1 by deploy: up -> draining",
        r"backend\.disable blue-1 by deploy: (draining|drained) -> disabled",
        r"backend\.enable blue-1 by deploy: disabled -> up",
        r"backend\.remove blue-2 by deploy: up -> -",
    ]
    assert len(audit) == len(expected), audit
    for line, pattern in zip(audit, expected, strict=True):
        assert re.fullmatch(pattern, line), (line, pattern)
    assert all(" INFO " in line for line in lines if " by " in line)


DEMO_PORTS = (8080, 9901, 9101, 9102, 9103, 9104)


def test_the_demo_logs_flips_and_drains(tmp_path: Path) -> None:
    busy = [port for port in DEMO_PORTS if port_open(port)]
    if busy:
        pytest.fail(f"ports {busy} are taken on this machine: the demo needs them")
    log = tmp_path / "demo.log"
    env = {k: v for k, v in os.environ.items() if k != "ZDPROXY_ADMIN_TOKEN"}
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "zdproxy.cli", "demo"],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
        )
    try:
        wait_for(lambda: b"Ctrl-C" in log.read_bytes(), 20, "the demo's guide")
        found = re.search(r"^  token +(\S+)$", log.read_text(), re.M)
        assert found is not None
        token = found.group(1)
        assert not token.startswith("-")

        def call(method: str, path: str, body: Any = None) -> tuple[int, Any]:
            import urllib.error
            import urllib.request

            data = json.dumps(body).encode() if body is not None else None
            request = urllib.request.Request(
                "http://127.0.0.1:9901" + path, data=data, method=method
            )
            request.add_header("Authorization", f"Bearer {token}")
            try:
                with urllib.request.urlopen(request, timeout=5) as response:
                    return response.status, json.loads(response.read())
            except urllib.error.HTTPError as exc:
                return exc.code, json.loads(exc.read())

        def green_usable() -> bool:
            return bool(call("GET", "/api/v1/state")[1]["pools"]["green"]["usable"])

        wait_for(green_usable, 20, "a healthy green backend")
        assert call("POST", "/api/v1/flip", {"to": "green"})[0] == 200
        assert call("POST", "/api/v1/backends/blue-1/drain")[0] == 200
        wait_for(
            lambda: "backend.drained blue-1 by zdproxy: draining -> drained" in log.read_text(),
            20,
            "the drain's end in the demo's output",
        )
    finally:
        proc.send_signal(signal.SIGINT)
        assert proc.wait(20) == 0
    text = log.read_text()
    assert "INFO zdproxy.admin: flip green by default: blue=100 green=0 -> blue=0 green=100" in text
    drain = r"INFO zdproxy\.admin: backend\.drain blue-1 by default: \w+ -> draining"
    assert re.search(drain, text)


# ---- expired affinity pins -----------------------------------------------------------

STICKY_SECRET = "test-sticky-secret-0123456789"


def _get(port: int, cookie: str) -> tuple[str, str | None]:
    """(pool, new pin or None) of one request with an affinity cookie."""
    answer = raw_request(
        port,
        f"GET / HTTP/1.1\r\nHost: h\r\nCookie: zd_affinity={cookie}\r\n"
        "Connection: close\r\n\r\n".encode(),
    )
    head = answer.partition(b"\r\n\r\n")[0].decode("latin-1")
    assert head.startswith("HTTP/1.1 200"), head
    pool = re.search(r"^X-Zdproxy-Pool: (\S+)", head, re.M | re.I)
    pin = re.search(r"^Set-Cookie: zd_affinity=([^;\s]+)", head, re.M | re.I)
    assert pool is not None
    return pool.group(1), pin.group(1) if pin else None


async def test_an_expired_pin_is_not_honoured(tmp_path: Path) -> None:
    blue = await Backend("blue-1", "blue").start()
    green = await Backend("green-1", "green").start()
    config = base_config(
        {
            "blue": {"weight": 99, "backends": [{"id": "blue-1", "address": blue.address}]},
            "green": {"weight": 1, "backends": [{"id": "green-1", "address": green.address}]},
        },
        sticky={"mode": "pool", "max_age": "1h", "secret_env": "ZDPROXY_TEST_STICKY_SECRET"},
    )
    process = ZdproxyProcess(config, tmp_path, env={"ZDPROXY_TEST_STICKY_SECRET": STICKY_SECRET})
    process.start()
    try:
        codec = StickyCodec(hashlib.sha256(STICKY_SECRET.encode()).digest(), "zd_affinity", 3600)
        now = int(time.time())
        fresh = codec.encode(Pin("green", None, now - 60))
        expired = codec.encode(Pin("green", None, now - 3600 - 120))
        loop_results = [await in_thread(_get, process.port, fresh) for _ in range(10)]
        # a pin within its age holds: green every time, no new pin
        assert loop_results == [("green", None)] * 10
        late = [await in_thread(_get, process.port, expired) for _ in range(10)]
        # an expired one is a new client: a fresh pin to where the split sends it
        assert sum(pool == "green" for pool, _ in late) <= 1
        for pool, pin in late:
            assert pin is not None
            decoded = codec.decode(pin)
            assert decoded is not None and decoded.pool == pool
            assert decoded.epoch >= now
    finally:
        process.stop()
        await blue.stop()
        await green.stop()
