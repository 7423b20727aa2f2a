"""TLS against a real ``zdproxy run``: certificates made by openssl for the test,
real handshakes (Python's ssl, http.client), real backends (plain and HTTPS)."""

from __future__ import annotations

import http.client
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import warnings
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from aiohttp import web
from ports import free_port
from support import (
    Backend,
    async_wait_for,
    base_config,
    in_thread,
    raw_request,
    running,
    wait_for,
)
from support_control import AdminClient, AdminProxy, admin_config
from support_reload import rewrite
from support_tls import Pair, Pki, TlsBackend, client_context, handshake, tls_request


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    directory = tmp_path_factory.mktemp("pki")
    ca = Pki(directory / "ca")
    other = Pki(directory / "other", "Other CA")
    yield {
        "ca": ca,
        "other_ca": other,
        "a": ca.issue("a", "a.test", "a.test"),
        "b": ca.issue("b", "b.test", "b.test", "www.b.test"),
        "wild": ca.issue("wild", "wildcard.w.test", "*.w.test"),
        "a2": ca.issue("a2", "a.test second", "a.test"),
        "backend": ca.issue("backend", "backend.internal", "backend.internal", ip="127.0.0.1"),
    }


@pytest.fixture
async def backend() -> AsyncIterator[Backend]:
    server = await Backend("b1").start()
    yield server
    await server.stop()


def tls_config(backend: Backend, tls: dict[str, Any], **extra: Any) -> tuple[dict[str, Any], int]:
    """A plain listener first (the test helpers wait on it), then the TLS one."""
    port = free_port()
    pools = {"blue": {"weight": 100, "backends": [{"address": backend.address}]}}
    config = base_config(pools, **extra)
    config["listen"].append({"address": f"127.0.0.1:{port}", "tls": tls})
    return config, port


def certificates(pki: dict[str, Any], *names: str) -> dict[str, Any]:
    return {"certificates": [pki[name].config() for name in names]}


# ---- handshakes ----------------------------------------------------------------------


async def test_sni_chooses_the_certificate_and_alpn_is_http11(
    backend: Backend, pki: dict[str, Any], tmp_path: Path
) -> None:
    config, port = tls_config(backend, certificates(pki, "a", "b", "wild"))
    ca = pki["ca"].ca
    verify = client_context(ca)
    verify.set_alpn_protocols(["h2", "http/1.1"])
    unverified = client_context(None)
    with running(config, tmp_path):
        for name, expected in [
            ("a.test", "a.test"),
            ("b.test", "b.test"),
            ("www.b.test", "b.test"),
            ("WWW.B.Test", "b.test"),  # names are case-insensitive
            ("x.w.test", "wildcard.w.test"),
            ("deep.x.w.test", "a.test"),  # a star is one label: the default
            ("w.test", "a.test"),
            ("unknown.test", "a.test"),
        ]:
            result = await in_thread(handshake, port, name, unverified)
            assert result.subject_cn == expected, name
        # no SNI at all (an IP address): the first certificate
        result = await in_thread(handshake, port, None, unverified)
        assert result.subject_cn == "a.test"
        # the chain verifies against the CA, for the name asked
        result = await in_thread(handshake, port, "www.b.test", verify)
        assert result.alpn == "http/1.1"
        assert result.version in ("TLSv1.2", "TLSv1.3")


async def test_simple_cert_and_key_form(
    backend: Backend, pki: dict[str, Any], tmp_path: Path
) -> None:
    config, port = tls_config(backend, pki["b"].config())
    with running(config, tmp_path):
        # any name, or none: the one certificate
        for name in ("b.test", "a.test", None):
            result = await in_thread(handshake, port, name, client_context(None))
            assert result.subject_cn == "b.test"
        response = await in_thread(
            tls_request,
            port,
            b"GET /x HTTP/1.1\r\nHost: b.test\r\nConnection: close\r\n\r\n",
            "b.test",
            client_context(pki["ca"].ca),
        )
    assert response.startswith(b"HTTP/1.1 200 OK\r\n")
    assert response.endswith(b"\r\n\r\nb1\n")


