"""Routes: which service a request goes to, by host and path (pure, no I/O).

Precedence, stated the way nginx states ``server_name`` and ``location``:

Host, first the most specific host that has a route matching the rest of the
request:

1. the exact name (``shop.example.com``), compared case-insensitively, port
   and a trailing dot ignored;
2. the longest wildcard (``*.example.com`` matches ``a.example.com`` and
   ``a.b.example.com``, not ``example.com``; ``*.b.example.com`` beats it);
3. routes without ``host`` (any host, and requests without one).

When no route of the most specific host matches the path, method and
headers, the next less specific host is tried (unlike nginx, which never
leaves the chosen ``server``).

Path, inside one host:

1. ``path_exact`` (the path equals it);
2. ``path_regex``, in file order, the first that matches (searched, so anchor
   it with ``^`` to match from the start);
3. the longest ``path_prefix`` (plain byte prefix: ``/api`` also matches
   ``/apix``; write ``/api/`` for the directory);
4. routes without a path condition.

The path is the request target up to ``?``, as the client sent it (no
percent-decoding, no dot-segment removal). Among routes with the same host
and the same path condition, the first in the file whose ``methods`` and
``headers`` match wins. ``strip_prefix`` removes the matched ``path_prefix``
from the target forwarded to the backend (the query string stays; an empty
rest becomes ``/``).

Exact hosts and exact paths are dict lookups; prefixes are looked up by the
distinct prefix lengths of the host (longest first), so the cost of a match
does not grow with the number of hosts or routes.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Generic, TypeVar

T = TypeVar("T")

#: a request header by lower-case name (None: absent)
HeaderLookup = Callable[[bytes], bytes | None]


@dataclass(frozen=True, slots=True)
class RouteSpec(Generic[T]):
    """One configured route; ``target`` is what a match hands back (the service)."""

    index: int
    service: str
    target: T
    host: str | None = None
    path_exact: str | None = None
    path_prefix: str | None = None
    path_regex: str | None = None
    methods: frozenset[str] | None = None
    headers: tuple[tuple[str, str], ...] = ()
    strip_prefix: bool = False


@dataclass(slots=True)
class Route(Generic[T]):
    """A compiled route: what the data path reads."""

    index: int
    service: str
    target: T
    methods: frozenset[bytes] | None
    headers: tuple[tuple[bytes, bytes], ...]
    #: bytes to cut from the front of the target (0: nothing)
    strip: int


@dataclass(slots=True)
class _HostTable(Generic[T]):
    exact: dict[bytes, list[Route[T]]] = field(default_factory=dict)
    regex: list[tuple[re.Pattern[bytes], Route[T]]] = field(default_factory=list)
    prefix: dict[bytes, list[Route[T]]] = field(default_factory=dict)
    #: distinct prefix lengths, longest first
    lengths: tuple[int, ...] = ()
    anything: list[Route[T]] = field(default_factory=list)

    def match(
        self, path: bytes, method: bytes, headers: HeaderLookup
    ) -> tuple[Route[T], int] | None:
        """The winning route and the length of the matched prefix (0: none)."""
        routes = self.exact.get(path)
        if routes is not None:
            found = _first(routes, method, headers)
            if found is not None:
                return found, 0
        for pattern, route in self.regex:
            if pattern.search(path) is not None and _conditions(route, method, headers):
                return route, 0
        prefixes = self.prefix
        for length in self.lengths:
            routes = prefixes.get(path[:length])
            if routes is not None:
                found = _first(routes, method, headers)
                if found is not None:
                    return found, length
        found = _first(self.anything, method, headers)
        return (found, 0) if found is not None else None


def _conditions(route: Route[T], method: bytes, headers: HeaderLookup) -> bool:
    if route.methods is not None and method not in route.methods:
        return False
    return all(headers(name) == value for name, value in route.headers)


def _first(routes: list[Route[T]], method: bytes, headers: HeaderLookup) -> Route[T] | None:
    for route in routes:
        if route.methods is None and not route.headers:
            return route
        if _conditions(route, method, headers):
            return route
    return None


@dataclass(frozen=True, slots=True)
class Match(Generic[T]):
    route: Route[T]
    #: the request target to forward (``strip_prefix`` applied)
    target: bytes


def normalize_host(host: bytes) -> bytes:
    """``Shop.Example.COM:8080`` -> ``shop.example.com``; ``[::1]:80`` -> ``[::1]``."""
    host = host.strip(b" \t").lower()
    if host.startswith(b"["):
        end = host.find(b"]")
        return host[: end + 1] if end >= 0 else host
    colon = host.find(b":")
    if colon >= 0:
        host = host[:colon]
    return host[:-1] if host.endswith(b".") else host


class RouteTable(Generic[T]):
    """Routes compiled for lookup; build a new one to change them (immutable)."""

    def __init__(self, specs: Iterable[RouteSpec[T]], default: T | None = None) -> None:
        self.default = default
        self._exact: dict[bytes, _HostTable[T]] = {}
        #: ``*.example.com`` by its suffix ``.example.com``
        self._wild: dict[bytes, _HostTable[T]] = {}
        self._any: _HostTable[T] = _HostTable()
        for spec in specs:
            self._add(spec)
        for table in (*self._exact.values(), *self._wild.values(), self._any):
            table.lengths = tuple(sorted({len(p) for p in table.prefix}, reverse=True))
        self._has_wild = bool(self._wild)

    def _table(self, host: str | None) -> _HostTable[T]:
        if host is None:
            return self._any
        key = normalize_host(host.encode("ascii"))
        tables = self._exact
        if key.startswith(b"*."):
            key, tables = key[1:], self._wild
        table = tables.get(key)
        if table is None:
            table = tables[key] = _HostTable()
        return table

    def _add(self, spec: RouteSpec[T]) -> None:
        route = Route(
            spec.index,
            spec.service,
            spec.target,
            None if spec.methods is None else frozenset(m.encode() for m in spec.methods),
            tuple((n.lower().encode("latin-1"), v.encode("latin-1")) for n, v in spec.headers),
            len(spec.path_prefix) if spec.strip_prefix and spec.path_prefix else 0,
        )
        table = self._table(spec.host)
        if spec.path_exact is not None:
            table.exact.setdefault(spec.path_exact.encode("latin-1"), []).append(route)
        elif spec.path_regex is not None:
            table.regex.append((re.compile(spec.path_regex.encode("latin-1")), route))
        elif spec.path_prefix is not None:
            table.prefix.setdefault(spec.path_prefix.encode("latin-1"), []).append(route)
        else:
            table.anything.append(route)

    def _host_tables(self, host: bytes | None) -> Iterable[_HostTable[T]]:
        if host is not None:
            name = normalize_host(host)
            table = self._exact.get(name)
            if table is not None:
                yield table
            if self._has_wild:
                wild = self._wild
                dot = name.find(b".")
                while dot >= 0:
                    table = wild.get(name[dot:])
                    if table is not None:
                        yield table
                    dot = name.find(b".", dot + 1)
        yield self._any

    def match(
        self, host: bytes | None, target: bytes, method: bytes, headers: HeaderLookup
    ) -> Match[T] | None:
        """The route for a request (None: no route matches)."""
        query = target.find(b"?")
        path = target if query < 0 else target[:query]
        for table in self._host_tables(host):
            found = table.match(path, method, headers)
            if found is not None:
                route, _ = found
                return Match(route, strip(target, route.strip) if route.strip else target)
        return None


def strip(target: bytes, length: int) -> bytes:
    """``target`` without its first ``length`` bytes, still starting with ``/``."""
    rest = target[length:]
    if rest[:1] == b"/":
        return rest
    return b"/" + rest


# ---- shadowed routes (for ``zdproxy check``) -------------------------------------


def _path_key(spec: RouteSpec[T]) -> tuple[str, str | None]:
    if spec.path_exact is not None:
        return ("exact", spec.path_exact)
    if spec.path_regex is not None:
        return ("regex", spec.path_regex)
    if spec.path_prefix is not None:
        return ("prefix", spec.path_prefix)
    return ("any", None)


def _host_key(host: str | None) -> str | None:
    return None if host is None else normalize_host(host.encode("utf-8")).decode("utf-8")


def shadowed(specs: Sequence[RouteSpec[T]]) -> list[tuple[int, int]]:
    """(later, earlier) index pairs: route ``later`` can never match because
    ``earlier`` has the same host and path condition and takes every request
    ``later`` would (its methods include them, its headers are a subset)."""
    out: list[tuple[int, int]] = []
    seen: dict[tuple[str | None, tuple[str, str | None]], list[RouteSpec[T]]] = {}
    for spec in specs:
        key = (_host_key(spec.host), _path_key(spec))
        earlier = seen.setdefault(key, [])
        for other in earlier:
            if _covers(other, spec):
                out.append((spec.index, other.index))
                break
        earlier.append(spec)
    return out


def _covers(first: RouteSpec[T], later: RouteSpec[T]) -> bool:
    if first.methods is not None and (later.methods is None or not later.methods <= first.methods):
        return False
    return set(first.headers) <= set(later.headers)
