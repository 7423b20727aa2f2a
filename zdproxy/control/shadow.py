"""Shadow traffic settings: which pool gets copies of live requests, and how many.

The control side of shadow traffic: it owns the current settings (from the
config's ``shadow`` section, changed at runtime through the admin API), audits
every change (``shadow.set``, ``shadow.clear``), keeps them in the saved state,
and hands them to its subscribers (the data path's sender, wired by the
composition root). The data path's figures come back through ``figures``, a
callable the composition root sets, so the admin API never reaches into the
data path.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Any

from pydantic import ValidationError

from zdproxy.config.schema import ShadowConfig
from zdproxy.control.events import Event
from zdproxy.control.runtime import Runtime
from zdproxy.errors import ControlError, NotFound

log = logging.getLogger("zdproxy.control")

SECTION = "shadow"
SETTING_KEYS = frozenset(ShadowConfig.model_fields)


def settings_json(settings: ShadowConfig) -> dict[str, Any]:
    return settings.model_dump()


def _no_figures() -> dict[str, Any]:
    return {}


class ShadowControl:
    def __init__(self, runtime: Runtime, config: ShadowConfig) -> None:
        self.runtime = runtime
        #: the config file's section: the base of API changes, and what a config edit restores
        self.config = config
        self.settings = config
        self._listeners: list[Callable[[ShadowConfig], None]] = []
        #: the data path's figures (set by the composition root)
        self.figures: Callable[[], dict[str, Any]] = _no_figures
        runtime.add_state_section(SECTION, self.export, self.restore)

    @property
    def active(self) -> bool:
        return self.settings.pool is not None and self.settings.percent > 0

    def subscribe(self, listener: Callable[[ShadowConfig], None]) -> None:
        self._listeners.append(listener)
        listener(self.settings)

    def set(self, body: Mapping[str, Any], actor: str) -> Event | None:
        """New settings: ``pool`` and ``percent`` are required, other keys default
        to the config file's ``shadow`` section. 400/404 with nothing changed."""
        unknown = sorted(set(body) - SETTING_KEYS)
        if unknown:
            expected = ", ".join(sorted(SETTING_KEYS))
            raise ControlError(f"unknown key {unknown[0]!r} (expected: {expected})")
        for key in ("pool", "percent"):
            if key not in body:
                raise ControlError(f"missing key {key!r}")
        pool = body["pool"]
        if not isinstance(pool, str):
            raise ControlError(f"pool must be a pool name, got {pool!r}")
        if pool not in self.runtime.pool_weights:
            known = ", ".join(self.runtime.pool_weights)
            raise NotFound(f"no pool named {pool!r} (pools: {known})")
        percent = body["percent"]
        if isinstance(percent, bool) or not isinstance(percent, int | float):
            raise ControlError(f"percent must be a number 0-100, got {percent!r}")
        try:
            new = ShadowConfig.model_validate({**self.config.model_dump(), **body})
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(part) for part in first["loc"])
            raise ControlError(f"{where}: {first['msg']}") from None
        return self._apply(new, actor, "shadow.set")

    def clear(self, actor: str) -> Event | None:
        new = self.settings.model_copy(update={"pool": None, "percent": 0.0})
        return self._apply(new, actor, "shadow.clear")

    def _apply(self, new: ShadowConfig, actor: str, action: str) -> Event | None:
        if new == self.settings:
            return None
        before = settings_json(self.settings) if self.active else None
        self.settings = new
        for listener in self._listeners:
            listener(new)
        after = settings_json(new) if self.active else None
        if self.active:
            log.info("shadow traffic by %s: %g %% to pool %s", actor, new.percent, new.pool)
        else:
            log.info("shadow traffic off by %s", actor)
        event = self.runtime.events.record(actor, action, new.pool or "-", before, after)
        self.runtime.state_changed()
        return event

    def reconfigure(self, config: ShadowConfig, actor: str) -> Event | None:
        """A reloaded config: an edited ``shadow`` section wins over settings made
        through the API (the rule of a restart); an unchanged one keeps them,
        unless their pool left the config."""
        if config != self.config:
            self.config = config
            return self._apply(config, actor, "shadow.set" if config.pool else "shadow.clear")
        pool = self.settings.pool
        if pool is not None and pool not in self.runtime.pool_weights:
            return self.clear(actor)
        return None

    def checkpoint(self) -> ShadowConfig:
        """The settings, for ``rollback`` when an operator call cannot be saved."""
        return self.settings

    def rollback(self, checkpoint: ShadowConfig) -> None:
        if checkpoint != self.settings:
            self.settings = checkpoint
            for listener in self._listeners:
                listener(checkpoint)

    def view(self) -> dict[str, Any]:
        return {
            "active": self.active,
            "settings": settings_json(self.settings),
            "figures": self.figures(),
        }

    # ---- persistence -----------------------------------------------------------

    def export(self) -> dict[str, Any]:
        return {"settings": settings_json(self.settings), "config": settings_json(self.config)}

    def restore(self, saved: Any) -> None:
        """Settings changed through the API come back, unless the config file's
        section changed since they were saved (then the config wins, as for weights)."""
        if not isinstance(saved, dict):
            return
        if saved.get("config") != settings_json(self.config):
            log.info("saved state: the config's shadow section changed since; using the config's")
            return
        try:
            settings = ShadowConfig.model_validate(saved.get("settings"))
        except ValidationError as exc:
            log.warning("saved state: unusable shadow settings (%s); using the config's", exc)
            return
        if settings.pool is not None and settings.pool not in self.runtime.pool_weights:
            log.info("saved state: shadow pool %s is gone; using the config's", settings.pool)
            return
        self.settings = settings
