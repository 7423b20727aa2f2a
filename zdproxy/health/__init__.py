"""Health: active checks, passive outlier detection, slow start
and the drain deadline of tunnels, feeding ``balancing/`` through the runtime.

``zdproxy.health.checker.build_health`` builds it per service; the composition
root (``zdproxy.server.wire``) hooks it into the start and stop.
"""
