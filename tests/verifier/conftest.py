"""dev-spire on the real /proc, a client for it, and helpers for real processes in fake pods."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from agent.cache import CacheState, Watch
from agent.devspire import DevSpire, DevSpireSettings
from agent.spire import BackoffPolicy, DelegatedIdentityClient
from tests.devspire.conftest import DELEGATE, TD, delegate_entry, write_json
from tests.podcgroups import FakePod
from tests.waiting import eventually

NS_LAST_PID = Path("/proc/sys/kernel/ns_last_pid")
FAST = BackoffPolicy(initial=0.02, maximum=0.2)


@dataclass
class Spire:
    """A running dev-spire attesting from the real /proc, and a client for it."""

    dev: DevSpire
    client: DelegatedIdentityClient
    entries_path: Path
    pods_path: Path

    async def set_entries(self, entries: list[dict[str, Any]]) -> None:
        before = self.dev.stats.entries_reloads
        write_json(self.entries_path, {"entries": [delegate_entry(os.getuid()), *entries]})
        await eventually(lambda: self.dev.stats.entries_reloads > before, 5,
                         "dev-spire to reload its entries")

    async def set_pods(self, pods: list[dict[str, Any]]) -> None:
        before = self.dev.stats.pods_reloads
        write_json(self.pods_path, {"pods": pods})
        await eventually(lambda: self.dev.stats.pods_reloads > before, 5,
                         "dev-spire to reload its pods")

    def open_x509_streams(self) -> int:
        return self.dev.stats.open_streams["SubscribeToX509SVIDs"]


@pytest.fixture
def work_dir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="verifier-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
async def spire(work_dir: Path) -> AsyncIterator[Spire]:
    entries, pods = work_dir / "entries.json", work_dir / "pods.json"
    write_json(entries, {"entries": [delegate_entry(os.getuid())]})
    write_json(pods, {"pods": []})
    settings = DevSpireSettings(
        socket_path=str(work_dir / "admin.sock"), trust_domain=TD, entries_path=str(entries),
        pods_path=str(pods), authorized_delegates=(DELEGATE,), reload_interval=0.05)
    dev = DevSpire(settings)
    await dev.start()
    client = DelegatedIdentityClient(settings.socket_path, backoff=FAST)
    try:
        yield Spire(dev, client, entries, pods)
    finally:
        await client.close()
        await dev.stop(grace=0)


NOBODY = 65534
SLEEP = ("sleep", "120")
def spawn(pod: FakePod, argv: Sequence[str] = SLEEP, *,
          container_id: str | None = None) -> subprocess.Popen[Any]:
    """A pod process running as nobody, so it never matches the delegate's own
    ``unix:uid:0`` entry."""
    return pod.spawn(argv, container_id=container_id, uid=NOBODY)


def spawn_with_pid(pod: FakePod, pid: int, argv: Sequence[str] = SLEEP,
                   attempts: int = 25) -> subprocess.Popen[Any]:
    """Starts ``argv`` in ``pod`` as PID ``pid`` by writing ``pid - 1`` to ns_last_pid right
    before the fork; retries when another process (or thread) takes the number first.
    Skips the test when the kernel refuses."""
    for _ in range(attempts):
        try:
            NS_LAST_PID.write_text(str(pid - 1))
        except OSError as err:
            pytest.skip(f"the kernel refuses writes to {NS_LAST_PID}: {err} "
                        "(needs root with CAP_SYS_ADMIN/CAP_CHECKPOINT_RESTORE in the "
                        "initial PID namespace)")
        proc = spawn(pod, argv)
        if proc.pid == pid:
            return proc
        proc.kill()
        proc.wait()
    pytest.skip(f"could not get PID {pid} back in {attempts} attempts: other processes "
                "kept taking it")


class Recorder:
    """Every state a watch delivers, in order, with the wall time it arrived."""

    def __init__(self, watch: Watch) -> None:
        self.watch = watch
        self.received: list[tuple[float, CacheState]] = []
        self._task = asyncio.ensure_future(self._run())

    async def _run(self) -> None:
        async for state in self.watch:
            self.received.append((time.time(), state))

    @property
    def states(self) -> list[CacheState]:
        return [state for _, state in self.received]

    def ids(self) -> set[str]:
        return {sid for state in self.states for sid in state.spiffe_ids}

    async def stop(self) -> None:
        self.watch.close()
        await asyncio.wait_for(self._task, 5)


def kill(proc: subprocess.Popen[Any]) -> None:
    with contextlib.suppress(ProcessLookupError):
        proc.kill()
    proc.wait()
