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


#: endpoints of the whole process, never of one service
_PROCESS_WIDE = ("/api/v1/reload", "/api/v1/shadow", "/api/v1/services")


class Client:
    def __init__(
        self, url: str, token: str | None, timeout: float = TIMEOUT, service: str | None = None
    ) -> None:
        self.url = url.rstrip("/")
        self.token = token
        self.timeout = timeout
        #: ``--service``: a service's endpoints are under /api/v1/services/SERVICE/
        self.service = service

    def call(self, method: str, path: str, body: Any = None) -> Any:
        if self.service is not None and not path.startswith(_PROCESS_WIDE):
            quoted = urllib.parse.quote(self.service, safe="")
            path = f"/api/v1/services/{quoted}{path.removeprefix('/api/v1')}"
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
        problems: list[str] = []
        try:
            answer = json.loads(exc.read())
            message = answer.get("error") or exc.reason
            # an invalid config on reload: the `zdproxy check` lines, one per problem
            problems = [str(line) for line in answer.get("problems") or ()]
        except (ValueError, AttributeError, OSError, TypeError):
            message = exc.reason
        text = f"{exc.code}: {message}"
        if problems:
            text += "".join(f"\n{line}" for line in problems)
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
    etcd = persistence.get("etcd")
    if etcd:
        link = "connected" if etcd.get("connected") else f"UNREACHABLE ({etcd.get('error')})"
        lead = ", rollout leader" if etcd.get("leader") else ""
        out.write(f"\netcd: {link}{lead}; instance {etcd.get('instance')}\n")


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
    weights = parse_split(args.weights)
    body: dict[str, Any] = dict(weights)
    if "force" in weights or "weights" in weights:
        # a pool named so: the nested form keeps the pools apart from the flag
        body = {"weights": weights}
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


def parse_steps(text: str) -> list[dict[str, Any]]:
    """``10:30s,50:60s,100`` -> steps; a step without ``:PAUSE`` waits for promote."""
    steps: list[dict[str, Any]] = []
    for item in text.split(","):
        weight, sep, pause = item.strip().partition(":")
        weight = weight.strip().rstrip("%")
        if not weight.isdigit() or (sep and not pause.strip()):
            raise UsageError(
                f"--steps: expected WEIGHT[:PAUSE],... e.g. 10:30s,50:60s,100; got {item!r}"
            )
        step: dict[str, Any] = {"weight": int(weight)}
        if sep:
            step["pause"] = pause.strip()
        steps.append(step)
    return steps


def rollout_plan(args: argparse.Namespace) -> dict[str, Any]:
    if args.plan is not None:
        if args.to is not None or args.steps is not None:
            raise UsageError("--plan FILE replaces --to and --steps: give one or the other")
        try:
            with open(args.plan, encoding="utf-8") as f:
                plan = json.load(f)
        except OSError as exc:
            raise UsageError(f"--plan: cannot read {args.plan}: {exc.strerror}") from None
        except ValueError as exc:
            raise UsageError(f"--plan: {args.plan} is not valid JSON: {exc}") from None
        if not isinstance(plan, dict):
            raise UsageError(f"--plan: {args.plan} must hold a JSON object")
        return plan
    if args.to is None or args.steps is None:
        raise UsageError("rollout start needs --to POOL and --steps (or --plan FILE)")
    plan = {"to": args.to, "steps": parse_steps(args.steps)}
    if args.baseline is not None:
        plan["from"] = args.baseline
    analysis: dict[str, Any] = {}
    for key, value in (
        ("interval", args.interval),
        ("min_requests", args.min_requests),
        ("max_error_rate", args.max_error_rate),
        ("max_p99_latency", args.max_p99),
        ("max_error_rate_increase", args.max_error_rate_increase),
        ("max_latency_ratio", args.max_latency_ratio),
        ("max_inconclusive", args.max_inconclusive),
    ):
        if value is not None:
            analysis[key] = value
    if args.no_analysis:
        analysis["enabled"] = False
    if analysis:
        plan["analysis"] = analysis
    if args.keep_warm:
        plan["keep_warm"] = True
    return plan


