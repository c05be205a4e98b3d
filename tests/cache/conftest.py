"""A scripted SvidSource and a manual clock, so cache tests control every answer and second."""

from __future__ import annotations

import asyncio
from collections import defaultdict
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import pytest

from agent.attest.procfs import ProcessIdentity
from agent.attest.verifier import VerifiedUpdate
from agent.cache import CacheSettings, SvidCache, WorkloadKey, WorkloadUid
from agent.clock import ManualClock
from agent.model import X509Bundles, X509Svid, X509SvidUpdate
from tests.spire.pki import NOW, Ca

POD_A = "aaaaaaaa-0000-4000-8000-000000000001"
POD_B = "bbbbbbbb-0000-4000-8000-000000000002"
POD_C = "cccccccc-0000-4000-8000-000000000003"


class FakeStream:
    """One scripted workload stream: the test pushes answers and can orphan it."""

    def __init__(self, key: WorkloadKey) -> None:
        self.key = key
        self.queue: asyncio.Queue[VerifiedUpdate | BaseException] = asyncio.Queue()
        self.orphaned = asyncio.Event()
        self.closed = False

    def __aiter__(self) -> FakeStream:
        return self

    async def __anext__(self) -> VerifiedUpdate:
        if self.closed:
            raise StopAsyncIteration
        item = await self.queue.get()
        if isinstance(item, BaseException):
            raise item
        return item

    async def wait_orphaned(self) -> None:
        await self.orphaned.wait()

    async def aclose(self) -> None:
        self.closed = True

    def push(self, *svids: X509Svid, federates_with: tuple[str, ...] = ()) -> None:
        process = ProcessIdentity(pid=4242, start_time=1, uid=1000,
                                  pod_uid=getattr(self.key, "pod_uid", None),
                                  container_id="c" * 64)
        self.queue.put_nowait(VerifiedUpdate(X509SvidUpdate(svids, federates_with), process))


@dataclass
class FakeSource:
    """Hands out FakeStreams (every call a new one) and one bundle stream."""

    streams: dict[WorkloadKey, list[FakeStream]] = field(
        default_factory=lambda: defaultdict(list))
    live: set[WorkloadKey] = field(default_factory=set)
    bundle_queue: asyncio.Queue[X509Bundles] = field(default_factory=asyncio.Queue)
    bundle_streams: int = 0

    def workload(self, key: WorkloadKey, *, pid: int | None = None,
                 pidfd: int | None = None) -> FakeStream:
        stream = FakeStream(key)
        self.streams[key].append(stream)
        return stream

    async def bundles(self) -> AsyncIterator[X509Bundles]:
        self.bundle_streams += 1
        while True:
            yield await self.bundle_queue.get()

    def has_live_process(self, key: WorkloadKey) -> bool:
        return key in self.live

    def last(self, key: WorkloadKey) -> FakeStream:
        return self.streams[key][-1]

    def open_streams(self) -> list[FakeStream]:
        return [s for streams in self.streams.values() for s in streams if not s.closed]


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock(NOW)


@pytest.fixture
def ca() -> Ca:
    return Ca.root()


@pytest.fixture
def source(ca: Ca) -> FakeSource:
    src = FakeSource()
    src.bundle_queue.put_nowait(ca.bundles())
    return src


@pytest.fixture
async def cache(source: FakeSource, clock: ManualClock) -> AsyncIterator[SvidCache]:
    async with SvidCache(source, clock=clock,
                         settings=CacheSettings(grace_period=30.0)) as svid_cache:
        await svid_cache.wait_for_bundles()
        yield svid_cache


def pod(uid: str = POD_A) -> WorkloadUid:
    return WorkloadUid(uid)
