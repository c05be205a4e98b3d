"""An injectable clock (wall time, monotonic time, sleeping) and a manual one for tests."""

from __future__ import annotations

import asyncio
import heapq
import itertools
import time
from datetime import UTC, datetime
from typing import Protocol

__all__ = ["Clock", "ManualClock", "SystemClock", "utc_now"]


class Clock(Protocol):
    """What time-dependent code is given instead of reading ``time`` itself.

    ``time`` is wall-clock seconds since the epoch (certificate validity is wall time);
    ``monotonic`` never jumps (grace periods, intervals); ``sleep`` waits on this clock, so
    a manual clock decides when sleepers wake.
    """

    def time(self) -> float: ...

    def monotonic(self) -> float: ...

    async def sleep(self, seconds: float) -> None: ...


def utc_now(clock: Clock) -> datetime:
    """The clock's wall time as an aware UTC datetime."""
    return datetime.fromtimestamp(clock.time(), UTC)


class SystemClock:
    """The real clock."""

    def time(self) -> float:
        return time.time()

    def monotonic(self) -> float:
        return time.monotonic()

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(max(seconds, 0.0))

    def __repr__(self) -> str:
        return "SystemClock()"


class ManualClock:
    """A clock that moves only when told to: ``advance`` wakes the sleepers that are due.

    Sleepers wake in deadline order; ``advance`` only resolves their futures, so the woken
    tasks run once the test yields to the event loop. ``sleepers`` and ``next_deadline``
    let a test see what the code under test is waiting for.
    """

    def __init__(self, start: float | datetime = 1_780_000_000.0) -> None:
        self._wall = start.timestamp() if isinstance(start, datetime) else float(start)
        self._mono = 1000.0
        self._seq = itertools.count()
        self._heap: list[tuple[float, int, asyncio.Future[None]]] = []

    def time(self) -> float:
        return self._wall

    def monotonic(self) -> float:
        return self._mono

    def now(self) -> datetime:
        return datetime.fromtimestamp(self._wall, UTC)

    async def sleep(self, seconds: float) -> None:
        if seconds <= 0:
            await asyncio.sleep(0)
            return
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        heapq.heappush(self._heap, (self._mono + seconds, next(self._seq), future))
        try:
            await future
        finally:
            future.cancel()  # no-op when done; marks a cancelled sleeper for removal

    def advance(self, seconds: float) -> None:
        """Moves both time bases forward and wakes every sleeper now due."""
        if seconds < 0:
            raise ValueError("a clock does not go backwards")
        self._wall += seconds
        self._mono += seconds
        while self._heap and self._heap[0][0] <= self._mono:
            _, _, future = heapq.heappop(self._heap)
            if not future.done():
                future.set_result(None)

    def _prune(self) -> None:
        self._heap = [item for item in self._heap if not item[2].done()]
        heapq.heapify(self._heap)

    @property
    def sleepers(self) -> int:
        """How many tasks are sleeping on this clock right now."""
        self._prune()
        return len(self._heap)

    @property
    def next_deadline(self) -> float | None:
        """Seconds until the earliest sleeper is due, or None when nobody sleeps."""
        self._prune()
        return self._heap[0][0] - self._mono if self._heap else None

    def __repr__(self) -> str:
        return f"ManualClock({self.now().isoformat()})"
