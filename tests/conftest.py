"""Test-suite wide setup: make ``tests/`` importable so suites share helpers
(``import support``), and run asyncio tests on uvloop like production."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
