"""Checks of the certificate, key and CA files a config names.

Run by the schema's validators, so that ``zdproxy check`` and a reload report a
missing, unreadable or mismatched file at its key and line, and a reload with a
bad file is refused whole (the certificates serving stay). Plain functions that
raise ``ValueError`` with the message the loader prints.
"""

from __future__ import annotations

import ssl
from pathlib import Path
from typing import Any


def _read(path: str, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise ValueError(f"cannot read {what} {path}: {exc.strerror or exc}") from None


def _decode_cert(path: str) -> dict[str, Any]:
    """The certificate's fields (subject, subjectAltName) as ``SSLSocket.getpeercert``
    gives them. Python's ssl module has no public parser for a certificate file;
    this is the one its own tests use, there since Python 3.0."""
    import _ssl

    decode = _ssl._test_decode_cert  # type: ignore[attr-defined]  # not in the stubs
    try:
        fields: dict[str, Any] = decode(path)
    except (ssl.SSLError, OSError) as exc:
        raise ValueError(f"{path} is not a valid PEM certificate ({exc})") from None
    return fields


def check_cert_file(path: str) -> str:
    data = _read(path, "certificate")
    if b"-----BEGIN CERTIFICATE-----" not in data:
        raise ValueError(f"{path} is not a PEM certificate (no BEGIN CERTIFICATE line)")
    _decode_cert(path)
    return path


def check_key_file(path: str) -> str:
    data = _read(path, "key")
    if b"PRIVATE KEY-----" not in data:
        raise ValueError(f"{path} is not a PEM private key (no BEGIN PRIVATE KEY line)")
    if b"ENCRYPTED" in data:
        raise ValueError(f"{path} is an encrypted key: zdproxy needs it unencrypted")
    return path


def _no_password() -> str:
    # never the interactive prompt OpenSSL would otherwise show on a terminal
    raise ValueError("the key is encrypted")


def load_pair(context: ssl.SSLContext, cert: str, key: str) -> None:
    """``context.load_cert_chain`` with its errors as one readable ``ValueError``."""
    try:
        context.load_cert_chain(cert, key, password=_no_password)
    except ssl.SSLError as exc:
        if "KEY_VALUES_MISMATCH" in str(exc) or exc.reason == "KEY_VALUES_MISMATCH":
            raise ValueError(f"the key {key} does not match the certificate {cert}") from None
        raise ValueError(f"cannot load certificate {cert} with key {key}: {exc}") from None
    except OSError as exc:
        raise ValueError(f"cannot read {cert} or {key}: {exc.strerror or exc}") from None


def check_pair(cert: str, key: str) -> None:
    load_pair(ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER), cert, key)


def check_ca_file(path: str) -> str:
    data = _read(path, "CA file")
    if b"-----BEGIN CERTIFICATE-----" not in data:
        raise ValueError(f"{path} is not a PEM CA certificate (no BEGIN CERTIFICATE line)")
    try:
        ssl.create_default_context(cafile=path)
    except ssl.SSLError as exc:
        raise ValueError(f"{path} is not a valid CA file ({exc})") from None
    return path


def certificate_names(path: str) -> tuple[str, ...]:
    """The DNS names a certificate is for (subjectAltName; the subject's common
    name only when there is none), lower case, as written (``*.example.com``)."""
    fields = _decode_cert(path)
    names = [value for kind, value in fields.get("subjectAltName", ()) if kind == "DNS"]
    if not names:
        for rdn in fields.get("subject", ()):
            names += [value for attr, value in rdn if attr == "commonName"]
    return tuple(name.lower() for name in names)
