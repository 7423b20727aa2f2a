"""The TLS benchmark's configs: nginx accepts its own (``nginx -t``) and zdproxy's
validates, both with the certificate the benchmark makes."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import tls_bench  # benchmarks/ is on the path (conftest)


@pytest.fixture
def certificate(tmp_path: Path) -> tuple[Path, Path]:
    if shutil.which("openssl") is None:
        pytest.skip("openssl not installed")
    return tls_bench.make_certificate(tmp_path)


def test_zdproxy_config_validates(certificate: tuple[Path, Path]) -> None:
    from zdproxy.config.loader import load_config_text

    cert, key = certificate
    config = load_config_text(
        tls_bench.zdproxy_conf(8080, 8443, [9001, 9002], cert, key), "bench.yaml"
    )
    assert [listener.tls is not None for listener in config.listen] == [False, True]
    assert len(config.pools["blue"].backends) == 2


def test_nginx_accepts_its_config(certificate: tuple[Path, Path], tmp_path: Path) -> None:
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    if not Path(nginx).exists():
        pytest.skip("nginx not installed")
    cert, key = certificate
    prefix = tmp_path / "nginx"
    prefix.mkdir()
    conf = prefix / "nginx.conf"
    conf.write_text(tls_bench.nginx_tls_conf(prefix, 8080, 8443, [9001, 9002], cert, key))
    done = subprocess.run(
        [nginx, "-t", "-p", str(prefix), "-c", str(conf), "-e", str(prefix / "error.log")],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    text = conf.read_text()
    assert "listen 127.0.0.1:8443 ssl" in text
    assert "ssl_protocols TLSv1.2 TLSv1.3;" in text
