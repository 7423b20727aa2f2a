"""File descriptors: how many client connections the open-file limit allows.

Each client connection takes a descriptor, and one more for its upstream
connection while a request is in flight. Without a budget, connections past
the open-file limit are accepted and closed at once by libuv (it sheds them
silently), connecting upstream fails with EMFILE, and the admin API can no
longer accept either. So zdproxy raises its soft limit to the hard one when it
needs more, keeps ``FD_RESERVE`` descriptors for everything else (admin API,
health checks, state files, logs, idle upstream connections) and serves at most
what is left, two descriptors per client connection.
"""

from __future__ import annotations

import errno
import resource
from dataclasses import dataclass

#: descriptors kept for the admin API, health checks, files and idle upstreams
FD_RESERVE = 64
#: per client connection: its own socket and its upstream connection
FDS_PER_CONNECTION = 2
#: errno values that mean "this process (or the system) is out of descriptors"
OUT_OF_FDS = frozenset({errno.EMFILE, errno.ENFILE})


@dataclass(frozen=True, slots=True)
class FdBudget:
    #: the open-file limit (soft) after any raise; None when unlimited
    nofile: int | None
    #: client connections that fit: min(limits.max_connections, what the limit allows)
    max_connections: int

    def warning(self, configured: int) -> str | None:
        """The start-up warning, when the limit does not allow ``configured``."""
        if self.nofile is None or self.max_connections >= configured:
            return None
        return (
            f"limits.max_connections ({configured}) exceeds what the open-file limit allows "
            f"(RLIMIT_NOFILE {self.nofile}: {FDS_PER_CONNECTION} descriptors per connection, "
            f"{FD_RESERVE} kept for the admin API and the rest): serving at most "
            f"{self.max_connections} client connections; raise the limit (ulimit -n, "
            f"systemd LimitNOFILE=) to at least {descriptors_for(configured)}"
        )


def descriptors_for(connections: int) -> int:
    return FDS_PER_CONNECTION * connections + FD_RESERVE


def connections_for(nofile: int) -> int:
    """Client connections that fit in ``nofile`` descriptors (at least 1)."""
    return max(1, (nofile - FD_RESERVE) // FDS_PER_CONNECTION)


def fd_budget(max_connections: int) -> FdBudget:
    """Raise the soft open-file limit toward what ``max_connections`` needs (up
    to the hard limit), and say how many connections fit."""
    want = descriptors_for(max_connections)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return FdBudget(None, max_connections)
    if soft < want:
        target = want if hard == resource.RLIM_INFINITY else min(hard, want)
        if target > soft:
            try:
                resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
                soft = target
            except (ValueError, OSError):
                pass  # keep the soft limit; the budget below follows it
    return FdBudget(soft, min(max_connections, connections_for(soft)))
