"""The admin API (aiohttp): JSON API, auth, OpenAPI description, dashboard page.

It talks to ``zdproxy.control`` only; ``app.install(server)`` wires it into the
composition root.
"""
