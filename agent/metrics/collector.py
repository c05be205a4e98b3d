"""A Prometheus collector that reads the agent's own counters and snapshots at scrape time.

Nothing here runs between scrapes: the client, verifier, cache and SDS server keep plain
counters (``ClientStatus``, ``VerifierStats``, ``CacheStats``, ``SdsStats``) for their own
status and tests, and each scrape turns them into metric families. Labels are bounded by
construction: results, reasons, kinds and API names are fixed sets; the one open-ended
label, ``spiffe_id``, is bounded by the identities cached on this node.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Protocol

from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric

from agent.attest.verifier import ATTESTATION_RESULTS, VerifierStats
from agent.cache.keys import CompositeId, Identity, ProcessKey, WorkloadUid
from agent.cache.stats import CacheStats
from agent.clock import Clock
from agent.sds.names import RESOURCE_KINDS
from agent.sds.stats import SdsStats
from agent.spire.client import ClientStatus
from agent.spire.validation import VerifiedSvid
from agent.uds.relay import REJECTIONS

__all__ = [
    "CACHED_KINDS",
    "PUSHED_KINDS",
    "AgentCollector",
    "CacheSource",
    "ClientSource",
    "SdsSource",
    "VerifierSource",
    "kind_of",
]

PREFIX = "spiffe_delegate_"
CACHED_KINDS = ("workload", "identity", "process")
# Kinds a push, ACK or NACK can have (an invalid name is refused, never pushed).
PUSHED_KINDS = tuple(kind for kind in RESOURCE_KINDS if kind != "invalid")


class ClientSource(Protocol):
    """What is read of :class:`agent.spire.client.DelegatedIdentityClient`."""

    @property
    def status(self) -> ClientStatus: ...


class VerifierSource(Protocol):
    """What is read of :class:`agent.cache.SpireSource` (every verifier's counters)."""

    @property
    def stats(self) -> VerifierStats: ...


class CacheSource(Protocol):
    """What is read of :class:`agent.cache.SvidCache`."""

    @property
    def stats(self) -> CacheStats: ...

    def cached_svids(self) -> Mapping[CompositeId, Mapping[str, VerifiedSvid]]: ...


class SdsSource(Protocol):
    """What is read of :class:`agent.sds.server.SdsServer`."""

    @property
    def stats(self) -> SdsStats: ...

    @property
    def rejected_connections(self) -> Mapping[str, int]: ...


def kind_of(key: CompositeId) -> str:
    """The ``kind`` label of a cache entry's composite ID."""
    if isinstance(key, WorkloadUid):
        return "workload"
    if isinstance(key, ProcessKey):
        return "process"
    if isinstance(key, Identity):
        return "identity"
    raise TypeError(f"not a composite ID: {key!r}")


def _by_label(family: CounterMetricFamily | GaugeMetricFamily, known: Iterable[str],
              counts: Mapping[str, int]) -> None:
    """One sample per known label value (0 when unseen, so rates work from the start),
    then one per other value seen."""
    known = tuple(known)
    for value in known:
        family.add_metric([value], counts.get(value, 0))
    for value in sorted(set(counts) - set(known)):
        family.add_metric([value], counts[value])


class AgentCollector:
    """See the module docstring. ``clock`` gives the wall time SVID expiry is measured from."""

    def __init__(self, *, client: ClientSource, source: VerifierSource, cache: CacheSource,
                 sds: SdsSource, clock: Clock) -> None:
        self._client = client
        self._source = source
        self._cache = cache
        self._sds = sds
        self._clock = clock

    def describe(self) -> Iterator[Metric]:
        """The families without samples (the registry checks names without a scrape)."""
        yield from self._families(None)

    def collect(self) -> Iterator[Metric]:
        yield from self._families(self._read())

    # --- the families -------------------------------------------------------------------

    def _read(self) -> _Snapshot:
        return _Snapshot(self._client.status, self._source.stats, self._cache.stats,
                         self._cache.cached_svids(), self._sds.stats,
                         self._sds.rejected_connections, self._clock.time())

    def _families(self, snap: _Snapshot | None) -> Iterator[Metric]:
        yield from self._spire(snap)
        yield from self._attestation(snap)
        yield from self._svids(snap)
        yield from self._sds_families(snap)

    @staticmethod
    def _spire(snap: _Snapshot | None) -> Iterator[Metric]:
        connected = GaugeMetricFamily(
            PREFIX + "spire_connected",
            "1 when the newest outcome of any call to the SPIRE agent was a success, else 0")
        reconnects = CounterMetricFamily(
            PREFIX + "spire_reconnects",
            "Times a SPIRE stream was opened again after a retryable failure")
        if snap is not None:
            connected.add_metric([], 1 if snap.client.connected else 0)
            reconnects.add_metric([], snap.client.reconnects)
        yield connected
        yield reconnects

    @staticmethod
    def _attestation(snap: _Snapshot | None) -> Iterator[Metric]:
        attestations = CounterMetricFamily(
            PREFIX + "attestations",
            "Workload attestations (a SPIRE answer about a pinned PID) by result: ok, "
            "unmatched (no registration entry), process_gone, failed (re-verification), "
            "spire_error", labels=["result"])
        reuse = CounterMetricFamily(
            PREFIX + "pid_reuse_detected",
            "Pinned processes whose PID was found naming another process while subscribed")
        if snap is not None:
            _by_label(attestations, ATTESTATION_RESULTS, snap.verifier.attestations)
            reuse.add_metric([], snap.verifier.pid_reuse_detected)
        yield attestations
        yield reuse

    @staticmethod
    def _svids(snap: _Snapshot | None) -> Iterator[Metric]:
        cached = GaugeMetricFamily(
            PREFIX + "svids_cached",
            "X.509-SVIDs being served from the cache, by the kind of the entry's composite "
            "ID (workload: per pod; process: a bare process; identity: shared per SPIFFE ID)",
            labels=["kind"])
        expiry = GaugeMetricFamily(
            PREFIX + "svid_expiry_seconds",
            "Seconds until the cached X.509-SVID for a SPIFFE ID expires (the soonest, when "
            "several entries hold one); negative once expired", labels=["spiffe_id"])
        rotations = CounterMetricFamily(
            PREFIX + "svid_rotations",
            "Times a cache entry's X.509-SVID for a SPIFFE ID was replaced by a new "
            "certificate")
        rejected = CounterMetricFamily(
            PREFIX + "svids_rejected",
            "X.509-SVIDs from SPIRE that failed validation and were never served, by reason",
            labels=["reason"])
        if snap is not None:
            per_kind: Counter[str] = Counter()
            soonest: dict[str, float] = {}
            for key, svids in snap.cached.items():
                per_kind[kind_of(key)] += len(svids)
                for spiffe_id, verified in svids.items():
                    ends = verified.not_after.timestamp()
                    soonest[spiffe_id] = min(ends, soonest.get(spiffe_id, ends))
            _by_label(cached, CACHED_KINDS, per_kind)
            for spiffe_id, ends in sorted(soonest.items()):
                expiry.add_metric([spiffe_id], ends - snap.now)
            rotations.add_metric([], snap.cache.rotations)
            _by_label(rejected, (), snap.cache.svids_rejected)
        yield cached
        yield expiry
        yield rotations
        yield rejected

    @staticmethod
    def _sds_families(snap: _Snapshot | None) -> Iterator[Metric]:
        open_now = GaugeMetricFamily(
            PREFIX + "sds_streams_open",
            "SDS calls open now (StreamSecrets and DeltaSecrets streams, and FetchSecrets "
            "calls still waiting)")
        opened = CounterMetricFamily(
            PREFIX + "sds_streams_opened", "SDS streams opened, by API (sotw or delta)",
            labels=["api"])
        pushes = CounterMetricFamily(
            PREFIX + "sds_pushes",
            "Resources sent on SDS streams (a delta removal included), by resource kind",
            labels=["resource"])
        acks = CounterMetricFamily(
            PREFIX + "sds_acks", "Resources ACKed by SDS clients, by resource kind",
            labels=["resource"])
        nacks = CounterMetricFamily(
            PREFIX + "sds_nacks", "Resources NACKed (refused) by SDS clients, by resource kind",
            labels=["resource"])
        rejected = CounterMetricFamily(
            PREFIX + "sds_connections_rejected",
            "Connections to the SDS socket closed before reaching gRPC, by reason",
            labels=["reason"])
        over_limits = CounterMetricFamily(
            PREFIX + "sds_requests_over_limits",
            "SDS requests refused for going over --sds-max-names or --sds-max-name-bytes "
            "(too many names in one request, or a name too long)")
        if snap is not None:
            stats = snap.sds
            _by_label(rejected, REJECTIONS, snap.rejected_connections)
            over_limits.add_metric([], stats.over_limits)
            open_now.add_metric([], stats.streams_active)
            opened.add_metric(["sotw"], stats.streams_opened)
            opened.add_metric(["delta"], stats.delta_streams_opened)
            _by_label(pushes, PUSHED_KINDS, stats.pushes_by_kind)
            _by_label(acks, PUSHED_KINDS, stats.acks_by_kind)
            _by_label(nacks, PUSHED_KINDS, stats.nacks_by_kind)
        yield open_now
        yield opened
        yield pushes
        yield acks
        yield nacks
        yield rejected
        yield over_limits


@dataclass(frozen=True)
class _Snapshot:
    """Everything one scrape reads, read once."""

    client: ClientStatus
    verifier: VerifierStats
    cache: CacheStats
    cached: Mapping[CompositeId, Mapping[str, VerifiedSvid]]
    sds: SdsStats
    rejected_connections: Mapping[str, int]
    now: float
