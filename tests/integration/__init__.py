"""Integration tests (a package, so that basenames may repeat across suites)."""
