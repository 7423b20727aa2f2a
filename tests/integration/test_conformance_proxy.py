"""Every http-desync-guardian request vector through a real ``zdproxy run``.

The unit test (``tests/unit/test_conformance_vectors.py``) holds the classifier
to the vectors; this one holds the whole process to them, as the conformance
README asks. Each vector becomes raw bytes on a socket (values are YAML strings
encoded as latin-1, or UTF-8 past it), with a ``Host`` added when the vector has
none (zdproxy refuses HTTP/1.1 without Host) and an ``X-Vector`` marker, a body
that matches the framing a strict parser reads, and a pipelined request after
it. What must happen, by tier (strict, the default):

* Compliant: forwarded; the backend gets it complete and well-formed, and the
  pipelined request after it too (the proxy and the backend agree on framing).
* Acceptable: forwarded like Compliant, except the vectors in ``REFUSED``.
* Ambiguous and Severe: 400, the connection closed, nothing reaches the backend
  (neither the request nor what was pipelined after it).

With ``http.strictness: lenient`` an Ambiguous request is forwarded and then
both connections are closed, unless the parser already refuses it (400).
Severe stays 400 there too.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from support_hostile import (
    ProxyProcess,
    RawClient,
    RecordingBackend,
    Request,
    exchange,
    get,
    wait_for,
)

from zdproxy.http.rules import HeadChecker

# vendored with their licence (tests/vectors/README.md), so every clone runs them
VECTORS = Path(__file__).resolve().parents[1] / "vectors" / "desync-guardian"

#: vectors of a tier that lets them through which zdproxy refuses: status and why
REFUSED: dict[tuple[str, str], tuple[int, str]] = {
    **{
        ("acceptable", name): (400, "header name that is not a token (zdproxy is stricter)")
        for name in (
            "No TE/CL headers, some others are non-compliant",
            "TE and some others are non-compliant",
            "A non-essential header with a non-printable character (x01)",
            "CL and some others are non-compliant",
        )
    },
    **{
        ("bad-header-characters", name): (400, "header name that is not a token")
        for name in ("Some-Header\\x01", "\\x01Some-Header")
    },
    **{
        ("bad-header-characters", name): (400, "llhttp refuses control bytes in values")
        for name in ("Some-Header: \\x01value", "Some-Header: value\\x01")
    },
    ("acceptable", "Unknown but OK HTTP/1.2"): (505, "a version zdproxy does not speak"),
    ("more-compliant-tests", "TE with custom parameters OK"): (
        400,
        "llhttp refuses parameters on chunked",
    ),
    ("rfc-compliant", "Transfer-Encoding with a param: chunked;custom_param"): (
        400,
        "llhttp refuses parameters on chunked",
    ),
    ("rfc-compliant", "International in URI"): (400, "llhttp refuses raw non-ASCII targets"),
    ("rfc-compliant", "Empty URI"): (400, "no request target at all"),
}


@dataclass(frozen=True)
class Vector:
    index: int
    file: str
    name: str
    method: bytes
    uri: bytes
    version: bytes
    headers: list[tuple[bytes, bytes]]
    tier: str

    @property
    def key(self) -> tuple[str, str]:
        return (self.file, self.name)


def _bytes(text: str) -> bytes:
    try:
        return text.encode("latin-1")
    except UnicodeEncodeError:
        return text.encode("utf-8")


def _load() -> list[Vector]:
    vectors: list[Vector] = []
    for path in sorted(VECTORS.glob("*.yaml")):
        entries: list[dict[str, Any]] = yaml.load(path.read_text("utf-8"), Loader=yaml.BaseLoader)
        for entry in entries:
            vectors.append(
                Vector(
                    index=len(vectors),
                    file=path.stem,
                    name=entry["name"],
                    method=_bytes(entry["method"]),
                    uri=_bytes(entry["uri"]),
                    version=_bytes(entry["version"]),
                    headers=[
                        (_bytes(h["name"]), _bytes(h["value"])) for h in entry["headers"] or []
                    ],
                    tier=entry["expected"]["tier"],
                )
            )
    return vectors


VECTOR_LIST = _load()


def _id(vector: Vector) -> str:
    return f"{vector.index:03d}-{vector.file}:{vector.name}"


def build(vector: Vector) -> tuple[bytes, bytes]:
    """(head, body) on the wire; the body follows the framing a strict parser reads."""
    line = vector.method + b" " + vector.uri
    if vector.version:
        line += b" " + vector.version
    head = [line + b"\r\n"]
    for name, value in vector.headers:
        head.append(name + b": " + value + b"\r\n")
    if not any(name.strip().lower() == b"host" for name, _ in vector.headers):
        head.append(b"Host: conformance.test\r\n")
    head.append(b"X-Vector: %d\r\n\r\n" % vector.index)
    checker = HeadChecker()
    for name, value in vector.headers:
        checker.header(name, value)
    checker.verdict(vector.method, vector.uri, vector.version)
    if checker.chunked:
        body = b"5\r\nhello\r\n0\r\n\r\n"
    elif checker.content_length:
        body = b"v" * checker.content_length
    else:
        body = b""
    return b"".join(head), body


def expected_body_length(body: bytes) -> int:
    return 5 if body.endswith(b"0\r\n\r\n") and body.startswith(b"5\r\n") else len(body)


@pytest.fixture(scope="module")
def backend() -> Iterator[RecordingBackend]:
    server = RecordingBackend().start()
    yield server
    server.stop()


def _proxy(
    backend: RecordingBackend, factory: pytest.TempPathFactory, strictness: str
) -> Iterator[ProxyProcess]:
    process = ProxyProcess(
        factory.mktemp(f"conformance-{strictness}"),
        [backend.port],
        {"http": {"strictness": strictness}},
    ).start()
    yield process
    assert process.stop() == 0, process.log()


@pytest.fixture(scope="module")
def strict(
    backend: RecordingBackend, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ProxyProcess]:
    yield from _proxy(backend, tmp_path_factory, "strict")


@pytest.fixture(scope="module")
def lenient(
    backend: RecordingBackend, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ProxyProcess]:
    yield from _proxy(backend, tmp_path_factory, "lenient")


def settle(proxy: ProxyProcess, backend: RecordingBackend) -> None:
    count = len(backend.snapshot()[0])
    response, client = exchange(proxy.port, get("/barrier"))
    client.close()
    assert response.status == 200
    backend.wait_requests(count + 1)


def _from_case(requests: list[Request]) -> list[Request]:
    return [r for r in requests if r.target != b"/barrier"]


#: per tier: how many vectors were forwarded and refused through the strict proxy
#: vector index -> "forwarded" / "refused", as the per-vector tests found it; the
#: tally test runs whatever was not run yet, so it holds when run alone too
STRICT_OUTCOME: dict[int, str] = {}
LENIENT_OUTCOME: dict[int, str] = {}


@dataclass
class Sent:
    vector: Vector
    body: bytes
    follow: bytes
    mark: tuple[int, int, int]
    status: int
    error: bytes | None
    reply: bytes
    closed: bool


def send(
    proxy: ProxyProcess, backend: RecordingBackend, vector: Vector, *, keep_alive: bool
) -> Sent:
    """Send the vector with a pipelined request after it: a follow-up when the
    connection is expected to stay open, else a smuggling attempt."""
    head, body = build(vector)
    mark = backend.mark()
    follow = (b"/follow-vector-%d" if keep_alive else b"/smuggled-vector-%d") % vector.index
    with RawClient(proxy.port) as client:
        client.send(head + body + get(follow.decode()))
        response = client.read_response(vector.method)
        if keep_alive and response.status == 200:
            assert client.read_response().status == 200
            closed = False
        else:
            closed = client.closed_by_peer()
    settle(proxy, backend)
    return Sent(
        vector,
        body,
        follow,
        mark,
        response.status,
        response.header(b"x-zdproxy-error"),
        response.body,
        closed,
    )


def verify_refused(backend: RecordingBackend, sent: Sent, status: int) -> None:
    """``status`` with X-Zdproxy-Error, the connection closed, nothing forwarded."""
    assert (sent.status, sent.closed) == (status, True), sent
    assert sent.error is not None
    requests, malformed, conns = backend.since(sent.mark)
    assert malformed == []
    assert _from_case(requests) == [], "a refused request reached the backend"
    marker = b"X-Vector: %d\r\n" % sent.vector.index
    for conn in conns:
        assert sent.follow not in conn.raw
        assert marker not in conn.raw, "part of a refused request reached the backend"


def verify_forwarded(backend: RecordingBackend, sent: Sent, *, closes: bool) -> Request:
    """Forwarded whole; then the pipelined request too, or (``closes``) the
    connection closed and what followed was never forwarded."""
    assert (sent.status, sent.closed) == (200, closes), sent
    assert sent.error is None
    if sent.vector.method != b"HEAD":
        assert sent.reply == b"ok %d" % expected_body_length(sent.body)
    requests, malformed, _ = backend.since(sent.mark)
    assert malformed == []
    mine = _from_case(requests)
    assert [r.target for r in mine] == [sent.vector.uri] + ([] if closes else [sent.follow])
    seen = mine[0]
    assert len(seen.body) == expected_body_length(sent.body)
    if sent.vector.version:
        assert seen.header(b"x-vector") == b"%d" % sent.vector.index
    return seen


def test_vectors_loaded() -> None:
    assert len(VECTOR_LIST) >= 112
    for key in REFUSED:
        assert any(v.key == key for v in VECTOR_LIST), f"stale entry {key}"


@pytest.mark.parametrize("vector", VECTOR_LIST, ids=_id)
def test_strict(vector: Vector, strict: ProxyProcess, backend: RecordingBackend) -> None:
    STRICT_OUTCOME[vector.index] = run_strict(vector, strict, backend)


def run_strict(vector: Vector, strict: ProxyProcess, backend: RecordingBackend) -> str:
    refused = REFUSED.get(vector.key)
    if vector.tier in ("Ambiguous", "Severe") or refused is not None:
        sent = send(strict, backend, vector, keep_alive=False)
        verify_refused(backend, sent, 400 if refused is None else refused[0])
        outcome = "refused"
    else:
        # HTTP/1.0 and 0.9 requests close after their response
        keep_alive = vector.version == b"HTTP/1.1"
        sent = send(strict, backend, vector, keep_alive=keep_alive)
        verify_forwarded(backend, sent, closes=not keep_alive)
        outcome = "forwarded"
    assert strict.alive()
    return outcome


LENIENT_VECTORS = [v for v in VECTOR_LIST if v.tier in ("Ambiguous", "Severe")]


@pytest.mark.parametrize("vector", LENIENT_VECTORS, ids=_id)
def test_lenient(vector: Vector, lenient: ProxyProcess, backend: RecordingBackend) -> None:
    LENIENT_OUTCOME[vector.index] = run_lenient(vector, lenient, backend)


def run_lenient(vector: Vector, lenient: ProxyProcess, backend: RecordingBackend) -> str:
    sent = send(lenient, backend, vector, keep_alive=False)
    if vector.tier == "Severe" or sent.status != 200:
        # Severe is refused whatever the setting; so is what the parser refuses
        verify_refused(backend, sent, 400)
        return "refused"
    seen = verify_forwarded(backend, sent, closes=True)
    # the upstream connection that carried it is closed too, never reused
    conn = next(c for c in backend.snapshot()[2] if c.conn_id == seen.conn_id)
    wait_for(lambda: conn.closed, 5, "the upstream connection to close")
    assert lenient.alive()
    return "forwarded"


def test_tally(strict: ProxyProcess, lenient: ProxyProcess, backend: RecordingBackend) -> None:
    """The counts per tier that docs/http.md (Hostile and broken HTTP) gives; vectors the
    parametrized tests did not run (a -k selection, a lone run) are run here."""
    tally: dict[str, dict[str, int]] = {}
    for vector in VECTOR_LIST:
        if vector.index not in STRICT_OUTCOME:
            STRICT_OUTCOME[vector.index] = run_strict(vector, strict, backend)
        counts = tally.setdefault(vector.tier, {})
        outcome = STRICT_OUTCOME[vector.index]
        counts[outcome] = counts.get(outcome, 0) + 1
    assert tally == {
        "Compliant": {"forwarded": 20, "refused": 4},
        "Acceptable": {"forwarded": 4, "refused": 9},
        "Ambiguous": {"refused": 41},
        "Severe": {"refused": 34},
    }
    # lenient: Ambiguous forwarded (both connections then closed) unless llhttp refuses
    lenient_tally = {"forwarded": 0, "refused": 0}
    for vector in LENIENT_VECTORS:
        if vector.index not in LENIENT_OUTCOME:
            LENIENT_OUTCOME[vector.index] = run_lenient(vector, lenient, backend)
        if vector.tier == "Ambiguous":
            lenient_tally[LENIENT_OUTCOME[vector.index]] += 1
    assert lenient_tally == {"forwarded": 13, "refused": 28}
