"""The SVID cache between SPIRE (through attest-then-re-verify) and its users, e.g. SDS.

The interface for users (in the spirit of go-control-plane's cache: the user never learns
where SVIDs come from)::

    cache = SvidCache(SpireSource(client, ProcReader(), clock=clock), clock=clock,
                      settings=CacheSettings(key_mode=KeyMode.WORKLOAD))
    async with cache:
        watch = cache.watch(WorkloadUid(pod_uid))          # or ProcessKey(pid, start_time)
        state = await watch.next()                         # the first state (may be empty)
        state = await watch.next(after_version=state.version)  # waits for a newer one
        watch.close()                                      # or: async with watch: ...

* ``watch(key, *, pid=None, pidfd=None) -> Watch``: ``key`` names the *workload* asking:
  ``WorkloadUid(pod uid)`` for a pod, ``ProcessKey(pid, start_time)`` for a process
  outside any pod (``key_for_process`` picks one from a ``ProcessIdentity``). When the
  caller is itself that workload (the proxy asking for its own identity), pass its
  ``PeerCredentials`` pid and accept-time pidfd: that exact process is attested first.
* ``await Watch.next(after_version=0) -> CacheState``: the newest state whose version is
  greater than ``after_version``; it waits when there is none. Latest value, not a queue:
  a reader that falls behind gets the newest state and never a backlog. Versions are
  unique across the cache, so a version string can be handed to a client (an SDS
  ``version_info``) and compared later. ``Watch.latest()`` peeks without waiting;
  ``async for state in watch`` iterates newer states until the watch is closed.
* ``CacheState(version, svids, bundles, federated_bundles, federates_with, source)``:
  immutable; ``svids`` have passed validation (first = default SVID); ``bundles`` are the
  SVIDs' own (and the local) trust domains' bundles, ``federated_bundles`` those SPIRE
  sent for ``federates_with``. An *empty* state (no SVIDs) means SPIRE matched no
  registration entry: watchers simply wait for the next state. Before the workload has
  been attested at all there is no state, and ``next()`` waits.
* ``Watch.close()``: releases the entry. Entries are reference counted: an entry (and its
  SPIRE subscription) lives while a watch is open, then lingers ``grace_period`` seconds
  (a reconnecting client finds it warm), then is closed. After ``close()``, or when the
  cache is closed, ``next()`` raises ``WatchClosed``.

Behind a watch:

* ``KeyMode.WORKLOAD`` (default): one entry per workload, each with its own by-PID
  subscription kept honest by :class:`agent.attest.verifier.X509Verifier`.
* ``KeyMode.IDENTITY``: each workload is attested on its own (a by-PID subscription read
  until its first verified non-empty answer, then closed), then joins the entry of its
  exact SPIFFE ID set, ``Identity(ids)``; that entry has ONE long-lived subscription,
  carried by one member pod and handed to another without a gap (see
  :mod:`agent.cache.identity`). Members are attested again every ``reattest_interval``.
* One shared X.509 bundle stream feeds every entry; every SVID passes an ``SvidGate``
  (rejected ones are never stored, and the last good one stays in use); an expiry
  monitor warns and counts (``stats.expiry_warnings``) when an SVID in use passes 80% of
  its lifetime without a rotation, and stops serving it once it has expired.
* Counters: ``cache.stats`` (``CacheStats``: rejections by reason, rotations, ...);
  PID-reuse and attestation counters live in the source's ``VerifierStats``
  (``SpireSource.stats.pid_reuse_detected``, ``.attestations``). Snapshots:
  ``workloads()``, ``groups()``, and ``cached_svids()`` (each entry's SVIDs being served).
"""

from agent.cache.expiry import ExpiryMonitor
from agent.cache.keys import (
    CompositeId,
    Identity,
    KeyMode,
    ProcessKey,
    WorkloadKey,
    WorkloadUid,
    key_for_process,
)
from agent.cache.sources import SpireSource, SvidSource, VerifiedStream
from agent.cache.stats import CacheStats
from agent.cache.store import CacheSettings, GroupStatus, SvidCache, WorkloadStatus
from agent.cache.watch import CacheState, Watch, WatchClosed

__all__ = [
    "CacheSettings",
    "CacheState",
    "CacheStats",
    "CompositeId",
    "ExpiryMonitor",
    "GroupStatus",
    "Identity",
    "KeyMode",
    "ProcessKey",
    "SpireSource",
    "SvidCache",
    "SvidSource",
    "VerifiedStream",
    "Watch",
    "WatchClosed",
    "WorkloadKey",
    "WorkloadStatus",
    "WorkloadUid",
    "key_for_process",
]