def _pct(rate: Any) -> str:
    return f"{rate * 100:.2f}%" if isinstance(rate, int | float) else "-"


def _figures(name: str, f: dict[str, Any]) -> str:
    return (
        f"  {name:<9}requests {f['requests']:>7}  errors {f['errors']:>5} ({_pct(f['error_rate'])})"
        f"  p50 {f['p50_ms'] if f['p50_ms'] is not None else '-'} ms"
        f"  p99 {f['p99_ms'] if f['p99_ms'] is not None else '-'} ms\n"
    )


def print_rollout(r: dict[str, Any], out: TextIO) -> None:
    line = (
        f"rollout {r['id']}: {r['from']} -> {r['to']}  {r['phase'].upper()}  "
        f"step {r['step']}/{r['steps']} ({r['step_weight']} %)"
    )
    if r.get("step_pause_remaining") is not None:
        line += f", {r['step_pause_remaining']:.1f}s left in the step"
    out.write(line + "\n")
    out.write("weights: " + " ".join(f"{k}={v}" for k, v in r["weights"].items()) + "\n")
    if r.get("waiting"):
        out.write(f"waiting: {r['waiting']}\n")
    if r.get("reason"):
        out.write(f"reason: {r['reason']}\n")
    verdict = r.get("last_verdict")
    if verdict:
        out.write(
            f"verdict #{verdict['n']} (step {verdict['step']}, {verdict['window_s']}s window): "
            f"{verdict['result'].upper()}: {verdict['reason']}\n"
        )
        out.write(_figures("canary", verdict["canary"]))
        out.write(_figures("baseline", verdict["baseline"]))
        for check in verdict.get("checks", []):
            out.write(f"  - {check['name']}: {check['result']}: {check['reason']}\n")
    verdicts = r.get("verdicts") or []
    if len(verdicts) > 1:
        out.write("recent verdicts: " + " ".join(v["result"] for v in verdicts) + "\n")
    kpis = r.get("kpis") or {}
    if kpis.get("result"):
        out.write("kpis: " + json.dumps(kpis, sort_keys=True) + "\n")


def print_history(history: dict[str, Any], out: TextIO) -> None:
    items = history.get("rollouts") or []
    if not items:
        out.write("no rollouts yet\n")
        return
    rows: list[list[object]] = [
        [
            "ID",
            "TO",
            "FROM",
            "RESULT",
            "STARTED",
            "SECONDS",
            "CANARY REQ",
            "CANARY ERR",
            "ROLLBACK S",
            "REASON",
        ]
    ]
    for item in items:
        kpis = item.get("kpis") or {}
        canary = (kpis.get("pools") or {}).get(item["to"]) or {}
        rows.append(
            [
                item["id"],
                item["to"],
                item["from"],
                item["result"] or item["phase"],
                item["started_at"],
                kpis.get("duration_seconds", "-"),
                canary.get("requests", "-"),
                _pct(canary.get("error_rate")),
                kpis.get("rollback_seconds", "-"),
                (item.get("reason") or "")[:60],
            ]
        )
    table(rows, out)
    rate = history.get("success_rate")
    out.write(
        f"\n{history.get('finished', 0)} finished, success rate "
        f"{'-' if rate is None else f'{rate:.0%}'}\n"
    )


def cmd_rollout(client: Client, args: argparse.Namespace, out: TextIO) -> Any:
    action = args.rollout_action
    if action == "start":
        result = client.call("POST", "/api/v1/rollouts", rollout_plan(args))
    elif action == "history":
        result = client.call("GET", "/api/v1/rollouts")
        if not args.json:
            print_history(result, out)
        return result
    elif action == "status":
        if getattr(args, "watch", False) and not args.json:
            return watch_rollout(client, out, args.every)
        result = client.call("GET", "/api/v1/rollouts/current")
    else:
        result = client.call("POST", f"/api/v1/rollouts/current/{action}")
    if not args.json:
        print_rollout(result["rollout"], out)
    return result


