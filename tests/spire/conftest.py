"""Fixtures for the SPIRE client tests: a fake SPIRE agent on a Unix socket, and a client."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from agent.spire import DelegatedIdentityClient

from .fakespire import FAST, SpireServer


@pytest.fixture
def socket_path(tmp_path: Path) -> Path:
    return tmp_path / "admin.sock"


@pytest.fixture
async def spire_server(socket_path: Path) -> AsyncIterator[SpireServer]:
    server = SpireServer(socket_path)
    yield server
    await server.stop()


@pytest.fixture
async def client(socket_path: Path) -> AsyncIterator[DelegatedIdentityClient]:
    async with DelegatedIdentityClient(socket_path, backoff=FAST) as c:
        yield c

