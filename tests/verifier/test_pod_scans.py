"""PodScans: lookups made at the same time share /proc scans, yet never a scan that began
before they were made."""

from __future__ import annotations

import asyncio
import threading
from typing import Any, cast

import pytest

from agent.attest.procfs import ProcReader
from agent.attest.verifier import PodScans

POD_A = "11111111-2222-3333-4444-555555555555"
POD_B = "66666666-7777-8888-9999-000000000000"


class FakeReader:
    """``pods()`` answers whatever ``state`` holds when the scan runs; ``hold`` keeps a
    scan from finishing until released."""

    def __init__(self) -> None:
        self.state: dict[str, list[int]] = {POD_A: [10, 11], POD_B: [20]}
        self.calls = 0
        self.hold = threading.Event()
        self.hold.set()
        self.started = threading.Event()
        self.error: Exception | None = None

    def pods(self) -> dict[str, list[int]]:
        self.calls += 1
        snapshot = {uid: list(pids) for uid, pids in self.state.items()}
        self.started.set()
        self.hold.wait(10)
        if self.error is not None:
            raise self.error
        return snapshot


def scans_over(reader: FakeReader) -> PodScans:
    return PodScans(cast(ProcReader, reader))


async def test_a_burst_of_lookups_shares_one_scan() -> None:
    reader = FakeReader()
    scans = scans_over(reader)
    uids = [POD_A, POD_B] * 50
    answers = await asyncio.gather(*(scans.pids_of_pod(uid) for uid in uids))
    assert answers == [[10, 11], [20]] * 50
    assert reader.calls == scans.scans == 1


async def test_a_lookup_made_during_a_scan_waits_for_the_next_one() -> None:
    reader = FakeReader()
    reader.hold.clear()
    scans = scans_over(reader)
    first = asyncio.create_task(scans.pids_of_pod(POD_A))
    await asyncio.to_thread(reader.started.wait, 10)
    reader.state[POD_A] = [10, 11, 12]  # a process that appeared after the scan began
    late = [asyncio.create_task(scans.pids_of_pod(POD_A)) for _ in range(5)]
    await asyncio.sleep(0)
    reader.hold.set()
    assert await first == [10, 11]
    assert [await task for task in late] == [[10, 11, 12]] * 5
    assert reader.calls == 2


async def test_an_unknown_pod_has_no_processes() -> None:
    assert await scans_over(FakeReader()).pids_of_pod(
        "aaaaaaaa-bbbb-cccc-dddd-eeeeeeeeeeee") == []


async def test_a_cancelled_lookup_leaves_the_others_their_answer() -> None:
    reader = FakeReader()
    reader.hold.clear()
    scans = scans_over(reader)
    cancelled = asyncio.create_task(scans.pids_of_pod(POD_A))
    other = asyncio.create_task(scans.pids_of_pod(POD_B))
    await asyncio.to_thread(reader.started.wait, 10)
    cancelled.cancel()
    reader.hold.set()
    assert await other == [20]
    with pytest.raises(asyncio.CancelledError):
        await cancelled


async def test_a_failed_scan_fails_its_lookups_and_the_next_scan_runs() -> None:
    reader = FakeReader()
    reader.error = OSError("proc is gone")
    scans = scans_over(reader)
    results: tuple[Any, ...] = await asyncio.gather(
        scans.pids_of_pod(POD_A), scans.pids_of_pod(POD_B), return_exceptions=True)
    assert all(isinstance(r, OSError) for r in results)
    reader.error = None
    assert await scans.pids_of_pod(POD_A) == [10, 11]


async def test_a_malformed_pod_uid_is_refused() -> None:
    with pytest.raises(ValueError, match="not a pod UID"):
        await scans_over(FakeReader()).pids_of_pod("not-a-uid")
