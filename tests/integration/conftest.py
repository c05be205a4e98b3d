"""A dev-spire on a real Unix socket and a DelegatedIdentityClient connected to it."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from agent.devspire import DevSpire, DevSpireSettings
from agent.spire.backoff import BackoffPolicy
from agent.spire.client import DelegatedIdentityClient
from tests.waiting import eventually

TD = "example.org"
DELEGATE = f"spiffe://{TD}/spiffe-delegate"
FAST_RETRY = BackoffPolicy(initial=0.02, maximum=0.2, reset_after=1.0)


def selector_entry(spiffe_id: str, *selectors: str, **extra: Any) -> dict[str, Any]:
    """An entry in `spire-server entry create -data` shape."""
    pairs = [dict(zip(("type", "value"), s.split(":", 1), strict=True)) for s in selectors]
    return {"spiffe_id": spiffe_id, "parent_id": f"spiffe://{TD}/spire/agent/dev",
            "selectors": pairs, **extra}


@dataclass
class Spire:
    dev: DevSpire
    settings: DevSpireSettings
    entries_path: Path

    async def set_entries(self, *entries: dict[str, Any]) -> None:
        """Rewrites the entries file (the delegate's own entry always first) and waits for it."""
        before = self.dev.stats.entries_reloads
        document = {"entries": [selector_entry(DELEGATE, f"unix:uid:{os.getuid()}"), *entries]}
        tmp = self.entries_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(document))
        os.replace(tmp, self.entries_path)
        await eventually(lambda: self.dev.stats.entries_reloads > before, what="entries reload")

    async def restart(self) -> None:
        await self.dev.stop(grace=0)
        self.dev = DevSpire(self.settings)
        await self.dev.start()


@pytest.fixture
def work_dir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="sd-it-", dir="/tmp"))  # short: socket paths <= 108 B
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
async def spire(work_dir: Path) -> AsyncIterator[Spire]:
    entries = work_dir / "entries.json"
    entries.write_text(json.dumps({"entries": [
        selector_entry(DELEGATE, f"unix:uid:{os.getuid()}")]}))
    settings = DevSpireSettings(socket_path=str(work_dir / "admin.sock"), trust_domain=TD,
                                entries_path=str(entries), authorized_delegates=(DELEGATE,),
                                reload_interval=0.05)
    harness = Spire(DevSpire(settings), settings, entries)
    await harness.dev.start()
    yield harness
    await harness.dev.stop(grace=0)


@pytest.fixture
async def client(spire: Spire) -> AsyncIterator[DelegatedIdentityClient]:
    async with DelegatedIdentityClient(spire.settings.socket_path, backoff=FAST_RETRY) as c:
        yield c
