"""Identity mode: pods with the same SPIFFE ID(s) share one subscription, carried by one pod.

A group is keyed by :class:`~agent.cache.keys.Identity`. Its members are workloads whose
own attestation returned exactly that ID set. One member's verified stream — the
*carrier* — feeds the group's SVIDs. The supervisor keeps a carrier:

* when the carrier is orphaned (its pod has no live process), ends, stops being a member,
  or starts answering with a different ID set (drift: entries changed), a candidate
  member with a live process gets its own stream; the group switches only once that
  stream has delivered a verified answer with the group's ID set. Until then the old
  carrier stays open (it may recover, and then it is kept) and the group keeps serving
  the last good SVIDs: there is no moment without one;
* on drift every member is asked to attest again, since registration entries changed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import Any, Protocol

from agent.attest.verifier import VerifiedUpdate
from agent.cache.feed import Feed
from agent.cache.keys import Identity, WorkloadKey
from agent.cache.sources import SvidSource, VerifiedStream
from agent.cache.stats import CacheStats
from agent.clock import Clock

__all__ = ["IdentityGroup", "Member"]


class Member(Protocol):
    """A workload in a group (the cache's per-workload view)."""

    @property
    def key(self) -> WorkloadKey: ...

    @property
    def pid(self) -> int | None: ...

    @property
    def pidfd(self) -> int | None: ...

    def request_reattest(self) -> None: ...


def _id_set(update: VerifiedUpdate) -> tuple[str, ...]:
    return tuple(sorted(set(update.spiffe_ids)))


class _Leg:
    """One member's stream, read by at most one pending task at a time."""

    def __init__(self, member: Member, stream: VerifiedStream) -> None:
        self.member = member
        self.stream = stream
        self.orphaned = False
        self.dead = False
        self.drifted = False
        self._next: asyncio.Task[VerifiedUpdate] | None = None
        self._orphan: asyncio.Task[None] | None = None

    @property
    def usable(self) -> bool:
        return not (self.dead or self.orphaned or self.drifted)

    async def _read(self) -> VerifiedUpdate:
        return await self.stream.__anext__()

    def next_task(self) -> asyncio.Task[VerifiedUpdate] | None:
        if self.dead:
            return None
        if self._next is None:
            self._next = asyncio.create_task(self._read())
        return self._next

    def orphan_task(self) -> asyncio.Task[None] | None:
        if self.dead or self.orphaned:
            return None
        if self._orphan is None:
            self._orphan = asyncio.create_task(self.stream.wait_orphaned())
        return self._orphan

    def take(self) -> VerifiedUpdate | None:
        task, self._next = self._next, None
        if task is None or task.cancelled():
            return None
        if task.exception() is not None:
            self.dead = True
            return None
        update = task.result()
        self.orphaned = False
        return update

    def took_orphan(self) -> None:
        self._orphan = None
        self.orphaned = True

    async def close(self) -> None:
        for task in (self._next, self._orphan):
            if task is not None:
                task.cancel()
        self._next = self._orphan = None
        with contextlib.suppress(Exception):
            await self.stream.aclose()


class IdentityGroup:
    """Members sharing one Identity, its feed, and the carrier supervisor."""

    def __init__(self, key: Identity, feed: Feed, source: SvidSource, *, clock: Clock,
                 rescan_interval: float, stats: CacheStats, logger: logging.Logger,
                 on_drift: Callable[[IdentityGroup], None]) -> None:
        self.key = key
        self.feed = feed
        self._source = source
        self._clock = clock
        self._rescan = rescan_interval
        self._stats = stats
        self._log = logger
        self._on_drift = on_drift
        self.members: dict[WorkloadKey, Member] = {}
        self.carrier: _Leg | None = None
        self.linger: asyncio.Task[None] | None = None
        self._changed = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    @property
    def carrier_key(self) -> WorkloadKey | None:
        return self.carrier.member.key if self.carrier is not None else None

    def join(self, member: Member) -> None:
        self.members[member.key] = member
        self._changed.set()

    def leave(self, member: Member) -> None:
        if self.members.get(member.key) is member:
            del self.members[member.key]
            self._changed.set()

    def adopt(self, member: Member, stream: VerifiedStream, first: VerifiedUpdate) -> None:
        """Makes ``member``'s already verified stream the carrier (the group is new)."""
        if self.carrier is not None:
            raise RuntimeError(f"{self.key} already has a carrier")
        self.carrier = _Leg(member, stream)
        self._log.info("%s: %s carries the shared SPIRE subscription", self.key, member.key)
        self.feed.apply_svids(first.update)
        self._task = asyncio.create_task(self._supervise(), name=f"carrier {self.key}")

    async def close(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        carrier, self.carrier = self.carrier, None
        if carrier is not None:
            await carrier.close()
        self.feed.close()

    # --- the supervisor --------------------------------------------------------------------

    def _pick(self, exclude: set[WorkloadKey]) -> _Leg | None:
        for key, member in self.members.items():
            if key in exclude:
                continue
            try:
                live = self._source.has_live_process(key)
            except Exception:  # a /proc hiccup must not stop the handover
                live = False
            if live:
                return _Leg(member, self._source.workload(key, pid=member.pid,
                                                          pidfd=member.pidfd))
        return None

    def _matches(self, update: VerifiedUpdate) -> bool:
        return _id_set(update) == self.key.spiffe_ids

    async def _supervise(self) -> None:
        candidate: _Leg | None = None
        tried: set[WorkloadKey] = set()
        try:
            while True:
                carrier = self.carrier
                assert carrier is not None
                need = not carrier.usable or carrier.member.key not in self.members
                if need and candidate is None:
                    candidate = self._pick(tried | {carrier.member.key})
                    if candidate is not None:
                        tried.add(candidate.member.key)
                        self._log.info("%s: carrier %s is %s; starting a subscription through "
                                       "%s and switching once it delivers", self.key,
                                       carrier.member.key, _why(carrier, self.members),
                                       candidate.member.key)
                elif not need and candidate is not None:
                    self._log.info("%s: carrier %s recovered; dropping candidate %s",
                                   self.key, carrier.member.key, candidate.member.key)
                    await candidate.close()
                    candidate = None
                waits: dict[asyncio.Future[Any], tuple[_Leg | None, str]] = {}
                for leg in (carrier, candidate):
                    if leg is None:
                        continue
                    if (task := leg.next_task()) is not None:
                        waits[task] = (leg, "answer")
                    if (orphan := leg.orphan_task()) is not None:
                        waits[orphan] = (leg, "orphaned")
                changed = asyncio.ensure_future(self._changed.wait())
                waits[changed] = (None, "members")
                timer: asyncio.Future[None] | None = None
                if need and candidate is None:
                    timer = asyncio.ensure_future(self._clock.sleep(self._rescan))
                    waits[timer] = (None, "timer")
                try:
                    done, _ = await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
                finally:
                    changed.cancel()
                    if timer is not None:
                        timer.cancel()
                if changed in done or (timer is not None and timer in done):
                    self._changed.clear()
                    tried.clear()
                # The carrier's events first: its answer may still be applied before a
                # candidate that delivered at the same moment takes over.
                events = sorted((waits[f] for f in done if waits[f][0] is not None),
                                key=lambda event: event[0] is not carrier)
                for leg, kind in events:
                    if leg is carrier and carrier is self.carrier:
                        if kind == "answer":
                            self._on_carrier_answer(carrier)
                        else:
                            carrier.took_orphan()
                    elif leg is candidate and candidate is not None:
                        if kind == "answer" and self._on_candidate_answer(candidate):
                            self.carrier, candidate = candidate, None
                            tried.clear()
                            await carrier.close()
                        elif kind == "orphaned" or not candidate.usable:
                            await candidate.close()
                            candidate = None
        finally:
            if candidate is not None:
                await candidate.close()

    def _on_carrier_answer(self, carrier: _Leg) -> None:
        update = carrier.take()
        if update is None:
            self._log.info("%s: carrier %s's stream ended", self.key, carrier.member.key)
            return
        if not self._matches(update):
            if not carrier.drifted:
                self._log.warning("%s: carrier %s is now issued %s; it no longer speaks for "
                                  "the group, every member is attested again", self.key,
                                  carrier.member.key, list(update.spiffe_ids) or "nothing")
            carrier.drifted = True
            self._on_drift(self)
            return
        carrier.drifted = False
        self.feed.apply_svids(update.update)

    def _on_candidate_answer(self, candidate: _Leg) -> bool:
        """True when the candidate delivered the group's identity and now carries it."""
        update = candidate.take()
        if update is None:
            return False
        if not self._matches(update):
            candidate.drifted = True
            candidate.member.request_reattest()
            return False
        self._stats.carrier_handovers += 1
        self._log.info("%s: %s now carries the shared SPIRE subscription", self.key,
                       candidate.member.key)
        self.feed.apply_svids(update.update)
        return True


def _why(leg: _Leg, members: dict[WorkloadKey, Member]) -> str:
    if leg.member.key not in members:
        return "no longer a member"
    if leg.dead:
        return "gone"
    if leg.orphaned:
        return "without a live process"
    return "issued another identity"
