"""zdproxy: a reverse-proxy load balancer for zero-downtime deployments."""

__version__ = "0.1.0"