async def test_versions_below_the_minimum_are_refused(
    backend: Backend, pki: dict[str, Any], tmp_path: Path
) -> None:
    config, port = tls_config(backend, pki["a"].config())
    tls13_port = free_port()
    config["listen"].append(
        {"address": f"127.0.0.1:{tls13_port}", "tls": {**pki["a"].config(), "min_version": "1.3"}}
    )
    # a client that offers TLS 1.0-1.1 only (its own floor lowered, so that the
    # refusal is the server's)
    old = client_context(None)
    old.set_ciphers("DEFAULT:@SECLEVEL=0")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        old.minimum_version = ssl.TLSVersion.TLSv1
        old.maximum_version = ssl.TLSVersion.TLSv1_1
    tls12 = client_context(None, maximum_version=ssl.TLSVersion.TLSv1_2)
    with running(config, tmp_path):
        # (OpenSSL 3's own security level refuses TLS < 1.2 too; the TLS 1.3 listener
        # below is what shows that min_version itself is applied)
        with pytest.raises(ssl.SSLError):
            await in_thread(handshake, port, "a.test", old)
        assert (await in_thread(handshake, port, "a.test", tls12)).version == "TLSv1.2"
        # min_version 1.3: a TLS 1.2 client is refused, a 1.3 one served
        with pytest.raises(ssl.SSLError):
            await in_thread(handshake, tls13_port, "a.test", tls12)
        assert (await in_thread(handshake, tls13_port, "a.test", client_context(None))).version == (
            "TLSv1.3"
        )


# ---- requests over TLS -----------------------------------------------------------------


def _forwarded(backend: Backend, index: int = -1) -> list[tuple[bytes, bytes]]:
    return [
        (name, value)
        for name, value in backend.requests[index]["raw_headers"]
        if name.lower().startswith(b"x-forwarded-")
    ]


async def test_x_forwarded_proto_is_https_over_tls_only(
    backend: Backend, pki: dict[str, Any], tmp_path: Path
) -> None:
    config, port = tls_config(backend, pki["a"].config())
    plain = int(config["listen"][0].rpartition(":")[2])
    request = (
        b"GET /p HTTP/1.1\r\nHost: a.test\r\nX-Forwarded-Proto: %s\r\nConnection: close\r\n\r\n"
    )
    with running(config, tmp_path):
        context = client_context(pki["ca"].ca)
        await in_thread(
            tls_request, port, b"GET /p HTTP/1.1\r\nHost: a.test\r\n\r\n", "a.test", context
        )
        assert _forwarded(backend) == [
            (b"X-Forwarded-For", b"127.0.0.1"),
            (b"X-Forwarded-Proto", b"https"),
            (b"X-Forwarded-Host", b"a.test"),
        ]
        # a client's own X-Forwarded-Proto is not trusted (no trusted_proxies): over
        # TLS it says https whatever the client wrote ...
        await in_thread(tls_request, port, request % b"http", "a.test", context)
        assert (b"X-Forwarded-Proto", b"https") in _forwarded(backend)
        assert (b"X-Forwarded-Proto", b"http") not in _forwarded(backend)
        # ... and a plain request claiming https goes on as http
        response = await in_thread(raw_request, plain, request % b"https")
        assert response.startswith(b"HTTP/1.1 200 OK\r\n")
        assert [v for n, v in _forwarded(backend) if n == b"X-Forwarded-Proto"] == [b"http"]
    assert len(backend.requests) == 3


async def test_keep_alive_and_chunked_upload_over_tls(pki: dict[str, Any], tmp_path: Path) -> None:
    server = await Backend("b1").start()
    try:
        config, port = tls_config(server, pki["a"].config())
        body = bytes(range(256)) * 8192  # 2 MiB: reading pauses and resumes on the way

        def chunks() -> Iterator[bytes]:
            return (body[i : i + 100_000] for i in range(0, len(body), 100_000))

        def client() -> tuple[list[int], bytes, bool]:
            # by address (no SNI: the default certificate), the chain verified
            context = client_context(pki["ca"].ca, check_hostname=False)
            conn = http.client.HTTPSConnection("127.0.0.1", port, context=context, timeout=30)
            statuses = []
            for _ in range(3):
                conn.request("GET", "/k")
                response = conn.getresponse()
                statuses.append(response.status)
                assert response.read() == b"b1\n"
            first_socket = conn.sock
            # a chunked upload on the same connection (the backend answers once it
            # has read it all, so the connection stays open)
            conn.request("POST", "/upload", body=chunks(), encode_chunked=True)
            response = conn.getresponse()
            assert response.read() == b"b1\n"
            statuses.append(response.status)
            same = conn.sock is first_socket
            # both directions streamed at once: /echo answers while it reads (its
            # response starts before the upload ends, so that connection then closes)
            conn.request("POST", "/echo", body=chunks(), encode_chunked=True)
            response = conn.getresponse()
            echoed = response.read()
            statuses.append(response.status)
            conn.close()
            return statuses, echoed, same

        with running(config, tmp_path):
            statuses, echoed, same_connection = await in_thread(client)
        assert statuses == [200] * 5
        assert same_connection  # four requests, one TLS connection
        assert echoed == body
        assert [r["body_len"] for r in server.requests] == [0, 0, 0, len(body), len(body)]
        assert [r["headers"].get("Transfer-Encoding") for r in server.requests] == [
            None,
            None,
            None,
            "chunked",
            "chunked",
        ]
    finally:
        await server.stop()


