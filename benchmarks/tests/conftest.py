"""Make ``harness`` (benchmarks/harness) and this checkout's ``zdproxy`` importable."""

import sys
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parent.parent
for path in (str(BENCHMARKS), str(BENCHMARKS.parent)):
    if path not in sys.path:
        sys.path.insert(0, path)
