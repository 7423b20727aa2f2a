"""Which build of zdproxy runs: ``compiled`` (the hot modules built with mypyc) or
``pure`` (all Python). See docs/internals.md, "Build"."""

from __future__ import annotations

import importlib.util
import sys
from typing import Literal

# the probe: the data path's core, compiled whenever the hot modules are
PROBE = "zdproxy.proxy.exchange"


def build() -> Literal["compiled", "pure"]:
    """``compiled`` when the probe module is (or would be) loaded from an extension
    module rather than from its ``.py`` source."""
    module = sys.modules.get(PROBE)
    origin = getattr(module, "__file__", None) if module is not None else None
    if origin is None:
        spec = importlib.util.find_spec(PROBE)
        origin = spec.origin if spec is not None else None
    return "compiled" if origin is not None and origin.endswith((".so", ".pyd")) else "pure"