# ---- redirect listener -------------------------------------------------------------------


async def test_redirect_listener_answers_308_to_https(
    backend: Backend, pki: dict[str, Any], tmp_path: Path
) -> None:
    config, port = tls_config(backend, pki["a"].config())
    redirect = free_port()
    fixed = free_port()
    config["listen"] += [
        {"address": f"127.0.0.1:{redirect}", "redirect_https": True},
        {"address": f"127.0.0.1:{fixed}", "redirect_https": 443},
    ]
    with running(config, tmp_path):
        response = await in_thread(
            raw_request,
            redirect,
            b"GET /a/b?x=1&y=%20 HTTP/1.1\r\nHost: Shop.Example:8080\r\nUser-Agent: t\r\n\r\n",
        )
        assert response == (
            b"HTTP/1.1 308 Permanent Redirect\r\n"
            b"Location: https://shop.example:%d/a/b?x=1&y=%%20\r\n"
            b"Content-Length: 0\r\nConnection: close\r\n\r\n" % port
        )
        # to 443: no port in the Location; a POST keeps its method and body (308)
        response = await in_thread(
            raw_request,
            fixed,
            b"POST /form HTTP/1.1\r\nHost: [::1]:80\r\nContent-Length: 3\r\n\r\nabc",
        )
        assert response.split(b"\r\n")[:2] == [
            b"HTTP/1.1 308 Permanent Redirect",
            b"Location: https://[::1]/form",
        ]
        # no host to send the client to: 400, never a Location made of nothing
        response = await in_thread(raw_request, fixed, b"GET / HTTP/1.0\r\n\r\n")
        assert response.startswith(b"HTTP/1.1 400 ")
        assert b"Location" not in response
    assert backend.requests == []  # nothing proxied


# ---- reload ----------------------------------------------------------------------------------


async def test_reload_rereads_certificates_and_refuses_a_bad_one(
    backend: Backend, pki: dict[str, Any], tmp_path: Path
) -> None:
    # the served files live in the test's directory: rewritten in place, as
    # certbot-style renewals do
    cert, key = tmp_path / "site.pem", tmp_path / "site.key"
    cert.write_bytes(pki["a"].cert.read_bytes())
    key.write_bytes(pki["a"].key.read_bytes())
    config, port = tls_config(backend, {"cert": str(cert), "key": str(key)})
    context = client_context(pki["ca"].ca)

    def served() -> str:
        return handshake(port, "a.test", context).subject_cn

    with running(config, tmp_path) as proxy:
        assert await in_thread(served) == "a.test"
        # a renewed certificate at the same paths, the config unchanged
        cert.write_bytes(pki["a2"].cert.read_bytes())
        key.write_bytes(pki["a2"].key.read_bytes())
        proxy.signal(signal.SIGHUP)
        await in_thread(wait_for, lambda: served() == "a.test second", 15, "the new certificate")
        # a bad one (key of another certificate): refused, the last good one serves
        key.write_bytes(pki["b"].key.read_bytes())
        proxy.signal(signal.SIGHUP)
        await in_thread(wait_for, lambda: "config reload refused" in proxy.log(), 15, "the refusal")
        assert f"listen.1.tls: the key {key} does not match the certificate {cert}" in proxy.log()
        assert await in_thread(served) == "a.test second"
        response = await in_thread(
            tls_request, port, b"GET / HTTP/1.1\r\nHost: a.test\r\nConnection: close\r\n\r\n",
            "a.test", context,
        )  # fmt: skip
        assert response.startswith(b"HTTP/1.1 200 OK\r\n")
        # another certificate file named in the config: taken too
        rewrite(proxy.path, {**config, "listen": [config["listen"][0], {
            "address": f"127.0.0.1:{port}", "tls": certificates(pki, "b", "a")}]})  # fmt: skip
        proxy.signal(signal.SIGHUP)
        unverified = client_context(None)

        def default() -> str:
            return handshake(port, None, unverified).subject_cn

        await in_thread(wait_for, lambda: default() == "b.test", 15, "b as the default")
        assert await in_thread(served) == "a.test"


