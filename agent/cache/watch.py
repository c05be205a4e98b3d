"""Latest-value watches: what a cache user holds, and the versioned state it is handed."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType, TracebackType

from agent.cache.keys import CompositeId, WorkloadKey
from agent.model import X509Svid

__all__ = ["Bundles", "CacheState", "StatePublisher", "Watch", "WatchClosed"]

Bundles = Mapping[str, tuple[bytes, ...]]
"""``spiffe://<td>`` -> that trust domain's CA certificates (DER each)."""

_NO_BUNDLES: Bundles = MappingProxyType({})


class WatchClosed(Exception):
    """The watch was closed (by its holder, or because the cache shut down)."""


@dataclass(frozen=True)
class CacheState:
    """Everything served for one workload at one moment; never changes once made.

    ``version`` grows with every change (unique across the whole cache, so a version never
    names two different states). ``svids`` passed validation, in SPIRE's order (the first
    is the default one); empty means SPIRE issues nothing to this workload (yet).
    ``bundles`` holds the bundles of the SVIDs' own trust domains (and of the configured
    local trust domain); ``federated_bundles`` those of ``federates_with`` that SPIRE has
    sent. ``source`` is the cache entry the SVIDs came from (the workload itself, or the
    shared ``Identity`` in identity mode). ``trust_domain`` is the workload's own trust
    domain (bare name): that of its first SVID, else the agent's (configured or learned
    from the agent's own SVID), else empty when neither is known yet.
    """

    version: int
    svids: tuple[X509Svid, ...]
    bundles: Bundles = field(default_factory=lambda: _NO_BUNDLES)
    federated_bundles: Bundles = field(default_factory=lambda: _NO_BUNDLES)
    federates_with: tuple[str, ...] = ()
    source: CompositeId | None = None
    trust_domain: str = ""

    @property
    def empty(self) -> bool:
        return not self.svids

    @property
    def spiffe_ids(self) -> tuple[str, ...]:
        return tuple(svid.spiffe_id for svid in self.svids)

    def all_bundles(self) -> Bundles:
        """Own and federated bundles together (what the ``ALL`` resource needs)."""
        return MappingProxyType({**self.federated_bundles, **self.bundles})

    def same_content(self, other: CacheState) -> bool:
        """Equal in everything but the version."""
        return (self.svids, dict(self.bundles), dict(self.federated_bundles),
                self.federates_with, self.source, self.trust_domain) == (
                    other.svids, dict(other.bundles), dict(other.federated_bundles),
                    other.federates_with, other.source, other.trust_domain)


class StatePublisher:
    """One workload's latest state: publishing replaces it, waiters get only the newest."""

    def __init__(self, versions: Iterator[int]) -> None:
        self._versions = versions
        self._latest: CacheState | None = None
        # One bare future per waiting reader, resolved on the next change. (An Event per
        # reader, or a task per wait, costs several loop callbacks per wake-up; a rotation
        # wakes every stream's watches at once, so a wake-up must be one callback.)
        self._waiters: set[asyncio.Future[None]] = set()
        self._closed = False

    @property
    def latest(self) -> CacheState | None:
        return self._latest

    @property
    def closed(self) -> bool:
        return self._closed

    def publish(self, svids: tuple[X509Svid, ...], *, bundles: Bundles = _NO_BUNDLES,
                federated_bundles: Bundles = _NO_BUNDLES, federates_with: tuple[str, ...] = (),
                source: CompositeId | None = None, trust_domain: str = ""
                ) -> CacheState | None:
        """Makes a new state current unless it equals the current one; returns it if new."""
        if self._closed:
            return None
        candidate = CacheState(0, svids, MappingProxyType(dict(bundles)),
                               MappingProxyType(dict(federated_bundles)), federates_with, source,
                               trust_domain)
        if self._latest is not None and self._latest.same_content(candidate):
            return None
        state = dataclasses.replace(candidate, version=next(self._versions))
        self._latest = state
        self._wake()
        return state

    def close(self) -> None:
        self._closed = True
        self._wake()

    def _wake(self) -> None:
        waiters, self._waiters = self._waiters, set()
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)

    async def changed(self, also: asyncio.Future[None] | None = None) -> None:
        """Returns after the next publish or close (or once ``also`` is resolved)."""
        waiter = also if also is not None else asyncio.get_running_loop().create_future()
        self._waiters.add(waiter)
        try:
            await waiter
        finally:
            self._waiters.discard(waiter)


class Watch:
    """A handle on one workload's state, in the style of go-control-plane's watches.

    ``await next(after_version)`` returns the newest state whose version is greater than
    ``after_version`` (0: whatever is current), waiting for one if need be. States in
    between are skipped: a slow reader sees the newest, never a backlog. ``close()`` (or
    leaving ``async with``) releases the cache entry; pending and later ``next`` calls
    raise :class:`WatchClosed`.
    """

    def __init__(self, key: WorkloadKey, publisher: StatePublisher,
                 on_close: Callable[[Watch], None]) -> None:
        self.key = key
        self._publisher = publisher
        self._on_close: Callable[[Watch], None] | None = on_close
        self._closed = False
        self._waiter: asyncio.Future[None] | None = None

    @property
    def closed(self) -> bool:
        return self._closed or self._publisher.closed

    def latest(self) -> CacheState | None:
        """The current state without waiting (None before the first one)."""
        return self._publisher.latest

    async def next(self, after_version: int = 0) -> CacheState:
        publisher = self._publisher
        while True:
            if self._closed:
                raise WatchClosed(f"watch on {self.key} is closed")
            if publisher.closed:
                raise WatchClosed("the cache entry was closed")
            latest = publisher.latest
            if latest is not None and latest.version > after_version:
                return latest
            # One future, resolved by the publisher's next change or by close().
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await publisher.changed(self._waiter)
            finally:
                self._waiter = None

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)
        on_close, self._on_close = self._on_close, None
        if on_close is not None:
            on_close(self)

    async def __aiter__(self) -> AsyncIterator[CacheState]:
        """Each newer state in turn (latest-value: intermediate ones may be skipped);
        ends when the watch is closed."""
        version = 0
        while True:
            try:
                state = await self.next(version)
            except WatchClosed:
                return
            version = state.version
            yield state

    async def __aenter__(self) -> Watch:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        self.close()

    def __repr__(self) -> str:
        latest = self._publisher.latest
        return (f"Watch({self.key}, version={latest.version if latest else 0}, "
                f"closed={self.closed})")
