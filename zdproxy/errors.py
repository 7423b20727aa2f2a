"""One exception tree for zdproxy.

Errors are translated at layer boundaries. Those that end a client request carry
the HTTP status they map to and the ``X-Zdproxy-Error`` cause that names them,
in the spirit of h11's ``error_status_hint``.
"""

from __future__ import annotations


class ZdproxyError(Exception):
    """Base of every zdproxy error."""


class ProxyError(ZdproxyError):
    """A request could not be proxied; the client gets ``status`` with ``cause``."""

    status = 502
    cause = "proxy-error"

    def __init__(self, message: str = "", *, status: int | None = None, cause: str | None = None):
        super().__init__(message or self.__class__.__doc__ or "")
        if status is not None:
            self.status = status
        if cause is not None:
            self.cause = cause


class BadRequest(ProxyError):
    """Malformed request: framing is in doubt, so the connection is closed."""

    status = 400
    cause = "bad-request"


class NoBackend(ProxyError):
    """No healthy backend in the selected pool."""

    status = 503
    cause = "no-backend"


class UpstreamConnectError(ProxyError):
    """The backend refused or did not accept the connection in time."""

    status = 502
    cause = "upstream-connect"


class UpstreamTimeout(ProxyError):
    """The backend did not answer within timeouts.upstream_response."""

    status = 504
    cause = "upstream-timeout"


class BadUpstreamResponse(ProxyError):
    """The backend's response was not valid HTTP/1.x."""

    status = 502
    cause = "bad-upstream-response"


class ListenError(ZdproxyError):
    """A listening address cannot be bound; zdproxy exits 1 with this one line."""


class ControlError(ZdproxyError):
    """A runtime control call was refused; nothing was changed."""

    status = 400

    def __init__(self, message: str, *, status: int = 400):
        super().__init__(message)
        self.status = status


class NotFound(ControlError):
    def __init__(self, message: str):
        super().__init__(message, status=404)


class Conflict(ControlError):
    def __init__(self, message: str):
        super().__init__(message, status=409)
