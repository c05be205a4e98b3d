"""Warns when an SVID in use has lived 80% of its life without SPIRE rotating it."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from agent.clock import Clock
from agent.spire.validation import VerifiedSvid

__all__ = ["ExpiryMonitor"]

_LOG = logging.getLogger("spiffe_delegate.cache")


@dataclass
class _Tracked:
    label: str
    svids: dict[str, VerifiedSvid]  # fingerprint -> svid
    on_expiry: Callable[[], None]
    warned: set[str]
    expired: set[str]
    recheck_at: float | None = None
    on_recheck: Callable[[], None] | None = None


def _deadline(svid: VerifiedSvid, fraction: float) -> float:
    start, end = svid.not_before.timestamp(), svid.not_after.timestamp()
    return start + fraction * (end - start)


class ExpiryMonitor:
    """Tracks the SVIDs each owner serves; one task wakes at the next due moment.

    SPIRE rotates at half the lifetime by default, so an SVID still in use at
    ``fraction`` (0.8) of its life means rotation is stuck: that is logged as a warning and
    counted (``warnings``), once per certificate and owner. At the SVID's ``not_after`` the
    owner's ``on_expiry`` is called so it can stop serving it. An owner holding back an
    SVID that is not valid yet names the moment it becomes valid (``recheck_at``), and its
    ``on_recheck`` is called then, so it is served without waiting for another message.
    """

    def __init__(self, clock: Clock, *, fraction: float = 0.8,
                 logger: logging.Logger | None = None) -> None:
        if not 0 < fraction < 1:
            raise ValueError(f"expiry warning fraction must be in (0, 1), got {fraction}")
        self._clock = clock
        self._fraction = fraction
        self._log = logger if logger is not None else _LOG
        self._owners: dict[object, _Tracked] = {}
        self._wakeup = asyncio.Event()
        self.warnings = 0

    def track(self, owner: object, label: str, svids: Mapping[str, VerifiedSvid],
              on_expiry: Callable[[], None], *, recheck_at: float | None = None,
              on_recheck: Callable[[], None] | None = None) -> None:
        """Replaces ``owner``'s SVIDs (SPIFFE ID -> verified SVID) with ``svids``, and its
        pending recheck (wall time) with ``recheck_at``."""
        by_fingerprint = {v.fingerprint: v for v in svids.values()}
        previous = self._owners.get(owner)
        warned = previous.warned & set(by_fingerprint) if previous else set()
        expired = previous.expired & set(by_fingerprint) if previous else set()
        self._owners[owner] = _Tracked(label, by_fingerprint, on_expiry, warned, expired,
                                       recheck_at if on_recheck is not None else None,
                                       on_recheck)
        self._wakeup.set()

    def forget(self, owner: object) -> None:
        self._owners.pop(owner, None)

    def check(self) -> None:
        """Does whatever is due at the clock's current time."""
        now = self._clock.time()
        for tracked in list(self._owners.values()):
            due_expiry = False
            for fingerprint, svid in tracked.svids.items():
                if fingerprint not in tracked.warned and now >= _deadline(svid, self._fraction):
                    tracked.warned.add(fingerprint)
                    self.warnings += 1
                    self._log.warning(
                        "X.509-SVID for %s served to %s (cert %s) has passed %d%% of its "
                        "lifetime without a rotation from SPIRE; it expires at %s. Check that "
                        "the SPIRE agent can reach its server and is rotating SVIDs",
                        svid.svid.spiffe_id, tracked.label, fingerprint,
                        round(self._fraction * 100), _iso(svid.not_after))
                if fingerprint not in tracked.expired and now > svid.not_after.timestamp():
                    tracked.expired.add(fingerprint)
                    due_expiry = True
            if due_expiry:
                tracked.on_expiry()
            if tracked.recheck_at is not None and now >= tracked.recheck_at:
                tracked.recheck_at = None
                if tracked.on_recheck is not None:
                    tracked.on_recheck()

    def next_due(self) -> float | None:
        """Wall time of the next warning or expiry, or None."""
        times: list[float] = []
        for tracked in self._owners.values():
            for fingerprint, svid in tracked.svids.items():
                if fingerprint not in tracked.warned:
                    times.append(_deadline(svid, self._fraction))
                if fingerprint not in tracked.expired:
                    # Strictly after not_after: the SVID is still valid at not_after itself.
                    times.append(svid.not_after.timestamp() + 0.001)
            if tracked.recheck_at is not None:
                times.append(tracked.recheck_at)
        return min(times) if times else None

    async def _sleep_until(self, due: float) -> None:
        # The delay is taken when the sleep starts, not when its task was made: the clock
        # may have moved in between (a test's clock jumps; a busy loop runs late).
        await self._clock.sleep(max(due - self._clock.time(), 0.0))

    async def run(self) -> None:
        """Runs until cancelled."""
        while True:
            self.check()
            self._wakeup.clear()
            due = self.next_due()
            wake = asyncio.ensure_future(self._wakeup.wait())
            waits: set[asyncio.Future[Any]] = {wake}
            if due is not None:
                waits.add(asyncio.ensure_future(self._sleep_until(due)))
            try:
                await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for waiting in waits:
                    waiting.cancel()


def _iso(moment: datetime) -> str:
    return moment.isoformat()
