"""zdproxy benchmark harness: backends, proxies under test, load runs and reports.

Entry point: ``python benchmarks/run.py`` (see docs/benchmarks.md).
"""
