"""TLS test helpers: certificates made by the openssl CLI (a CA, leaf certificates
for names and wildcards, a second CA that signs nothing of ours), TLS clients that
report what the handshake gave, and a backend that serves HTTPS."""

from __future__ import annotations

import asyncio
import shutil
import socket
import ssl
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiohttp import web
from support import Backend

OPENSSL = shutil.which("openssl") or "/usr/bin/openssl"


def _run(*args: str) -> None:
    subprocess.run([OPENSSL, *args], check=True, capture_output=True, timeout=60)


@dataclass(frozen=True)
class Pair:
    cert: Path
    key: Path

    def config(self) -> dict[str, str]:
        return {"cert": str(self.cert), "key": str(self.key)}


class Pki:
    """A CA in ``directory`` that issues server certificates (EC P-256: fast)."""

    def __init__(self, directory: Path, name: str = "Test CA") -> None:
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)
        slug = name.replace(" ", "-").lower()
        self.ca = directory / f"{slug}.pem"
        self.ca_key = directory / f"{slug}.key"
        _run(
            "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
            "-nodes", "-keyout", str(self.ca_key), "-out", str(self.ca),
            "-days", "2", "-subj", f"/CN={name}",
            "-addext", "basicConstraints=critical,CA:TRUE",
            "-addext", "keyUsage=critical,keyCertSign,cRLSign",
        )  # fmt: skip

    def issue(self, file_name: str, common_name: str, *dns: str, ip: str | None = None) -> Pair:
        """A leaf certificate for ``dns`` names (and ``ip``) signed by this CA."""
        cert = self.directory / f"{file_name}.pem"
        key = self.directory / f"{file_name}.key"
        csr = self.directory / f"{file_name}.csr"
        ext = self.directory / f"{file_name}.ext"
        sans = [f"DNS:{name}" for name in dns] + ([f"IP:{ip}"] if ip else [])
        ext.write_text(
            "basicConstraints=CA:FALSE\nkeyUsage=digitalSignature\n"
            "extendedKeyUsage=serverAuth\n" + (f"subjectAltName={','.join(sans)}\n" if sans else "")
        )
        _run(
            "req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
            "-nodes", "-keyout", str(key), "-out", str(csr), "-subj", f"/CN={common_name}",
        )  # fmt: skip
        _run(
            "x509", "-req", "-in", str(csr), "-CA", str(self.ca), "-CAkey", str(self.ca_key),
            "-CAcreateserial", "-out", str(cert), "-days", "2", "-extfile", str(ext),
        )  # fmt: skip
        return Pair(cert, key)


def client_context(ca: Path | None = None, **options: Any) -> ssl.SSLContext:
    """A verifying client context trusting ``ca`` (or nothing verified without it)."""
    if ca is None:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    else:
        context = ssl.create_default_context(cafile=str(ca))
    for name, value in options.items():
        setattr(context, name, value)
    return context


@dataclass
class Handshake:
    subject_cn: str
    version: str | None
    alpn: str | None


def handshake(
    port: int, server_name: str | None, context: ssl.SSLContext, timeout: float = 10.0
) -> Handshake:
    """Connect, finish the handshake, report the certificate's CN, version, ALPN."""
    with (
        socket.create_connection(("127.0.0.1", port), timeout=timeout) as raw,
        context.wrap_socket(raw, server_hostname=server_name) as tls,
    ):
        der = tls.getpeercert(binary_form=True)
        assert der is not None
        return Handshake(_common_name(der), tls.version(), tls.selected_alpn_protocol())


def _common_name(der: bytes) -> str:
    """The subject CN of a DER certificate, through the openssl CLI (the ssl module
    decodes a peer certificate only once verified)."""
    out = subprocess.run(
        [OPENSSL, "x509", "-inform", "DER", "-noout", "-subject", "-nameopt", "multiline"],
        input=der,
        capture_output=True,
        check=True,
        timeout=30,
    ).stdout.decode()
    for line in out.splitlines():
        name, _, value = line.partition("=")
        if name.strip() == "commonName":
            return value.strip()
    raise AssertionError(f"no CN in {out!r}")


def tls_request(
    port: int, data: bytes, server_name: str | None, context: ssl.SSLContext, timeout: float = 10.0
) -> bytes:
    """Send raw bytes over TLS, read until the server closes (or a timeout)."""
    with (
        socket.create_connection(("127.0.0.1", port), timeout=timeout) as raw,
        context.wrap_socket(raw, server_hostname=server_name) as tls,
    ):
        tls.sendall(data)
        chunks = []
        try:
            while chunk := tls.recv(65536):
                chunks.append(chunk)
        except (TimeoutError, ssl.SSLEOFError, ConnectionResetError):
            pass
        return b"".join(chunks)


class TlsBackend(Backend):
    """The test ``Backend`` serving HTTPS with ``pair``."""

    def __init__(self, name: str, pair: Pair, pool: str = "") -> None:
        super().__init__(name, pool)
        self.pair = pair

    async def start(self) -> TlsBackend:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(str(self.pair.cert), str(self.pair.key))
        self._runner = web.AppRunner(self.app(), access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port, ssl_context=context).start()
        return self


async def athread(func: Any, *args: Any) -> Any:
    return await asyncio.get_running_loop().run_in_executor(None, func, *args)