def watch_rollout(client: Client, out: TextIO, every: float) -> Any:
    """Redraw the status every ``every`` seconds until the rollout ends; exit
    status 0 when it succeeded, 1 otherwise (for CI pipelines)."""
    import time

    clear = "\x1b[H\x1b[2J" if out.isatty() else "\n"
    while True:
        result = client.call("GET", "/api/v1/rollouts/current")
        rollout = result["rollout"]
        out.write(clear + time.strftime("%H:%M:%S ") + "\n")
        print_rollout(rollout, out)
        out.flush()
        if not rollout["active"]:
            if rollout["phase"] != "succeeded":
                raise CtlError(f"rollout {rollout['id']} {rollout['phase']}: {rollout['reason']}")
            return result
        time.sleep(every)


def _pool_path(pool: str | None, tail: str) -> str:
    if pool is None:
        return f"/api/v1/rolling{tail}"
    return f"/api/v1/pools/{urllib.parse.quote(pool, safe='')}/rolling{tail}"


def print_rolling(update: dict[str, Any], out: TextIO) -> None:
    plan = update["plan"]
    line = (
        f"rolling update {update['id']} of pool {update['pool']}: {update['phase']}, "
        f"{update['done']}/{update['total']} done (batch {plan['batch']}, at least "
        f"{plan['min_in_rotation']} in rotation)"
    )
    out.write(line + "\n")
    if update.get("reason"):
        out.write(f"  reason: {update['reason']}\n")
    if update.get("waiting_for"):
        out.write(f"  waiting: {update['waiting_for']}\n")
    for b in update["current"]:
        hint = " (replace it, then: zdproxy ctl rolling next)" if b["step"] == "replace" else ""
        detail = f" {b['address']} {b['state']}, {b['in_flight']} in flight" if "state" in b else ""
        out.write(f"  {b['id']}: {b['step']}{detail}{hint}\n")


def cmd_rolling(client: Client, args: argparse.Namespace, out: TextIO) -> Any:
    action = args.rolling_action
    if action == "start":
        body: dict[str, Any] = {}
        for key in ("batch", "min_in_rotation", "healthy_timeout", "replace_timeout"):
            value = getattr(args, key)
            if value is not None:
                body[key] = value
        if args.wait_replaced is not None:
            body["wait_replaced"] = args.wait_replaced
        result = client.call("POST", _pool_path(args.pool, ""), body)
        if not args.json:
            print_rolling(result["rolling"], out)
        return result
    if action == "status":
        result = client.call("GET", _pool_path(args.pool, ""))
        if not args.json:
            if not result["updates"]:
                out.write("no rolling update\n")
            for update in result["updates"]:
                print_rolling(update, out)
        return result
    body_pool = None if args.pool is None else {"pool": args.pool}
    result = client.call("POST", f"/api/v1/rolling/{action}", body_pool)
    if not args.json:
        print_rolling(result["rolling"], out)
    return result


def print_shadow(view: dict[str, Any], out: TextIO) -> None:
    settings = view["settings"]
    if view["active"]:
        out.write(
            f"shadow: {settings['percent']:g}% of requests copied to pool {settings['pool']} "
            f"(bodies up to {settings['max_body_bytes']} bytes"
            + (", body hash compared" if settings["compare_body"] else "")
            + ")\n"
        )
    else:
        out.write("shadow: off\n")
    figures = view.get("figures") or {}
    if figures.get("sent") or any(figures.get("results", {}).values()):
        results = " ".join(f"{k}={v}" for k, v in figures["results"].items() if v)
        out.write(f"  sent {figures['sent']}, in flight {figures['in_flight']}: {results}\n")
        ratio = figures.get("latency_ratio")
        if ratio is not None:
            out.write(
                f"  latency: live {figures['live_latency_avg_ms']} ms, shadow "
                f"{figures['shadow_latency_avg_ms']} ms (ratio {ratio})\n"
            )


