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

Exact hosts and exact paths are dict lookups; the longest prefix is found by
bisection in the host's sorted prefixes, then a walk up the chain of shorter
prefixes (the greatest prefix <= the path starts with every prefix of the
path). The cost of a match does not grow with the number of hosts, and only
logarithmically with the prefixes of one host.
"""

from __future__ import annotations

import re
from bisect import bisect_right
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
    #: no method or header condition: the first candidate wins at once
    plain: bool = False


@dataclass(slots=True)
class _HostTable(Generic[T]):
    exact: dict[bytes, list[Route[T]]] = field(default_factory=dict)
    regex: list[tuple[re.Pattern[bytes], Route[T]]] = field(default_factory=list)
    prefix: dict[bytes, list[Route[T]]] = field(default_factory=dict)
    #: the prefixes, sorted, and each one's longest proper prefix in the table
    ordered: list[bytes] = field(default_factory=list)
    parents: dict[bytes, bytes | None] = field(default_factory=dict)
    anything: list[Route[T]] = field(default_factory=list)

    def match(self, path: bytes, method: bytes, headers: HeaderLookup) -> Route[T] | None:
        """The winning route of this host, by path precedence."""
        if self.exact:
            routes = self.exact.get(path)
            if routes is not None:
                found = routes[0] if routes[0].plain else _first(routes, method, headers)
                if found is not None:
                    return found
        for pattern, route in self.regex:
            if pattern.search(path) is not None and _conditions(route, method, headers):
                return route
        ordered = self.ordered
        if ordered:
            # the greatest prefix <= path starts with every prefix of path in the
            # table: walk its chain of ever shorter prefixes, longest first
            i = bisect_right(ordered, path)
            candidate = ordered[i - 1] if i else None
            parents = self.parents
            while candidate is not None:
                if path.startswith(candidate):
                    routes = self.prefix[candidate]
                    found = routes[0] if routes[0].plain else _first(routes, method, headers)
                    if found is not None:
                        return found
                candidate = parents[candidate]
        return _first(self.anything, method, headers) if self.anything else None

    def seal(self) -> None:
        """Sort the prefixes and link each to its longest proper prefix."""
        self.ordered = sorted(self.prefix)
        for prefix in self.ordered:
            self.parents[prefix] = next(
                (prefix[:n] for n in range(len(prefix) - 1, 0, -1) if prefix[:n] in self.prefix),
                None,
            )


def _conditions(route: Route[T], method: bytes, headers: HeaderLookup) -> bool:
    if route.methods is not None and method not in route.methods:
        return False
    return all(headers(name) == value for name, value in route.headers)


def _first(routes: list[Route[T]], method: bytes, headers: HeaderLookup) -> Route[T] | None:
    if routes[0].plain:
        return routes[0]
    for route in routes:
        if route.plain or _conditions(route, method, headers):
            return route
    return None


def normalize_host(host: bytes) -> bytes:
    """``Shop.Example.COM:8080`` -> ``shop.example.com``; ``[::1]:80`` -> ``[::1]``."""
    host = host.lower()
    if host[:1] == b"[":
        end = host.find(b"]")
        return host[: end + 1] if end >= 0 else host
    colon = host.find(b":")
    if colon >= 0:
        host = host[:colon]
    if host[-1:] in _TRIM or host[:1] in _TRIM:
        host = host.strip(b" \t").rstrip(b".")
    return host


#: what may end a Host value besides the name (rare: trimmed on a slow path)
_TRIM = frozenset((b".", b" ", b"\t"))


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
            table.seal()
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
            spec.methods is None and not spec.headers,
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

    def match(
        self, host: bytes | None, target: bytes, method: bytes, headers: HeaderLookup
    ) -> Route[T] | None:
        """The route for a request (None: no route matches). The target to forward
        is ``forwarded(target, route)``."""
        query = target.find(b"?")
        path = target if query < 0 else target[:query]
        if host is not None:
            name = normalize_host(host)
            table = self._exact.get(name)
            if table is not None:
                found = table.match(path, method, headers)
                if found is not None:
                    return found
            if self._has_wild:
                # longest wildcard first: the suffixes from the first dot on
                wild = self._wild
                dot = name.find(b".")
                while dot >= 0:
                    table = wild.get(name[dot:])
                    if table is not None:
                        found = table.match(path, method, headers)
                        if found is not None:
                            return found
                    dot = name.find(b".", dot + 1)
        return self._any.match(path, method, headers)


def forwarded(target: bytes, route: Route[T]) -> bytes:
    """The request target sent to the backend: ``strip_prefix`` applied, else
    ``target`` itself."""
    return strip(target, route.strip) if route.strip else target


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
