"""``zdproxy demo``: two pools of two small application servers and the proxy,
in one process, with nothing to configure."""

from __future__ import annotations

import asyncio
import os
import random
import secrets
import signal
import socket

from aiohttp import web

from zdproxy.config.schema import Config

PROXY_PORT = 8080
ADMIN_PORT = 9901
DEMO_BACKENDS = {"blue": (9101, 9102), "green": (9103, 9104)}


def make_app(pool: str, backend_id: str) -> web.Application:
    """A tiny application server that says which pool and backend answered.
    ``POST /_demo/errors?rate=0.3`` (on the backend's own port) makes it answer
    500 to that share of requests: a bad version, for the rollout walkthrough."""
    colour = {"blue": "#2563eb", "green": "#16a34a"}.get(pool, "#444")
    failing = {"rate": 0.0}
    rng = random.Random()

    async def errors(request: web.Request) -> web.StreamResponse:
        try:
            rate = float(request.query.get("rate", "0"))
        except ValueError:
            rate = -1.0
        if not 0.0 <= rate <= 1.0:
            return web.Response(status=400, text="rate must be a number 0-1\n")
        failing["rate"] = rate
        return web.Response(text=f"{backend_id}: {rate:.0%} of requests now fail\n")

    async def index(request: web.Request) -> web.StreamResponse:
        if failing["rate"] and rng.random() < failing["rate"]:
            return web.Response(status=500, text=f"{backend_id}: injected failure\n")
        if "text/html" in request.headers.get("Accept", ""):
            return web.Response(
                text=(
                    f"<!doctype html><title>{pool}</title><body style='font-family:sans-serif;"
                    f"background:{colour};color:white;padding:2em'><h1>{pool}</h1>"
                    f"<p>served by {backend_id}</p></body>"
                ),
                content_type="text/html",
            )
        return web.json_response(
            {
                "pool": pool,
                "backend": backend_id,
                "path": request.path_qs,
                "forwarded_for": request.headers.get("X-Forwarded-For"),
            }
        )

    async def healthz(request: web.Request) -> web.StreamResponse:
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_get("/healthz", healthz)
    app.router.add_post("/_demo/errors", errors)
    app.router.add_route("*", "/{tail:.*}", index)
    return app


def demo_config(token_env: str) -> Config:
    pools = {
        name: {
            "weight": 100 if name == "blue" else 0,
            "backends": [
                {"id": f"{name}-{n}", "address": f"127.0.0.1:{port}"}
                for n, port in enumerate(ports, start=1)
            ],
        }
        for name, ports in DEMO_BACKENDS.items()
    }
    return Config.model_validate(
        {
            "listen": [f"127.0.0.1:{PROXY_PORT}"],
            "admin": {"listen": f"127.0.0.1:{ADMIN_PORT}", "token_env": token_env},
            "state": {"path": None},
            "pools": pools,
            "health_check": {"path": "/healthz", "interval": "1s", "rise": 1, "fall": 2},
            "draining": {"timeout": "5s"},
            # a demo needs few connections; the default 10,000 would warn on machines
            # whose open-file limit is below 2 x 10,000 (ulimit -n)
            "limits": {"max_connections": 1000},
            "shutdown_timeout": "5s",
        }
    )


def demo_token() -> str:
    """A random admin token that never starts with ``-``: about 1 in 64
    ``token_urlsafe`` values does, and ``zdproxy ctl --token -xyz`` would then
    read it as an option."""
    while True:
        token = secrets.token_urlsafe(24)
        if not token.startswith("-"):
            return token


def _port_free(port: int) -> bool:
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


async def run_demo() -> int:
    from zdproxy.server import ProxyServer, wire

    busy = [
        p for p in (PROXY_PORT, ADMIN_PORT, *sum(DEMO_BACKENDS.values(), ())) if not _port_free(p)
    ]
    if busy:
        print(f"zdproxy demo: ports already in use: {', '.join(map(str, busy))}")
        return 1
    token = os.environ.get("ZDPROXY_ADMIN_TOKEN") or demo_token()
    os.environ["ZDPROXY_ADMIN_TOKEN"] = token
    runners = []
    for pool, ports in DEMO_BACKENDS.items():
        for n, port in enumerate(ports, start=1):
            runner = web.AppRunner(make_app(pool, f"{pool}-{n}"), access_log=None)
            await runner.setup()
            await web.TCPSite(runner, "127.0.0.1", port).start()
            runners.append(runner)
    server = ProxyServer(demo_config("ZDPROXY_ADMIN_TOKEN"))
    wire(server)
    await server.start()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, server.request_stop)
    print(_guide(token), flush=True)
    await server.wait_stopped()
    for runner in runners:
        await runner.cleanup()
    return 0


def _guide(token: str) -> str:
    proxy = f"http://127.0.0.1:{PROXY_PORT}"
    admin = f"http://127.0.0.1:{ADMIN_PORT}"
    return f"""
zdproxy demo is running.

  proxy      {proxy}/            (blue has 100 % of the traffic)
  admin API  {admin}/api/v1/state
  dashboard  {admin}/
  token      {token}

Try it:
  curl -s {proxy}/                                   # answered by blue
  curl -s -H 'X-Zdproxy-Pool: green' {proxy}/        # force the green pool
  curl -s --cookie 'zd_pool=green' {proxy}/          # the same with a cookie

Drive a deployment (in another shell):
  export ZDPROXY_ADMIN_URL={admin} ZDPROXY_ADMIN_TOKEN={token}
  zdproxy ctl status
  zdproxy ctl split blue=90 green=10                 # canary: 10 % to green
  zdproxy ctl flip green                             # blue/green flip
  zdproxy ctl drain blue-1

A progressive rollout that judges green on live traffic (docs/rollouts.md):
  while true; do curl -s -o /dev/null {proxy}/; done &          # some traffic
  zdproxy ctl rollout start --to green --steps 10:20s,50:20s,100:10s --interval 2s --min-requests 20
  zdproxy ctl rollout status --watch
  curl -X POST 'http://127.0.0.1:9103/_demo/errors?rate=0.3'    # make green-1 a bad version

Ctrl-C stops everything.
"""