def cmd_shadow(client: Client, args: argparse.Namespace, out: TextIO) -> Any:
    action = args.shadow_action
    if action == "set":
        try:
            percent = float(args.percent.rstrip("%"))
        except ValueError:
            raise CtlError(f"expected a percent, got {args.percent!r}") from None
        body: dict[str, Any] = {"pool": args.pool, "percent": percent}
        if args.max_body_bytes is not None:
            body["max_body_bytes"] = args.max_body_bytes
        if args.compare_body is not None:
            body["compare_body"] = args.compare_body
        if args.timeout is not None:
            body["timeout"] = args.timeout
        result = client.call("PUT", "/api/v1/shadow", body)
    elif action == "clear":
        result = client.call("DELETE", "/api/v1/shadow")
    else:
        result = client.call("GET", "/api/v1/shadow")
    if not args.json:
        print_shadow(result, out)
    return result


def cmd_reload(client: Client, args: argparse.Namespace, out: TextIO) -> Any:
    result = client.call("POST", "/api/v1/reload")
    if not args.json:
        changes = result.get("changes") or []
        out.write("reloaded: nothing changed\n" if not changes else "reloaded:\n")
        for line in changes:
            out.write(f"  {line}\n")
    return result


def cmd_services(client: Client, args: argparse.Namespace, out: TextIO) -> Any:
    result = client.call("GET", "/api/v1/services")
    if not args.json:
        rows: list[list[object]] = [["SERVICE", "WEIGHTS", "BACKENDS"]]
        for item in result["services"]:
            weights = " ".join(f"{pool}={pct}" for pool, pct in item["weights"].items())
            rows.append([item["name"], weights, item["backends"]])
        table(rows, out)
    return result


