"""The key that signs affinity cookies, for one service.

From ``sticky.secret_file`` or ``sticky.secret_env`` when configured; else a
generated key, kept in the saved state (the runtime's ``sticky`` section) and
passed on by a hot upgrade, so that pins survive restarts and upgrades. The
composition root builds one per service and it configures that service's
selector (at start, when the saved state brings a key, and on reload).
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Mapping
from typing import Any

from zdproxy.balancing.selector import WeightedSelector
from zdproxy.balancing.sticky import load_secret
from zdproxy.config.schema import Config, StickyConfig
from zdproxy.control.runtime import Runtime

log = logging.getLogger("zdproxy.control")


class StickyKey:
    def __init__(self, runtime: Runtime, selector: WeightedSelector, config: Config) -> None:
        """Raises ``SystemExit(1)`` (after logging why) when a configured secret
        file cannot be used: a start that would sign with the wrong key."""
        self.runtime = runtime
        self.selector = selector
        self.config = config
        try:
            secret, source = sticky_secret(config.sticky, os.environ)
        except (OSError, ValueError) as exc:
            log.error("cannot start: %s", exc)
            raise SystemExit(1) from None
        signs = config.sticky.mode in ("pool", "backend")
        if signs and source == "generated":
            if config.sticky.secret_env:
                log.warning(
                    "sticky.secret_env names %s, which is not set: affinity cookies are "
                    "signed with a generated key",
                    config.sticky.secret_env,
                )
            else:
                log.info(
                    "affinity cookies are signed with a generated key, kept in the saved "
                    "state and passed on by a hot upgrade; set sticky.secret_env or "
                    "secret_file when several zdproxy instances serve one site"
                )
        self.secret = secret
        self.source = source
        #: a generated key not yet in the saved state: saved once serving
        self._save = signs and source == "generated"
        runtime.add_state_section("sticky", self._export, self._restore)
        selector.configure(config.sticky, config.draining, secret)

    def save_if_new(self) -> None:
        """Once serving: a newly generated key goes into the saved state."""
        if self._save:
            self._save = False
            self.runtime.state_changed()

    def _export(self) -> dict[str, str] | None:
        """A generated key goes into the saved state (and a hot upgrade's hand-over).
        A configured one is never written."""
        if self.source != "generated":
            return None
        return {"key": self.secret.hex()}

    def _restore(self, saved: Any) -> None:
        if self.source != "generated" or not isinstance(saved, dict):
            return
        try:
            key = bytes.fromhex(str(saved.get("key")))
        except ValueError:
            key = b""
        if len(key) != 32:
            log.warning("saved state: the sticky key is not 32 hex bytes; a new one is used")
            return
        self.secret = key
        self._save = False
        self.selector.configure(self.config.sticky, self.config.draining, key)

    def reconfigure(self, config: Config) -> None:
        """A reloaded config: a configured key replaces the one in use; else the key
        in use stays (generated, saved or configured before), so pins survive."""
        self.config = config
        try:
            secret, source = sticky_secret(config.sticky, os.environ)
        except (OSError, ValueError) as exc:
            log.error("config reload: %s; the sticky key in use stays", exc)
        else:
            if source != "generated":
                self.secret, self.source = secret, source
        self.selector.configure(config.sticky, config.draining, self.secret)


def sticky_secret(sticky: StickyConfig, environ: Mapping[str, str]) -> tuple[bytes, str]:
    """The key that signs affinity cookies and where it came from: ``"file"``
    (``sticky.secret_file``), ``"env"`` (``sticky.secret_env``) or ``"generated"``
    (random; the saved state or a hot upgrade's hand-over may replace it).
    Raises ``OSError`` or ``ValueError`` naming a secret file that cannot be used."""
    path = sticky.secret_file
    if path is not None:
        try:
            with open(path, "rb") as f:
                value = f.read().strip()
        except OSError as exc:
            raise OSError(f"sticky.secret_file: cannot read {path}: {exc.strerror}") from None
        if not value:
            raise ValueError(f"sticky.secret_file: {path} is empty")
        return hashlib.sha256(value).digest(), "file"
    secret, from_env = load_secret(sticky.secret_env, environ)
    return secret, "env" if from_env else "generated"