# ---- zdproxy check ---------------------------------------------------------------------------


def test_check_names_bad_certificate_files(pki: dict[str, Any], tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a certificate\n")
    a: Pair = pki["a"]
    config = {
        "listen": [
            "127.0.0.1:8080",
            {"address": "127.0.0.1:8443", "tls": {"cert": str(a.cert), "key": str(pki["b"].key)}},
            {
                "address": "127.0.0.1:8444",
                "tls": {
                    "certificates": [
                        a.config(),
                        {"cert": str(tmp_path / "missing.pem"), "key": str(a.key)},
                        {"cert": str(garbage), "key": str(a.cert)},
                    ],
                    "min_version": 1.1,
                },
            },
            {"address": "127.0.0.1:8445", "tls": {"cert": str(a.cert)}},
        ],
        "pools": {
            "blue": {
                "weight": 100,
                "tls": {"ca": str(garbage)},
                "backends": [{"address": "127.0.0.1:9001"}],
            }
        },
    }
    path = tmp_path / "zdproxy.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    out = subprocess.run(
        [sys.executable, "-m", "zdproxy.cli", "check", "-c", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode != 0
    lines = out.stdout.splitlines() + out.stderr.splitlines()
    expected = [
        f"{path}:4: listen.1.tls: the key {pki['b'].key} does not match the certificate {a.cert}",
        f"{path}:12: listen.2.tls.certificates.1.cert: cannot read certificate "
        f"{tmp_path / 'missing.pem'}: No such file or directory",
        f"{path}:14: listen.2.tls.certificates.2.cert: {garbage} is not a PEM certificate "
        "(no BEGIN CERTIFICATE line)",
        f"{path}:15: listen.2.tls.certificates.2.key: {a.cert} is not a PEM private key "
        "(no BEGIN PRIVATE KEY line)",
        f"{path}:16: listen.2.tls.min_version: must be one of '1.2' or '1.3', got '1.1'",
        f"{path}:18: listen.3.tls: needs cert and key (or a list of certificates)",
        f"{path}:24: pools.blue.tls.ca: {garbage} is not a PEM CA certificate "
        "(no BEGIN CERTIFICATE line)",
    ]
    assert [line for line in lines if line.startswith(str(path))] == expected, path.read_text()


# ---- TLS to backends -------------------------------------------------------------------------


async def test_tls_to_backends_verifies_the_ca(pki: dict[str, Any], tmp_path: Path) -> None:
    server = await TlsBackend("secure", pki["backend"]).start()
    try:
        pools = {
            "good": {
                "weight": 100,
                "tls": {"ca": str(pki["ca"].ca), "server_name": "backend.internal"},
                "backends": [{"id": "good-1", "address": server.address}],
            },
            "bad": {
                "weight": 0,
                "tls": {"ca": str(pki["other_ca"].ca)},
                "backends": [{"id": "bad-1", "address": server.address}],
            },
        }
        config = admin_config(
            pools,
            None,
            health_check={"enabled": True, "interval": "200ms", "timeout": "2s", "rise": 1},
        )
        proxy = AdminProxy(config, tmp_path).start()
        try:
            async with AdminClient(proxy.admin_url) as admin:

                async def health(backend_id: str) -> dict[str, Any]:
                    state = (await admin.call("GET", "/api/v1/state")).json()
                    for pool in state["pools"].values():
                        for view in pool["backends"]:
                            if view["id"] == backend_id:
                                return dict(view)
                    raise AssertionError(backend_id)

                async def checked(backend_id: str) -> bool:
                    view = await health(backend_id)
                    return bool(view["health_checks"] and view["health_checks"]["checks_total"])

                await async_wait_for(lambda: checked("good-1"), 15, "a check of good-1")
                await async_wait_for(lambda: checked("bad-1"), 15, "a check of bad-1")
                good, bad = await health("good-1"), await health("bad-1")
                assert good["health"] == "up", good
                assert bad["health"] != "up", bad
                assert "certificate verify failed" in bad["health_checks"]["last_error"]
            response = await in_thread(
                raw_request, proxy.port, b"GET /g HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
            )
            assert response.startswith(b"HTTP/1.1 200 OK\r\n")
            assert response.endswith(b"\r\n\r\nsecure\n")
            # the request went over TLS, with the server name asked
            assert server.requests[-1]["path"] == "/g"
        finally:
            proxy.stop()

        # without health checks, a request to the backend with the wrong CA: 502
        plain_config = base_config(
            {"bad": {**pools["bad"], "weight": 100}}, retries={"attempts": 0}
        )
        before = len(server.requests)
        workdir = tmp_path / "plain"
        workdir.mkdir()
        with running(plain_config, workdir) as p:
            response = await in_thread(
                raw_request, p.port, b"GET /w HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
            )
        assert response.startswith(b"HTTP/1.1 502 "), response
        assert len(server.requests) == before  # the request never reached it
    finally:
        await server.stop()


# ---- a client that never finishes its handshake ----------------------------------------------


async def test_a_stalled_handshake_is_closed_after_the_header_timeout(
    backend: Backend, pki: dict[str, Any], tmp_path: Path
) -> None:
    config, port = tls_config(backend, pki["a"].config(), timeouts={"request_header": "1s"})

    def stall(partial: bytes) -> bytes:
        with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
            sock.sendall(partial)
            return sock.recv(65536)  # b"" once the proxy closes; a timeout fails the test

    with running(config, tmp_path):
        # nothing at all, then the first bytes of a ClientHello and no more
        assert await in_thread(stall, b"") == b""
        assert await in_thread(stall, b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03") == b""
        # the listener still serves
        result = await in_thread(handshake, port, "a.test", client_context(pki["ca"].ca))
        assert result.subject_cn == "a.test"


# ---- a real-world client ---------------------------------------------------------------------


async def test_curl_over_https_with_sni_and_http11(
    backend: Backend, pki: dict[str, Any], tmp_path: Path
) -> None:
    curl = shutil.which("curl")
    if curl is None:
        pytest.skip("curl not installed")
    config, port = tls_config(backend, certificates(pki, "a", "b"))
    argv = [
        curl, "-sS", "--cacert", str(pki["ca"].ca), "--resolve", f"b.test:{port}:127.0.0.1",
        "-o", "/dev/null", "-w", "%{http_code} %{http_version} %{ssl_verify_result}",
        f"https://b.test:{port}/curl?x=1",
    ]  # fmt: skip
    with running(config, tmp_path):
        done = await in_thread(
            lambda: subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)
        )
    # verified against the CA for the name b.test (so the b certificate was served)
    assert (done.returncode, done.stdout) == (0, "200 1.1 0"), done.stderr
    assert backend.requests[-1]["path"] == "/curl?x=1"
    assert backend.requests[-1]["headers"]["X-Forwarded-Proto"] == "https"


# ---- WebSocket over TLS ----------------------------------------------------------------------


async def test_websocket_over_tls(pki: dict[str, Any], tmp_path: Path) -> None:
    async def echo(request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        async for message in ws:
            await ws.send_str(f"echo {message.data} ({request.headers['X-Forwarded-Proto']})")
        return ws

    app = web.Application()
    app.router.add_get("/ws", echo)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    backend_port = free_port()
    await web.TCPSite(runner, "127.0.0.1", backend_port).start()
    try:
        pools = {"blue": {"weight": 100, "backends": [{"address": f"127.0.0.1:{backend_port}"}]}}
        config = base_config(pools)
        port = free_port()
        config["listen"].append({"address": f"127.0.0.1:{port}", "tls": pki["a"].config()})
        context = client_context(pki["ca"].ca, check_hostname=False)
        with running(config, tmp_path):
            async with (
                aiohttp.ClientSession() as session,
                session.ws_connect(f"wss://127.0.0.1:{port}/ws", ssl=context) as ws,
            ):
                big = "x" * 200_000  # several TLS records each way
                for text in ("one", big):
                    await ws.send_str(text)
                    reply = await ws.receive(timeout=30)
                    assert reply.data == f"echo {text} (https)"
    finally:
        await runner.cleanup()
