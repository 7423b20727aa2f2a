"""Test-suite wide setup: make ``tests/`` importable so suites share helpers
(``import support``), and run asyncio tests on uvloop like production."""

from __future__ import annotations

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

# scripts/test installs a build (compiled with mypyc, or pure) and says which: fail
# the whole run at once if the tests would import another one (the source tree on
# sys.path shadows the installed package)
_expected_build = os.environ.get("ZDPROXY_EXPECT_BUILD")
if _expected_build:
    from zdproxy.buildinfo import build

    if build() != _expected_build:
        import zdproxy

        raise RuntimeError(
            f"tests import the {build()} build from {zdproxy.__file__}, "
            f"not the {_expected_build} build installed"
        )
