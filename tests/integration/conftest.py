"""Fixtures shared by several integration modules."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from support_etcd import EtcdServer


@pytest.fixture
async def etcd(tmp_path: Path) -> AsyncIterator[EtcdServer]:
    """A real etcd server on loopback, with its data in the test's directory."""
    server = EtcdServer(tmp_path).start()
    try:
        yield server
    finally:
        server.stop()
