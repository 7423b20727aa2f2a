#!/usr/bin/env python3
"""Benchmark zdproxy against nginx and HAProxy: ``python benchmarks/run.py [--quick]``.

See docs/benchmarks.md for what it measures and how to read the results.
"""

from __future__ import annotations

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(1, str(HERE.parent))  # this checkout's zdproxy, for the balancing benchmark

from harness.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
