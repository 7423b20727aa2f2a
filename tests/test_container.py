"""The container image, without a container engine: the Dockerfile's invariants,
and its command lines (ENTRYPOINT + CMD, HEALTHCHECK) run directly, with the
config the image documents (packaging/container/zdproxy.yaml).

``scripts/docker-smoke`` builds and runs the real image where an engine exists.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import aiohttp
import yaml
from ports import free_port
from support import Backend, async_wait_for, in_thread
from support_container import (
    ROOT,
    Stage,
    console_script,
    dockerignore_allows,
    dockerignore_patterns,
    exec_form,
    healthcheck,
    parse_dockerfile,
)

DOCKERFILE = ROOT / "Dockerfile"
CONTAINER_CONFIG = ROOT / "packaging" / "container" / "zdproxy.yaml"
CONFIG_PATH = "/etc/zdproxy/zdproxy.yaml"  # where the image expects the config


def stages() -> list[Stage]:
    return parse_dockerfile(DOCKERFILE)[1]


def final() -> Stage:
    return stages()[-1]


def command_line() -> list[str]:
    """What the container runs: ENTRYPOINT followed by CMD."""
    stage = final()
    entrypoint, cmd = stage.last("ENTRYPOINT"), stage.last("CMD")
    assert entrypoint is not None and cmd is not None
    return exec_form(entrypoint) + exec_form(cmd)


def container_config() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load(CONTAINER_CONFIG.read_text())
    return loaded


def port_of(address: str) -> int:
    return int(address.rpartition(":")[2])


# ---- the Dockerfile's invariants -----------------------------------------------


def test_multi_stage_wheel_into_slim_python_311() -> None:
    all_stages = stages()
    assert len(all_stages) >= 2
    build, runtime = all_stages[0], all_stages[-1]
    assert build.name, "the build stage is named, so the runtime stage can copy from it"
    assert any("pip wheel" in run for run in build.all("RUN"))
    for stage in (build, runtime):
        assert stage.base.startswith("python:3.11-slim"), stage.base
    # the runtime stage installs the built wheels and never the source tree
    assert not runtime.all("COPY"), runtime.all("COPY")
    install = " ".join(runtime.all("RUN"))
    assert f"from={build.name}" in install and "pip install" in install
    assert "--no-index" in install, "the runtime installs only the wheels built here"


def test_runs_as_a_non_root_user() -> None:
    user = final().last("USER")
    assert user is not None, "no USER: the container would run as root"
    name, _, group = user.partition(":")
    assert name not in ("root", "0") and group not in ("root", "0")
    assert name.isdigit(), "a numeric uid lets an orchestrator check runAsNonRoot"
    # the user is created in the same stage, with that uid
    assert any(f"--uid {name}" in run for run in final().all("RUN"))


def test_exec_form_entrypoint_runs_zdproxy_with_the_mounted_config() -> None:
    argv = command_line()  # exec_form fails on a shell form
    assert argv == ["zdproxy", "run", "-c", CONFIG_PATH]
    assert final().last("STOPSIGNAL") == "SIGTERM"
    # the documented path is the one the image uses
    assert CONFIG_PATH in (ROOT / "docs" / "operations.md").read_text()


def test_healthcheck_asks_the_admin_healthz_of_the_documented_config() -> None:
    options, command = healthcheck(final().last("HEALTHCHECK") or "")
    assert command[0] == "python", "slim images have no curl"
    assert {"interval", "timeout", "retries"} <= options.keys()
    url = final().env()["ZDPROXY_HEALTHCHECK_URL"]
    admin = container_config()["admin"]["listen"]
    assert url == f"http://127.0.0.1:{port_of(admin)}/healthz"


def test_exposes_the_listeners_of_the_documented_config() -> None:
    exposed = {int(port) for args in final().all("EXPOSE") for port in args.split()}
    config = container_config()
    listeners = [port_of(address) for address in config["listen"]]
    assert exposed == {*listeners, port_of(config["admin"]["listen"])}


def test_dockerignore_keeps_what_the_build_copies_and_drops_the_rest() -> None:
    patterns = dockerignore_patterns(ROOT / ".dockerignore")
    copied = [
        source
        for args in stages()[0].all("COPY")
        if not args.startswith("--from")
        for source in args.split()[:-1]
    ]
    assert copied
    for source in copied:
        assert dockerignore_allows(patterns, source.rstrip("/")), source
    assert dockerignore_allows(patterns, "zdproxy/admin/app.py")
    for kept_out in (".git/config", ".venv-test/bin/python", "tests/support.py", "benchmarks"):
        assert not dockerignore_allows(patterns, kept_out), kept_out
    assert not dockerignore_allows(patterns, "zdproxy/__pycache__/cli.cpython-311.pyc")


def test_container_config_is_valid() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "zdproxy.cli", "check", "-c", str(CONTAINER_CONFIG)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr


# ---- the command lines, run directly ----------------------------------------------


def local_config(backend: Backend, workdir: Path) -> tuple[dict[str, Any], int, int]:
    """The image's config with loopback ports, a real backend and a temporary state
    file in place of the container's addresses and paths; every other key as is."""
    config = container_config()
    data_port, admin_port = free_port(), free_port()
    config["listen"] = [f"127.0.0.1:{data_port}"]
    config["admin"]["listen"] = f"127.0.0.1:{admin_port}"
    config["state"]["path"] = str(workdir / "zdproxy-state.json")
    config["pools"]["blue"]["backends"] = [{"address": backend.address}]
    config["health_check"] = {"interval": "200ms", "rise": 1}
    return config, data_port, admin_port


