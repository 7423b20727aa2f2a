"""Command line: ``zdproxy run | check | demo | ctl``."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections.abc import Sequence
from typing import Any


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry)


def setup_logging(fmt: str, level: str = "info") -> None:
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # aiohttp's own access log is noise next to ours
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)


def _run_loop(coro: Any) -> int:
    # uvloop is a dependency: without it the start fails, never runs slower in silence
    import uvloop

    return int(uvloop.run(coro))


def cmd_run(args: argparse.Namespace) -> int:
    from zdproxy.config.loader import ConfigError, load_config
    from zdproxy.server import serve
    from zdproxy.upgrade import Handover, report_start_failure

    try:
        config = load_config(args.config)
    except ConfigError as exc:
        setup_logging(args.log_format)
        for problem in exc.problems:
            print(problem, file=sys.stderr)
        # started by a hot upgrade: the old process logs why and serves on
        report_start_failure([str(problem) for problem in exc.problems])
        return 1
    setup_logging(args.log_format or config.log.format, config.log.level)
    handover = Handover.from_environ()
    server: list[Any] = []

    async def run() -> int:
        server.append(await serve(config, args.config, handover))
        return 0

    code = _serve(run(), handover)
    supervision = server[0].upgrader.supervision if server else None
    if supervision is not None:
        # PID 1 after a hot upgrade: the container lives as long as the new process
        code = supervision.run()
    return code


def _serve(coro: Any, handover: Any = None) -> int:
    """Run the server; a listener that cannot be bound, or an access log that
    cannot be opened, is one line and exit 1."""
    from zdproxy.errors import ListenError
    from zdproxy.proxy.accesslog import AccessLogError

    try:
        return _run_loop(coro)
    except (ListenError, AccessLogError) as exc:
        print(f"zdproxy: {exc}", file=sys.stderr)
        if handover is not None:
            handover.report({"failed": [str(exc)]})
        return 1


def cmd_check(args: argparse.Namespace) -> int:
    from zdproxy.config.loader import check_file

    ok, lines = check_file(args.config)
    stream = sys.stdout if ok else sys.stderr
    for line in lines:
        print(line, file=stream)
    return 0 if ok else 1


def cmd_demo(args: argparse.Namespace) -> int:
    from zdproxy.demo import run_demo

    setup_logging(args.log_format or "text", "warning")
    # the audit log, one line per change (flip, split, drain, ...): what a demo shows
    logging.getLogger("zdproxy.admin").setLevel(logging.INFO)
    return _serve(run_demo())


def cmd_ctl(args: argparse.Namespace) -> int:
    from zdproxy.ctl import main as ctl_main

    code: int = ctl_main(args.ctl_args)
    return code


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="zdproxy", description="Reverse-proxy load balancer for zero-downtime deployments."
    )
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    sub = parser.add_subparsers(dest="command")

    run = sub.add_parser("run", help="run the proxy in the foreground")
    run.add_argument("-c", "--config", required=True, help="config file (YAML)")
    run.add_argument("--log-format", choices=["text", "json"], default=None)
    run.set_defaults(func=cmd_run)

    check = sub.add_parser("check", help="validate a config file")
    check.add_argument("-c", "--config", required=True, help="config file (YAML)")
    check.set_defaults(func=cmd_check)

    demo = sub.add_parser("demo", help="run a self-contained blue/green demo")
    demo.add_argument("--log-format", choices=["text", "json"], default=None)
    demo.set_defaults(func=cmd_demo)

    ctl = sub.add_parser("ctl", help="admin client (see `zdproxy ctl --help`)", add_help=False)
    ctl.add_argument("ctl_args", nargs=argparse.REMAINDER)
    ctl.set_defaults(func=cmd_ctl)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["ctl"]:
        # the admin client parses its own options, including leading ones (--json)
        from zdproxy.ctl import main as ctl_main

        try:
            code: int = ctl_main(argv[1:])
        except BrokenPipeError:
            # output piped into `head` and cut short: not an error worth a traceback
            sys.stderr.close()
            return 0
        return code
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.version:
        from zdproxy import __version__
        from zdproxy.buildinfo import build

        print(f"zdproxy {__version__} ({build()})")
        return 0
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    result: int = args.func(args)
    return result


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
