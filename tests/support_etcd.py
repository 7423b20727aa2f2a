"""A real etcd server for the shared-state tests: the ``etcd`` binary (Debian's
``etcd-server``; ``scripts/system-deps`` installs it) on loopback, client and
peer ports from ``ports.free_port``, a temporary data directory, stopped by PID.

A missing binary is a test failure, not a skip: CI installs it, and a suite that
silently skipped the shared-state tests would say nothing about them.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import signal
import ssl
import subprocess
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import aiohttp
from ports import free_port
from support import Backend, wait_for
from support_control import AdminClient, AdminProxy, admin_config


def etcd_binary() -> str:
    found = shutil.which("etcd") or ("/usr/bin/etcd" if os.path.exists("/usr/bin/etcd") else None)
    if found is None:
        raise AssertionError(
            "the etcd binary is not installed (apt-get install etcd-server; scripts/system-deps "
            "does it): the shared-state tests need a real etcd"
        )
    return found


class EtcdServer:
    """One single-member etcd cluster; ``restart`` keeps its data and ports."""

    def __init__(self, workdir: Path, tls: tuple[Path, Path, Path] | None = None) -> None:
        """``tls``: (server certificate, its key, the CA that signed it): https."""
        self.workdir = workdir
        self.tls = tls
        self.data_dir = workdir / "etcd-data"
        self.client_port = free_port()
        self.peer_port = free_port()
        self.endpoint = f"127.0.0.1:{self.client_port}"
        self.url = f"{'https' if tls else 'http'}://{self.endpoint}"
        self.log_path = workdir / "etcd.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> EtcdServer:
        binary = etcd_binary()
        peer = f"http://127.0.0.1:{self.peer_port}"
        log = open(self.log_path, "ab")  # noqa: SIM115 - closed with the process
        self._log = log
        self.proc = subprocess.Popen(
            [
                binary,
                "--name",
                "zdtest",
                "--data-dir",
                str(self.data_dir),
                "--listen-client-urls",
                self.url,
                "--advertise-client-urls",
                self.url,
                "--listen-peer-urls",
                peer,
                "--initial-advertise-peer-urls",
                peer,
                "--initial-cluster",
                f"zdtest={peer}",
                "--log-level",
                "warn",
                *(
                    ["--cert-file", str(self.tls[0]), "--key-file", str(self.tls[1])]
                    if self.tls is not None
                    else []
                ),
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        wait_for(self.healthy, 20, f"etcd on {self.endpoint}")
        return self

    def healthy(self) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            raise AssertionError(f"etcd exited early:\n{self.log()}")
        try:
            with urllib.request.urlopen(
                self.url + "/health", timeout=1, context=self._context()
            ) as answer:
                return bool(json.loads(answer.read()).get("health") == "true")
        except (OSError, ValueError, urllib.error.URLError):
            return False

    def _context(self) -> ssl.SSLContext | None:
        return ssl.create_default_context(cafile=str(self.tls[2])) if self.tls else None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)
        self._log.close()
        self.proc = None

    def restart(self) -> None:
        self.stop()
        self.start()

    # ---- reading it directly (the JSON gateway, as zdproxy does) -----------------------

    def call(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        request = urllib.request.Request(
            self.url + path, data=json.dumps(body).encode(), method="POST"
        )
        with urllib.request.urlopen(request, timeout=5, context=self._context()) as answer:
            result: dict[str, Any] = json.loads(answer.read())
            return result

    def get_prefix(self, prefix: str) -> dict[str, bytes]:
        raw = prefix.encode()
        end = raw[:-1] + bytes([raw[-1] + 1])
        answer = self.call(
            "/v3/kv/range",
            {"key": base64.b64encode(raw).decode(), "range_end": base64.b64encode(end).decode()},
        )
        return {
            base64.b64decode(kv["key"]).decode(): base64.b64decode(kv.get("value", ""))
            for kv in answer.get("kvs", [])
        }

    def compact(self) -> None:
        """Compact the history up to the current revision (old watch revisions go)."""
        revision = self.call("/v3/kv/range", {"key": base64.b64encode(b"x").decode()})["header"][
            "revision"
        ]
        self.call("/v3/kv/compaction", {"revision": revision, "physical": True})


# ---- zdproxy instances sharing one etcd ---------------------------------------------------


def shared_config(pools: dict[str, Any], etcd: EtcdServer, **extra: Any) -> dict[str, Any]:
    config = admin_config(pools, None, **extra)
    config["state"] = {"etcd": {"endpoints": [etcd.endpoint], "prefix": "/zdtest/", "lease_ttl": 2}}
    return config


def real_pools(blue: Backend, green: Backend) -> dict[str, Any]:
    return {
        "blue": {"weight": 100, "backends": [{"id": "blue-1", "address": blue.address}]},
        "green": {"weight": 0, "backends": [{"id": "green-1", "address": green.address}]},
    }


def instances(
    pools: dict[str, Any],
    etcd: EtcdServer,
    tmp_path: Path,
    count: int,
    extra: dict[int, dict[str, Any]] | None = None,
) -> list[AdminProxy]:
    """``extra``: more config keys for instance n."""
    started = []
    for n in range(count):
        workdir = tmp_path / f"zd{n}"
        workdir.mkdir()
        config = shared_config(pools, etcd, **(extra or {}).get(n, {}))
        started.append(AdminProxy(config, workdir).start())
    return started


async def etcd_view(admin: AdminClient) -> dict[str, Any]:
    state = await admin.state()
    view: dict[str, Any] = state["persistence"]["etcd"]
    return view


async def served_by(session: aiohttp.ClientSession, url: str) -> str:
    async with session.get(url + "/") as response:
        assert response.status == 200, response.status
        return response.headers["X-Backend"]


async def connected(admin: AdminClient) -> bool:
    return bool((await etcd_view(admin))["connected"])


async def pool_weights(admin: AdminClient) -> dict[str, int]:
    return {p: v["weight"] for p, v in (await admin.state())["pools"].items()}


def small_runtime() -> Any:
    from zdproxy.config.schema import Config
    from zdproxy.control.runtime import Runtime

    config = Config.model_validate(
        {
            "listen": ["127.0.0.1:8080"],
            "state": {"path": None},
            "health_check": {"enabled": False},
            "pools": {
                "blue": {"weight": 100, "backends": [{"id": "b1", "address": "127.0.0.1:9"}]},
                "green": {"weight": 0, "backends": [{"id": "g1", "address": "127.0.0.1:10"}]},
            },
        }
    )
    return Runtime(config)
