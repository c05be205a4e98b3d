"""Where the cache gets verified SVID updates and bundles: the seam between it and SPIRE."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Sequence
from typing import Protocol

from agent.attest.procfs import ProcReader
from agent.attest.verifier import (
    PodScans,
    PodTarget,
    ProcessTarget,
    VerifiedUpdate,
    VerifierSettings,
    VerifierStats,
    X509Verifier,
)
from agent.cache.keys import WorkloadKey, WorkloadUid
from agent.clock import Clock
from agent.errors import AttestationError
from agent.model import Selector, X509Bundles, X509SvidUpdate

__all__ = ["SpireClient", "SpireSource", "SvidSource", "VerifiedStream"]


class VerifiedStream(Protocol):
    """Verified updates of one workload (what :class:`X509Verifier` is).

    ``__anext__`` must be cancellation-safe; ``wait_orphaned`` returns once no live
    process can carry the workload's subscription (and the stream ends or waits).
    """

    def __aiter__(self) -> VerifiedStream: ...

    async def __anext__(self) -> VerifiedUpdate: ...

    async def wait_orphaned(self) -> None: ...

    async def aclose(self) -> None: ...


class SvidSource(Protocol):
    """What the cache needs from below: per-workload verified streams and the bundles."""

    def workload(self, key: WorkloadKey, *, pid: int | None = None,
                 pidfd: int | None = None) -> VerifiedStream:
        """A new stream for ``key``. ``pid``/``pidfd``: a process of the workload pinned
        at accept time (for a ``ProcessKey`` the pidfd alone), to be attested first."""
        ...

    def bundles(self) -> AsyncIterator[X509Bundles]: ...

    def has_live_process(self, key: WorkloadKey) -> bool: ...


class SpireClient(Protocol):
    """The parts of :class:`agent.spire.DelegatedIdentityClient` used here."""

    def subscribe_x509_svids(
        self, *, pid: int | None = None, selectors: Sequence[Selector] | None = None
    ) -> AsyncIterator[X509SvidUpdate]: ...

    def subscribe_x509_bundles(self) -> AsyncIterator[X509Bundles]: ...


class SpireSource:
    """The production source: SPIRE's Delegated Identity API through attest-then-re-verify.

    ``stats`` aggregates every verifier's counters (``pid_reuse_detected`` and the rest).
    """

    def __init__(self, client: SpireClient, reader: ProcReader, *, clock: Clock,
                 settings: VerifierSettings | None = None,
                 stats: VerifierStats | None = None,
                 logger: logging.Logger | None = None) -> None:
        self._client = client
        self._reader = reader
        self._clock = clock
        self._settings = settings if settings is not None else VerifierSettings()
        self.stats = stats if stats is not None else VerifierStats()
        self._log = logger
        # One for every verifier: a burst of pod lookups shares /proc scans.
        self._scans = PodScans(reader)

    def workload(self, key: WorkloadKey, *, pid: int | None = None,
                 pidfd: int | None = None) -> X509Verifier:
        target: PodTarget | ProcessTarget
        if isinstance(key, WorkloadUid):
            target = PodTarget(key.pod_uid, pid=pid, pidfd=pidfd, container_id=key.container_id)
        else:
            target = ProcessTarget(key.pid, pidfd=pidfd, start_time=key.start_time)
        return X509Verifier(self._client, self._reader, target, clock=self._clock,
                            settings=self._settings, stats=self.stats, logger=self._log,
                            scans=self._scans)

    def bundles(self) -> AsyncIterator[X509Bundles]:
        return self._client.subscribe_x509_bundles()

    def has_live_process(self, key: WorkloadKey) -> bool:
        if isinstance(key, WorkloadUid):
            pids = self._reader.pids_of_pod(key.pod_uid)
            if key.container_id is None:
                return bool(pids)
            for pid in pids:
                try:
                    if self._reader.cgroup(pid).container_id == key.container_id:
                        return True
                except AttestationError:
                    continue
            return False
        try:
            return self._reader.identity(key.pid).start_time == key.start_time
        except AttestationError:
            return False
