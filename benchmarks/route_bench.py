#!/usr/bin/env python3
"""Route matching cost (a benchmark, not a test): ``python benchmarks/route_bench.py``.

Builds the route table the data path uses (``zdproxy.http.routes``) with N hosts
of 20 path prefixes each (plus a ``*.example.com`` wildcard and a catch-all), and
times ``RouteTable.match`` per request for a mix of targets: an exact host with a
long and a short prefix, a wildcard host, an unknown host falling to the
catch-all, and a query string. Run with 10 and 1,000 hosts (and more with
``--hosts``): the cost must stay flat in the number of routes (dict lookups by
host, by prefix length), and well under the 2 us target.

The machine is shared: read orders of magnitude, not the last digit.
"""

from __future__ import annotations

import argparse
import sys
import time
import timeit
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from zdproxy.http.routes import RouteSpec, RouteTable  # noqa: E402

PREFIXES = 20


def build(hosts: int) -> RouteTable[str]:
    specs: list[RouteSpec[str]] = []
    for h in range(hosts):
        for p in range(PREFIXES):
            # prefixes of different lengths: the lookup walks the distinct lengths
            specs.append(
                RouteSpec(
                    index=len(specs),
                    service=f"svc{h}",
                    target=f"svc{h}",
                    host=f"app{h}.example.org",
                    path_prefix=f"/api/v{p}/" + "x" * (p % 5),
                )
            )
    specs.append(RouteSpec(len(specs), "wild", "wild", host="*.example.com", path_prefix="/"))
    specs.append(RouteSpec(len(specs), "any", "any"))
    return RouteTable(specs)


def requests(hosts: int) -> list[tuple[bytes, bytes]]:
    last = hosts - 1
    return [
        (b"app%d.example.org" % last, b"/api/v19/xxxx/users/42"),
        (b"APP0.example.org:8080", b"/api/v3/xxx/items?page=2&sort=name"),
        (b"app%d.example.org" % (last // 2), b"/static/logo.png"),
        (b"tenant.eu.example.com", b"/dashboard"),
        (b"unknown.example.net", b"/"),
    ]


def no_headers(name: bytes) -> bytes | None:
    return None


def measure(hosts: int, number: int) -> float:
    """Nanoseconds per match, best of 5 runs over the request mix."""
    table = build(hosts)
    mix = requests(hosts)
    for host, target in mix:
        assert table.match(host, target, b"GET", no_headers) is not None

    def run() -> None:
        match = table.match
        for host, target in mix:
            match(host, target, b"GET", no_headers)

    # CPU time of this thread: time the other processes of a busy machine take is
    # left out (wall time on a shared 2-core machine varies by 2x and more)
    best = min(timeit.repeat(run, number=number, repeat=5, timer=time.thread_time))
    return best / (number * len(mix)) * 1e9


def per_request(hosts: int, number: int) -> list[tuple[bytes, bytes, float]]:
    """Nanoseconds per match of each request of the mix."""
    table = build(hosts)
    out = []
    for host, target in requests(hosts):

        def run(host: bytes = host, target: bytes = target) -> None:
            table.match(host, target, b"GET", no_headers)

        best = min(timeit.repeat(run, number=number, repeat=5, timer=time.thread_time))
        out.append((host, target, best / number * 1e9))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hosts", type=int, nargs="*", default=[10, 1000, 10000])
    parser.add_argument("--number", type=int, default=20000)
    args = parser.parse_args()
    print(f"{'hosts':>7} {'routes':>8} {'ns/match':>9}")
    for hosts in args.hosts:
        ns = measure(hosts, args.number)
        print(f"{hosts:>7} {hosts * PREFIXES + 2:>8} {ns:>9.0f}")
    print(f"\nper request, {args.hosts[-1]} hosts (ns, including the call):")
    for host, target, ns in per_request(args.hosts[-1], args.number):
        print(f"{ns:>7.0f}  {host.decode()} {target.decode()}")


if __name__ == "__main__":
    main()
