"""Bearer-token authentication of the admin API.

Tokens come from the config: ``admin.token_file`` or, when no file is set, the
environment variable named by ``admin.token_env`` (the token named "default",
role write), plus the named ``admin.tokens`` (role read or write). Each is
compared in constant time. The token's name is the actor in the audit log.

Answers: 401 when no token is sent (or none is configured at all), 403 when the
token is wrong, or when a read token asks for a mutation.
"""

from __future__ import annotations

import hmac
import ipaddress
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass

from zdproxy.config.schema import AdminConfig
from zdproxy.errors import ZdproxyError

log = logging.getLogger("zdproxy.admin")

#: tokens shorter than this are accepted with a warning
MIN_TOKEN_LENGTH = 16

NO_TOKEN_MESSAGE = (
    "no admin token is configured: set the ZDPROXY_ADMIN_TOKEN environment variable "
    "(admin.token_env), admin.token_file or admin.tokens, and restart"
)


class TokenConfigError(ZdproxyError):
    """A configured token cannot be read; zdproxy refuses to start."""


class AuthError(ZdproxyError):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True, slots=True)
class Token:
    name: str
    role: str  # "read" or "write"
    secret: bytes = b""

    def __repr__(self) -> str:  # never print the secret
        return f"Token({self.name!r}, {self.role!r})"


def _read_file(path: str, what: str) -> str:
    try:
        with open(path, encoding="utf-8") as f:
            value = f.read().strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise TokenConfigError(f"{what}: cannot read token file {path}: {exc}") from None
    if not value:
        raise TokenConfigError(f"{what}: token file {path} is empty")
    return value


def load_tokens(admin: AdminConfig, environ: Mapping[str, str] | None = None) -> list[Token]:
    """The configured tokens. A missing default token (unset variable) is not an
    error; a named token, or a token file, that cannot be read is."""
    env = os.environ if environ is None else environ
    tokens: list[Token] = []
    if admin.token_file is not None:
        tokens.append(
            Token("default", "write", _read_file(admin.token_file, "admin.token_file").encode())
        )
    elif admin.token_env is not None and env.get(admin.token_env, "").strip():
        tokens.append(Token("default", "write", env[admin.token_env].strip().encode()))
    for index, named in enumerate(admin.tokens):
        where = f"admin.tokens.{index} ({named.name})"
        if named.env is not None:
            value = env.get(named.env, "").strip()
            if not value:
                raise TokenConfigError(f"{where}: environment variable {named.env} is not set")
        else:
            assert named.file is not None
            value = _read_file(named.file, where)
        tokens.append(Token(named.name, named.role, value.encode()))
    for token in tokens:
        if len(token.secret) < MIN_TOKEN_LENGTH:
            log.warning(
                "admin token %r is shorter than %d characters", token.name, MIN_TOKEN_LENGTH
            )
    return tokens


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name: assume it is reachable from elsewhere


class Authenticator:
    def __init__(self, tokens: list[Token]) -> None:
        self.tokens = tokens

    def check(self, authorization: str | None, write: bool) -> Token:
        """The token a request authenticates with, or ``AuthError``."""
        if not self.tokens:
            raise AuthError(401, NO_TOKEN_MESSAGE)
        if not authorization:
            raise AuthError(401, "missing bearer token: send Authorization: Bearer TOKEN")
        scheme, _, credentials = authorization.strip().partition(" ")
        credentials = credentials.strip()
        if scheme.lower() != "bearer" or not credentials:
            raise AuthError(401, "expected Authorization: Bearer TOKEN")
        provided = credentials.encode("utf-8", "surrogateescape")
        found: Token | None = None
        for token in self.tokens:  # no early exit: every token costs the same
            if hmac.compare_digest(token.secret, provided) and found is None:
                found = token
        if found is None:
            raise AuthError(403, "invalid token")
        if write and found.role != "write":
            raise AuthError(403, f"token {found.name!r} is read-only: this needs a write token")
        return found
