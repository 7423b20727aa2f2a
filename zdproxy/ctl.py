"""``zdproxy ctl``: the admin API from the command line (stdlib only: urllib).

Reads ``ZDPROXY_ADMIN_URL`` (default http://127.0.0.1:9901) and
``ZDPROXY_ADMIN_TOKEN``. Exit status: 0 on success, 1 on any API or connection
error (with the API's message on stderr), 2 on a usage error.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Sequence
from typing import Any, TextIO

DEFAULT_URL = "http://127.0.0.1:9901"
TIMEOUT = 10.0


class CtlError(Exception):
    """An API or connection error: exit status 1."""


class UsageError(CtlError):
    """The command line itself is wrong (a value argparse cannot check): exit status 2."""


class Client:
    def __init__(self, url: str, token: str | None, timeout: float = TIMEOUT) -> None:
        self.url = url.rstrip("/")
        self.token = token
        self.timeout = timeout

    def call(self, method: str, path: str, body: Any = None) -> Any:
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(self.url + path, data=data, method=method)
        if data is not None:
            request.add_header("Content-Type", "application/json")
        if self.token:
            request.add_header("Authorization", f"Bearer {self.token}")
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                raw = response.read()
        except urllib.error.HTTPError as exc:
            raise CtlError(self._error_message(exc)) from None
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise CtlError(f"cannot reach the admin API at {self.url}: {reason}") from None
        try:
            return json.loads(raw)
        except ValueError:
            raise CtlError(f"{method} {path}: the answer is not JSON") from None

    def _error_message(self, exc: urllib.error.HTTPError) -> str:
        try:
            message = json.loads(exc.read()).get("error") or exc.reason
        except (ValueError, AttributeError, OSError):
            message = exc.reason
        text = f"{exc.code}: {message}"
        if exc.code == 401 and not self.token:
            text += " (set ZDPROXY_ADMIN_TOKEN)"
        return text


# ---- output -------------------------------------------------------------------


def table(rows: Sequence[Sequence[object]], out: TextIO) -> None:
    cells = [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(cells[0]))]
    for row in cells:
        out.write("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() + "\n")


def print_status(state: dict[str, Any], out: TextIO) -> None:
    out.write(f"zdproxy {state.get('version')} (pid {state.get('pid')})\n\n")
    pools = state.get("pools", {})
    rows: list[list[object]] = [["POOL", "WEIGHT", "USABLE", "BACKENDS"]]
    for name, pool in pools.items():
        usable = "yes" if pool.get("usable") else "NO" if pool["weight"] else "no"
        rows.append([name, f"{pool['weight']}%", usable, len(pool["backends"])])
    table(rows, out)
    out.write("\n")
    rows = [["BACKEND", "POOL", "ADDRESS", "STATE", "IN-FLIGHT", "WEIGHT", "NOTE"]]
    for pool in pools.values():
        for b in pool["backends"]:
            notes = []
            if b.get("removing"):
                notes.append("removing")
            if b.get("ejected"):
                notes.append("ejected")
            if b.get("added"):
                notes.append("added via API")
            weight = b["weight"]
            effective = b.get("effective_weight", weight)
            shown = f"{effective}/{weight}" if effective != weight else str(weight)
            rows.append(
                [
                    b["id"],
                    b["pool"],
                    b["address"],
                    b["state"],
                    b["in_flight"],
                    shown,
                    ", ".join(notes),
                ]
            )
    if len(rows) > 1:
        table(rows, out)
    else:
        out.write("no backends\n")
    rollout = state.get("rollout")
    if rollout:
        out.write(f"\nrollout: {json.dumps(rollout)}\n")
    persistence = state.get("persistence") or {}
    if persistence.get("last_error"):
        out.write(f"\nwarning: {persistence['last_error']}\n")


def _weights(result: dict[str, Any]) -> str:
    return " ".join(f"{k}={v}" for k, v in result["weights"].items())


def _brief(value: Any) -> str:
    if isinstance(value, dict):
        if set(value) >= {"admin", "state"} and "pool" in value:
            return str(value["state"])
        return " ".join(f"{k}={v}" for k, v in value.items())
    return "-" if value is None else str(value)


def print_events(events: list[dict[str, Any]], out: TextIO) -> None:
    if not events:
        out.write("no events\n")
        return
    rows: list[list[object]] = [["ID", "TIME", "ACTOR", "ACTION", "TARGET", "CHANGE"]]
    for e in events:
        change = f"{_brief(e.get('before'))} -> {_brief(e.get('after'))}"
        if e.get("note"):
            change += f" ({e['note']})"
        rows.append([e["id"], e["time"], e["actor"], e["action"], e["target"], change])
    table(rows, out)


# ---- commands -------------------------------------------------------------------

Command = Callable[[Client, argparse.Namespace, TextIO], Any]


def cmd_status(client: Client, args: argparse.Namespace, out: TextIO) -> Any:
    state = client.call("GET", "/api/v1/state")
    if not args.json:
        print_status(state, out)
    return state


def parse_split(items: Sequence[str]) -> dict[str, int]:
    weights: dict[str, int] = {}
    for item in items:
        name, sep, value = item.partition("=")
        value = value.strip().rstrip("%")
        if not sep or not name or not value.isdigit():
            raise UsageError(f"expected POOL=PERCENT, got {item!r}")
        if name in weights:
            raise UsageError(f"pool {name!r} given twice")
        weights[name] = int(value)
    return weights


def cmd_split(client: Client, args: argparse.Namespace, out: TextIO) -> Any:
    body: dict[str, Any] = dict(parse_split(args.weights))
    if args.force:
        body["force"] = True
    result = client.call("PUT", "/api/v1/split", body)
    if not args.json:
        out.write(
            f"split: {_weights(result)}" + ("" if result["changed"] else " (no change)") + "\n"
        )
    return result


def cmd_flip(client: Client, args: argparse.Namespace, out: TextIO) -> Any:
    body: dict[str, Any] = {"to": args.pool}
    if args.force:
        body["force"] = True
    result = client.call("POST", "/api/v1/flip", body)
    if not args.json:
        tail = "" if result["changed"] else " (no change)"
        out.write(f"flip: {args.pool} takes all new traffic ({_weights(result)}){tail}\n")
    return result


def _backend_command(action: str) -> Command:
    def run(client: Client, args: argparse.Namespace, out: TextIO) -> Any:
        path = f"/api/v1/backends/{urllib.parse.quote(args.id, safe='')}/{action}"
        result = client.call("POST", path)
        if not args.json:
            b = result["backend"]
            tail = "" if result["changed"] else " (no change)"
            out.write(f"{b['id']}: {b['state']}{tail}\n")
        return result

    return run


def cmd_add(client: Client, args: argparse.Namespace, out: TextIO) -> Any:
    body: dict[str, Any] = {"pool": args.pool, "address": args.address}
    if args.id is not None:
        body["id"] = args.id
    if args.weight is not None:
        body["weight"] = args.weight
    result = client.call("POST", "/api/v1/backends", body)
    if not args.json:
        b = result["backend"]
        out.write(f"added {b['id']} ({b['address']}) to pool {b['pool']}: {b['state']}\n")
    return result


def cmd_remove(client: Client, args: argparse.Namespace, out: TextIO) -> Any:
    result = client.call("DELETE", f"/api/v1/backends/{urllib.parse.quote(args.id, safe='')}")
    if not args.json:
        b = result["backend"]
        if result["removed"]:
            out.write(f"{b['id']}: removed\n")
        else:
            out.write(
                f"{b['id']}: draining {b['in_flight']} in-flight request(s), removed when "
                "they finish (or at the drain timeout)\n"
            )
    return result


def cmd_events(client: Client, args: argparse.Namespace, out: TextIO) -> Any:
    query = f"?limit={args.limit}" if args.limit else ""
    result = client.call("GET", f"/api/v1/events{query}")
    if not args.json:
        print_events(result["events"], out)
    return result


def cmd_rollout(client: Client, args: argparse.Namespace, out: TextIO) -> Any:
    raise CtlError("rollouts are not available yet")


# ---- parser -------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--json", action="store_true", default=argparse.SUPPRESS, help="print the raw API answer"
    )
    parser = argparse.ArgumentParser(
        prog="zdproxy ctl",
        description="Drive a running zdproxy through its admin API.",
        epilog="Environment: ZDPROXY_ADMIN_URL (default http://127.0.0.1:9901), "
        "ZDPROXY_ADMIN_TOKEN.",
        parents=[common],
    )
    parser.add_argument("--url", help="admin API URL (default: $ZDPROXY_ADMIN_URL)")
    parser.add_argument("--token", help="admin token (default: $ZDPROXY_ADMIN_TOKEN)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    def add(name: str, func: Command, help: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, description=help, parents=[common])
        p.set_defaults(func=func)
        return p

    add("status", cmd_status, "pools, weights, backends, states and in-flight requests")
    p = add("split", cmd_split, "set the traffic split, e.g. split blue=90 green=10")
    p.add_argument("weights", nargs="+", metavar="POOL=PCT")
    p.add_argument("--force", action="store_true", help="even to a pool with no usable backend")
    p = add("flip", cmd_flip, "send all new traffic to POOL at once")
    p.add_argument("pool", metavar="POOL")
    p.add_argument("--force", action="store_true", help="even if POOL has no usable backend")
    for action, text in (
        ("drain", "no new requests; in-flight ones finish"),
        ("disable", "out of rotation at once"),
        ("enable", "back into rotation after health checks pass"),
    ):
        p = add(action, _backend_command(action), f"{text} (BACKEND_ID)")
        p.add_argument("id", metavar="BACKEND_ID")
    p = add("add", cmd_add, "add a backend to a pool")
    p.add_argument("pool", metavar="POOL")
    p.add_argument("address", metavar="HOST:PORT")
    p.add_argument("--id", help="backend id (default: POOL-N)")
    p.add_argument("--weight", type=int, help="relative weight in the pool (default 1)")
    p = add("remove", cmd_remove, "drain a backend, then remove it")
    p.add_argument("id", metavar="BACKEND_ID")
    p = add("events", cmd_events, "the audit log of changes")
    p.add_argument("--limit", type=int, default=50, help="the newest N (default 50)")
    p = add("rollout", cmd_rollout, "progressive rollouts (not available yet)")
    p.add_argument("action", choices=["start", "status", "pause", "resume", "promote", "abort"])
    p.add_argument("rest", nargs=argparse.REMAINDER)
    return parser


def main(argv: Sequence[str] | None = None, out: TextIO | None = None) -> int:
    out = out or sys.stdout
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:
        return int(exc.code or 0) if isinstance(exc.code, int | None) else 2
    if not hasattr(args, "json"):
        args.json = False
    url = args.url or os.environ.get("ZDPROXY_ADMIN_URL") or DEFAULT_URL
    token = args.token or os.environ.get("ZDPROXY_ADMIN_TOKEN") or None
    client = Client(url, token)
    try:
        result = args.func(client, args, out)
    except UsageError as exc:
        print(f"{parser.prog} {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except CtlError as exc:
        print(f"zdproxy ctl: {exc}", file=sys.stderr)
        return 1
    if args.json:
        out.write(json.dumps(result, indent=2) + "\n")
    return 0
