"""Health: active checks, passive outlier detection, slow start, the retry budget
and the drain deadline of tunnels, feeding ``balancing/`` through the runtime.

``zdproxy.health.checker.install(server)`` hooks all of it into a server.
"""