def health_probe(admin_port: int) -> subprocess.CompletedProcess[bytes]:
    """The image's HEALTHCHECK command, with this test's admin port in its URL."""
    _options, command = healthcheck(final().last("HEALTHCHECK") or "")
    assert command[0] == "python"
    env = {
        **os.environ,
        **final().env(),
        "ZDPROXY_HEALTHCHECK_URL": f"http://127.0.0.1:{admin_port}/healthz",
    }
    return subprocess.run([sys.executable, *command[1:]], env=env, capture_output=True, timeout=30)


async def fetch(url: str) -> tuple[int, str]:
    timeout = aiohttp.ClientTimeout(total=5)
    async with aiohttp.ClientSession(timeout=timeout) as session, session.get(url) as response:
        return response.status, await response.text()


async def answers(url: str, status: int, body: str | None = None) -> bool:
    try:
        got = await fetch(url)
    except (aiohttp.ClientError, TimeoutError):
        return False
    return got[0] == status and (body is None or got[1] == body)


def access_logged(log_path: Path, target: str) -> bool:
    for line in log_path.read_text().splitlines():
        if line.startswith("{"):
            entry = json.loads(line)
            if entry.get("target") == target:
                return bool(entry["status"] == 200 and entry["pool"] == "blue")
    return False


async def test_the_container_command_line_serves_reports_health_and_stops_on_sigterm(
    tmp_path: Path,
) -> None:
    backend = await Backend("app-blue").start()
    config, data_port, admin_port = local_config(backend, tmp_path)
    config_file = tmp_path / "zdproxy.yaml"
    config_file.write_text(yaml.safe_dump(config, sort_keys=False))
    argv = [arg if arg != CONFIG_PATH else str(config_file) for arg in command_line()]
    argv[0] = console_script(argv[0])  # the installed `zdproxy`, as in the image
    log_path = tmp_path / "zdproxy.log"
    down = await in_thread(health_probe, admin_port)
    assert down.returncode != 0, "the health check passes with nothing listening"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            argv,
            cwd=tmp_path,
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, **final().env(), "ZDPROXY_ADMIN_TOKEN": "container-token"},
        )
    try:
        data_url = f"http://127.0.0.1:{data_port}/hello"
        await async_wait_for(
            lambda: proc.poll() is None and answers(data_url, 200, "app-blue\n"),
            timeout=20,
            what="the container's command line serving",
        )
        assert await fetch(f"http://127.0.0.1:{admin_port}/healthz") == (200, '{"status":"ok"}')
        up = await in_thread(health_probe, admin_port)
        assert up.returncode == 0, up.stderr.decode()
        # the config's access log (json) goes to the container's output
        await async_wait_for(
            lambda: access_logged(log_path, "/hello"), what="the access log line on stderr"
        )

        proc.send_signal(signal.SIGTERM)  # what `docker stop` sends (STOPSIGNAL)
        code = await asyncio.wait_for(in_thread(proc.wait), timeout=30)
        assert code == 0, log_path.read_text()
        after = await in_thread(health_probe, admin_port)
        assert after.returncode != 0, "the health check passes after zdproxy stopped"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        await backend.stop()


async def test_the_health_check_fails_on_an_error_status() -> None:
    """``urlopen`` raises on a 503 (zdproxy shutting down), so the probe exits 1."""
    from aiohttp import web

    async def healthz(request: web.Request) -> web.Response:
        return web.json_response({"error": "shutting down"}, status=503)

    app = web.Application()
    app.router.add_get("/healthz", healthz)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        result = await in_thread(health_probe, port)
        assert result.returncode != 0
        assert b"503" in result.stderr
    finally:
        await runner.cleanup()
