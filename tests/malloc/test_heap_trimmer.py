"""HeapTrimmer: trims only after the resident set grew past its threshold."""

from __future__ import annotations

import asyncio

from agent.malloc import HeapTrimmer


class FakeProcess:
    def __init__(self, resident_kb: int) -> None:
        self.resident_kb = resident_kb
        self.freed_by_trim = 0
        self.trims = 0

    def read(self) -> int:
        return self.resident_kb

    def trim(self, pad: int) -> int:
        assert pad == 0
        self.trims += 1
        self.resident_kb -= self.freed_by_trim
        return 1


def test_trims_only_after_growth_past_the_threshold() -> None:
    process = FakeProcess(60_000)
    trimmer = HeapTrimmer(threshold_kb=2048, trim=process.trim, resident_kb=process.read)
    trimmer._after_kb = process.read()  # as run() does first
    assert trimmer.maybe_trim() == 0
    process.resident_kb += 2000  # below the threshold
    assert trimmer.maybe_trim() == 0
    assert process.trims == 0
    process.resident_kb += 30_000
    process.freed_by_trim = 20_000
    assert trimmer.maybe_trim() == 20_000
    assert (trimmer.trims, trimmer.released_kb) == (1, 20_000)
    # Measured from what was left after the trim: no second trim without new growth.
    assert trimmer.maybe_trim() == 0
    assert process.trims == 1


def test_no_libc_trim_means_nothing_to_run() -> None:
    trimmer = HeapTrimmer(trim=None, resident_kb=lambda: 0)
    trimmer._trim = None
    assert not trimmer.available
    assert trimmer.maybe_trim() == 0
    asyncio.run(asyncio.wait_for(trimmer.run(), 1))  # returns at once


async def test_runs_on_its_interval_until_cancelled() -> None:
    process = FakeProcess(10_000)
    trimmer = HeapTrimmer(interval=0.01, threshold_kb=1, trim=process.trim,
                          resident_kb=process.read)
    task = asyncio.create_task(trimmer.run())
    await asyncio.sleep(0.02)
    process.resident_kb += 5_000
    process.freed_by_trim = 4_000
    for _ in range(200):
        if trimmer.trims:
            break
        await asyncio.sleep(0.01)
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    assert trimmer.trims == 1 and trimmer.released_kb == 4_000


def test_the_real_trim_runs() -> None:
    trimmer = HeapTrimmer(threshold_kb=0)
    if not trimmer.available:
        return  # not glibc
    junk = [bytes(100_000) for _ in range(200)]
    del junk
    assert trimmer.maybe_trim() >= 0
    assert trimmer.trims == 1