def cmd_upgrade(client: Client, args: argparse.Namespace, out: TextIO) -> Any:
    # answered once the new process serves: after its first health checks
    client.timeout = max(client.timeout, 90.0)
    result = client.call("POST", "/api/v1/upgrade")
    if not args.json:
        out.write(f"upgraded: pid {result['pid']} serves, pid {result['previous_pid']} drains\n")
    return result


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
    parser.add_argument(
        "--service", help="act on this service (default: $ZDPROXY_SERVICE, else default)"
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    def add(name: str, func: Command, help: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, description=help, parents=[common])
        p.set_defaults(func=func)
        return p

    add("status", cmd_status, "pools, weights, backends, states and in-flight requests")
    add("reload", cmd_reload, "re-read the config file and apply it in place (as SIGHUP)")
    add("services", cmd_services, "the services, their pool weights and backend counts")
    add("upgrade", cmd_upgrade, "hot upgrade to a new process of the installed code (as SIGUSR2)")
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
    p = add("rolling", cmd_rolling, "rolling update of one pool, backend by backend")
    rolling = p.add_subparsers(dest="rolling_action", metavar="ACTION")
    rolling.required = True
    r = rolling.add_parser(
        "start", help="drain, replace, re-enable each backend of POOL in turn", parents=[common]
    )
    r.add_argument("pool", metavar="POOL")
    r.add_argument("--batch", type=int, help="backends at once (default 1)")
    r.add_argument(
        "--min-in-rotation",
        dest="min_in_rotation",
        type=int,
        help="backends of the pool that always stay in rotation (default 1)",
    )
    wait = r.add_mutually_exclusive_group()
    wait.add_argument(
        "--wait-replaced",
        dest="wait_replaced",
        action="store_const",
        const=True,
        help="wait for 'rolling next' after each drain (the default)",
    )
    wait.add_argument(
        "--no-wait",
        dest="wait_replaced",
        action="store_const",
        const=False,
        help="re-enable each backend as soon as it is drained",
    )
    r.add_argument(
        "--healthy-timeout",
        dest="healthy_timeout",
        help="time a backend has to pass its health checks again (default 60s)",
    )
    r.add_argument(
        "--replace-timeout",
        dest="replace_timeout",
        help="time the deploy tool has to call next (default: no limit)",
    )
    for verb, text in (
        ("status", "the rolling updates, their current backends and steps"),
        ("next", "the current backend(s) were replaced: bring them back"),
        ("abort", "stop the update; the backends stay as they are"),
    ):
        r = rolling.add_parser(verb, help=text, parents=[common])
        r.add_argument("pool", metavar="POOL", nargs="?", help="default: the running update")
    p = add("shadow", cmd_shadow, "copy a share of live requests to a pool (shadow traffic)")
    shadow = p.add_subparsers(dest="shadow_action", metavar="ACTION")
    shadow.required = True
    r = shadow.add_parser("set", help="copy PCT %% of live requests to POOL", parents=[common])
    r.add_argument("pool", metavar="POOL")
    r.add_argument("percent", metavar="PCT")
    r.add_argument("--max-body-bytes", dest="max_body_bytes", type=int)
    compare = r.add_mutually_exclusive_group()
    compare.add_argument("--compare-body", dest="compare_body", action="store_const", const=True)
    compare.add_argument(
        "--no-compare-body", dest="compare_body", action="store_const", const=False
    )
    r.add_argument("--timeout", help="a copy's own timeout (e.g. 5s)")
    shadow.add_parser("clear", help="stop shadow traffic", parents=[common])
    shadow.add_parser("status", help="settings and divergence figures", parents=[common])
    p = add("rollout", cmd_rollout, "progressive rollouts judged by zdproxy's own traffic")
    actions = p.add_subparsers(dest="rollout_action", metavar="ACTION")
    actions.required = True

    def rollout_command(name: str, help: str) -> argparse.ArgumentParser:
        a = actions.add_parser(name, help=help, description=help, parents=[common])
        a.set_defaults(func=cmd_rollout)
        return a

    a = rollout_command(
        "start", "start a rollout: --to POOL --steps 10:30s,50:60s,100, or --plan FILE"
    )
    a.add_argument("--to", help="the target pool")
    a.add_argument("--from", dest="baseline", help="the baseline (default: the busiest other)")
    a.add_argument("--steps", help="WEIGHT[:PAUSE],...; no PAUSE: the step waits for promote")
    a.add_argument("--plan", help="a JSON file with the whole rollout body")
    a.add_argument("--interval", help="analysis window, e.g. 5s")
    a.add_argument("--min-requests", type=int, help="canary requests a verdict needs")
    a.add_argument("--max-error-rate", type=float, help="absolute limit, e.g. 0.01")
    a.add_argument("--max-p99", help="absolute p99 latency limit, e.g. 500ms")
    a.add_argument("--max-error-rate-increase", type=float, help="over the baseline, e.g. 0.01")
    a.add_argument("--max-latency-ratio", type=float, help="canary p99 / baseline p99, e.g. 1.5")
    a.add_argument("--max-inconclusive", type=int, help="inconclusive verdicts before a pause")
    a.add_argument("--no-analysis", action="store_true", help="steps advance on time alone")
    a.add_argument("--keep-warm", action="store_true", help="do not drain the old pool")
    a = rollout_command(
        "status", "the current (or latest) rollout: step, weights, verdicts, figures"
    )
    a.add_argument("--watch", action="store_true", help="redraw every second until it ends")
    a.add_argument("--every", type=float, default=1.0, help=argparse.SUPPRESS)
    for name, text in (
        ("pause", "hold the current step (analysis keeps judging)"),
        ("resume", "go on after a pause"),
        ("promote", "next step now (or success after the last one)"),
        ("abort", "stop; all new traffic back to the baseline"),
        ("history", "past rollouts with their KPIs and the success rate"),
    ):
        rollout_command(name, text)
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
    service = args.service or os.environ.get("ZDPROXY_SERVICE") or None
    client = Client(url, token, service=service)
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
