"""The SVID cache: workloads -> verified SVIDs and bundles, served through latest-value watches.

See the package docstring (``agent.cache``) for the interface its users get.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import itertools
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from types import TracebackType

from cryptography import x509

from agent.attest.procfs import ProcessGone, ProcessIdentity
from agent.attest.verifier import VerifiedUpdate
from agent.cache.expiry import ExpiryMonitor
from agent.cache.feed import Feed
from agent.cache.identity import IdentityGroup
from agent.cache.keys import CompositeId, Identity, KeyMode, WorkloadKey
from agent.cache.sources import SvidSource, VerifiedStream
from agent.cache.stats import CacheStats
from agent.cache.watch import Bundles, StatePublisher, Watch
from agent.clock import Clock, SystemClock, utc_now
from agent.errors import SpireError
from agent.model import X509Bundles, X509Svid, trust_domain_key
from agent.spire.validation import TrustBundles, VerifiedSvid

__all__ = ["CacheSettings", "GroupStatus", "SvidCache", "WorkloadStatus"]

_LOG = logging.getLogger("spiffe_delegate.cache")


@dataclass(frozen=True)
class CacheSettings:
    """``key_mode``: see :class:`KeyMode`. ``grace_period``: how long an entry (and its
    SPIRE subscription) outlives its last watch. ``expiry_warning_fraction``: the share of
    an SVID's life after which a missing rotation is warned about. ``reattest_interval``
    (identity mode): how often each member workload is attested again, which bounds how
    long a pod keeps a shared identity after its registration entry changed.
    ``rescan_interval`` (identity mode): how often a group without a usable carrier looks
    for one again. ``retry_interval``: the wait after the bundle stream failed for good.
    ``trust_domain``: the local trust domain, whose bundle every state carries; when not
    set, the one given to :meth:`SvidCache.learn_trust_domain` (the agent's own SVID's)."""

    key_mode: KeyMode = KeyMode.WORKLOAD
    grace_period: float = 30.0
    expiry_warning_fraction: float = 0.8
    reattest_interval: float = 60.0
    rescan_interval: float = 1.0
    retry_interval: float = 5.0
    trust_domain: str | None = None

    def __post_init__(self) -> None:
        if self.grace_period < 0:
            raise ValueError(f"grace_period must be >= 0, got {self.grace_period}")
        for name in ("reattest_interval", "rescan_interval", "retry_interval"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if not 0 < self.expiry_warning_fraction < 1:
            raise ValueError("expiry_warning_fraction must be in (0, 1)")


@dataclass(frozen=True)
class WorkloadStatus:
    """A snapshot of one watched workload, for status pages and tests."""

    key: WorkloadKey
    watches: int
    attested: ProcessIdentity | None
    source: CompositeId | None
    version: int


@dataclass(frozen=True)
class GroupStatus:
    """A snapshot of one identity group."""

    key: Identity
    members: tuple[WorkloadKey, ...]
    carrier: WorkloadKey | None


class _View:
    """One watched workload: its publisher, its own feed, and (identity mode) its group."""

    def __init__(self, key: WorkloadKey, publisher: StatePublisher, own: Feed,
                 pid: int | None, pidfd: int | None) -> None:
        self.key = key
        self.publisher = publisher
        self.own = own
        self.feed: Feed = own
        self.group: IdentityGroup | None = None
        self.watches: set[Watch] = set()
        self.linger: asyncio.Task[None] | None = None
        self.task: asyncio.Task[None] | None = None
        self.attested: ProcessIdentity | None = None
        self.unmatched_reported = False
        self.reattest = asyncio.Event()
        self.pid = pid
        self.pidfd = pidfd

    def request_reattest(self) -> None:
        self.reattest.set()


class SvidCache:
    """See the package docstring. One per agent; not thread-safe (one event loop)."""

    def __init__(self, source: SvidSource, *, clock: Clock | None = None,
                 settings: CacheSettings | None = None,
                 logger: logging.Logger | None = None) -> None:
        self._source = source
        self._clock: Clock = clock if clock is not None else SystemClock()
        self.settings = settings if settings is not None else CacheSettings()
        self._log = logger if logger is not None else _LOG
        self._stats = CacheStats()
        self._monitor = ExpiryMonitor(self._clock,
                                      fraction=self.settings.expiry_warning_fraction,
                                      logger=self._log)
        self._versions = itertools.count(1)
        self._views: dict[WorkloadKey, _View] = {}
        self._groups: dict[Identity, IdentityGroup] = {}
        # What SPIRE sent last (new SVIDs are checked against it), and what is served:
        # the same, plus any CA SPIRE dropped while SVIDs in use still chain to it.
        self._received: X509Bundles | None = None
        self._bundles: X509Bundles | None = None
        self._trust: TrustBundles | None = None
        self._retained: dict[str, tuple[bytes, ...]] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self._started = False
        self._closed = False
        self._bundles_seen = asyncio.Event()
        self._learned_trust_domain: str | None = None

    # --- lifecycle ----------------------------------------------------------------------

    async def start(self) -> None:
        self._start()

    def _start(self) -> None:
        if self._started:
            return
        if self._closed:
            raise RuntimeError("the SVID cache is closed")
        self._started = True
        self._tasks = [
            asyncio.create_task(self._pump_bundles(), name="cache bundles"),
            asyncio.create_task(self._monitor.run(), name="cache expiry monitor"),
        ]

    async def close(self) -> None:
        """Closes every entry and subscription; open watches raise WatchClosed."""
        if self._closed:
            return
        self._closed = True
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        for view in list(self._views.values()):
            await self._close_view(view)
        for group in list(self._groups.values()):
            await self._close_group(group)

    async def __aenter__(self) -> SvidCache:
        self._start()
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        await self.close()

    async def wait_for_bundles(self) -> None:
        """Returns once the first bundle message from SPIRE has been taken in."""
        await self._bundles_seen.wait()

    # --- the interface --------------------------------------------------------------------

    def watch(self, key: WorkloadKey, *, pid: int | None = None,
              pidfd: int | None = None) -> Watch:
        """A watch on ``key``'s state; see the package docstring.

        ``pidfd`` (and ``pid``, else read from the pidfd): the caller, pinned at accept
        time, when it is itself the workload (a process of that pod, or that bare
        process). It is attested first; the pidfd is duplicated when the entry is created,
        and the caller keeps its own."""
        self._start()
        view = self._views.get(key)
        if view is None:
            view = self._open_view(key, pid, pidfd)
        if view.linger is not None:
            view.linger.cancel()
            view.linger = None
        watch = Watch(key, view.publisher, self._release)
        view.watches.add(watch)
        return watch

    @property
    def stats(self) -> CacheStats:
        self._stats.expiry_warnings = self._monitor.warnings
        return self._stats

    @property
    def bundles(self) -> X509Bundles | None:
        """The X.509 bundles being served: SPIRE's latest, plus any CA it dropped that
        still signs an SVID in use (None before SPIRE's first bundle message)."""
        return self._bundles

    @property
    def received_bundles(self) -> X509Bundles | None:
        """SPIRE's latest X.509 bundles as received (what new SVIDs are verified with)."""
        return self._received

    def count_rejection(self, reason: str) -> None:
        """Counts an SVID refused outside the cache's own gates (the agent's own SVIDs), so
        ``stats.svids_rejected`` covers every SVID from SPIRE that was never served."""
        self._stats.svids_rejected[reason] += 1

    def workloads(self) -> dict[WorkloadKey, WorkloadStatus]:
        out = {}
        for key, view in self._views.items():
            latest = view.publisher.latest
            out[key] = WorkloadStatus(key, len(view.watches), view.attested,
                                      latest.source if latest else None,
                                      latest.version if latest else 0)
        return out

    def groups(self) -> dict[Identity, GroupStatus]:
        return {key: GroupStatus(key, tuple(group.members), group.carrier_key)
                for key, group in self._groups.items()}

    def cached_svids(self) -> dict[CompositeId, Mapping[str, VerifiedSvid]]:
        """Every entry's SVIDs being served now, by SPIFFE ID: one entry per workload (its
        own subscription), plus one per shared identity in identity mode. A snapshot for
        metrics and status pages; an SVID shared by many pods appears once."""
        out: dict[CompositeId, Mapping[str, VerifiedSvid]] = {}
        for key, view in list(self._views.items()):
            out[key] = view.own.serving()
        for identity, group in list(self._groups.items()):
            out[identity] = group.feed.serving()
        return out

    # --- views ------------------------------------------------------------------------------

    def _new_feed(self, key: CompositeId) -> Feed:
        return Feed(key, clock=self._clock, monitor=self._monitor, stats=self._stats,
                    on_change=self._feed_changed, bundles=self._trust, logger=self._log,
                    trust_domain=lambda: self.local_trust_domain)

    def _open_view(self, key: WorkloadKey, pid: int | None, pidfd: int | None) -> _View:
        own = self._new_feed(key)
        view = _View(key, StatePublisher(self._versions), own, pid,
                     os.dup(pidfd) if pidfd is not None else None)
        self._views[key] = view
        self._stats.entries_opened += 1
        serve = (self._serve_member if self.settings.key_mode is KeyMode.IDENTITY
                 else self._serve_alone)
        view.task = asyncio.create_task(serve(view), name=f"cache {key}")
        return view

    def _release(self, watch: Watch) -> None:
        view = self._views.get(watch.key)
        if view is None or watch not in view.watches:
            return
        view.watches.discard(watch)
        if not view.watches and not self._closed:
            view.linger = asyncio.create_task(self._linger_view(view),
                                              name=f"cache linger {view.key}")

    async def _linger_view(self, view: _View) -> None:
        await self._clock.sleep(self.settings.grace_period)
        if not view.watches and self._views.get(view.key) is view:
            view.linger = None  # past the point of no return: a new watch gets a new view
            await self._close_view(view)

    async def _close_view(self, view: _View) -> None:
        if self._views.get(view.key) is view:
            del self._views[view.key]
        self._stats.entries_closed += 1
        view.publisher.close()
        self._leave_group(view)
        if view.linger is not None:
            view.linger.cancel()
        task, view.task = view.task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        view.own.close()
        if view.pidfd is not None:
            with contextlib.suppress(OSError):
                os.close(view.pidfd)
            view.pidfd = None
        self._log.debug("closed cache entry %s", view.key)

    def _feed_changed(self, feed: Feed) -> None:
        if self._retained and self._refresh_served_bundles():
            for view in list(self._views.values()):
                self._publish(view)  # a kept CA went: everyone's bundles changed
            return
        for view in list(self._views.values()):
            if view.feed is feed:
                self._publish(view)

    @property
    def local_trust_domain(self) -> str | None:
        """The agent's trust domain: configured, else learned, else None."""
        return self.settings.trust_domain or self._learned_trust_domain

    def learn_trust_domain(self, trust_domain: str) -> None:
        """Takes the agent's trust domain from SPIRE (its own SVID's) when none is
        configured, so ``ROOTCA`` names a bundle before a workload has an SVID."""
        if self.settings.trust_domain or trust_domain == self._learned_trust_domain:
            return
        self._learned_trust_domain = trust_domain
        self._log.info("local trust domain %s (from spiffe-delegate's own SVID)", trust_domain)
        for view in list(self._views.values()):
            self._publish(view)

    def _publish(self, view: _View) -> None:
        feed = view.feed
        if not feed.known:
            return
        accepted = feed.accepted
        own_domains = {trust_domain_key(svid.trust_domain) for svid in accepted.svids}
        local = self.local_trust_domain
        if local:
            own_domains.add(trust_domain_key(local))
        bundles = self._pick_bundles(own_domains)
        federated = self._pick_bundles(set(accepted.federates_with))
        trust_domain = accepted.svids[0].trust_domain if accepted.svids else (local or "")
        view.publisher.publish(accepted.svids, bundles=bundles, federated_bundles=federated,
                               federates_with=accepted.federates_with, source=feed.key,
                               trust_domain=trust_domain)

    def _pick_bundles(self, domains: set[str]) -> Bundles:
        if self._bundles is None:
            return {}
        known = self._bundles.bundles
        return {td: known[td] for td in sorted(domains) if td in known}

    def _on_verified(self, view: _View, verified: VerifiedUpdate) -> None:
        view.attested = verified.process
        if verified.update.svids:
            view.unmatched_reported = False
            return
        if not view.unmatched_reported:
            view.unmatched_reported = True
            self._stats.unmatched += 1
            process = verified.process
            self._log.warning(
                "%s: SPIRE matched no registration entry for PID %d (uid %d, container %s); "
                "its watchers get an empty state until an entry matches", view.key,
                process.pid, process.uid, process.container_id or "none")

    # --- workload mode ------------------------------------------------------------------------

    async def _serve_alone(self, view: _View) -> None:
        stream = self._source.workload(view.key, pid=view.pid, pidfd=view.pidfd)
        try:
            async for verified in stream:
                self._on_verified(view, verified)
                view.own.apply_svids(verified.update)
        except ProcessGone as exc:
            self._log.info("%s: %s; its last state stays until its watches close",
                           view.key, exc.message)
        except Exception:
            self._log.exception("%s: no more updates; its last state stays until its "
                                "watches close", view.key)
        finally:
            await stream.aclose()

    # --- identity mode ------------------------------------------------------------------------

    async def _serve_member(self, view: _View) -> None:
        while True:
            view.reattest.clear()
            stream = self._source.workload(view.key, pid=view.pid, pidfd=view.pidfd)
            handed = False
            try:
                handed = await self._attest_member(view, stream)
            except ProcessGone as exc:
                self._log.info("%s: %s; its last state stays until its watches close",
                               view.key, exc.message)
                return
            except Exception:
                self._log.exception("%s: attestation failed; its last state stays until its "
                                    "watches close", view.key)
                return
            finally:
                if not handed:
                    await stream.aclose()
            sleep = asyncio.ensure_future(self._clock.sleep(self.settings.reattest_interval))
            wake = asyncio.ensure_future(view.reattest.wait())
            try:
                await asyncio.wait({sleep, wake}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                sleep.cancel()
                wake.cancel()

    async def _attest_member(self, view: _View, stream: VerifiedStream) -> bool:
        """Reads the workload's own stream until it names an identity; joins that group.
        Returns True when the stream became the group's carrier (and so must stay open)."""
        async for verified in stream:
            self._on_verified(view, verified)
            self._stats.attestations += 1
            if not verified.update.svids:
                self._leave_group(view)
                view.own.apply_svids(verified.update)
                self._publish(view)
                continue  # keep this subscription: SPIRE tells us when an entry matches
            group = self._join_group(view, Identity.of(*verified.spiffe_ids))
            if group.carrier is None:
                group.adopt(view, stream, verified)
                return True
            return False
        return False

    def _join_group(self, view: _View, key: Identity) -> IdentityGroup:
        if view.group is not None and view.group.key == key:
            return view.group
        self._leave_group(view)
        group = self._groups.get(key)
        if group is None:
            group = IdentityGroup(key, self._new_feed(key), self._source, clock=self._clock,
                                  rescan_interval=self.settings.rescan_interval,
                                  stats=self._stats, logger=self._log,
                                  on_drift=self._reattest_members)
            self._groups[key] = group
            self._log.info("%s: new shared identity %s", view.key, key)
        if group.linger is not None:
            group.linger.cancel()
            group.linger = None
        group.join(view)
        view.group = group
        view.feed = group.feed
        self._publish(view)
        return group

    def _leave_group(self, view: _View) -> None:
        group, view.group = view.group, None
        view.feed = view.own
        if group is None:
            return
        group.leave(view)
        if not group.members and not self._closed and group.linger is None:
            group.linger = asyncio.create_task(self._linger_group(group),
                                               name=f"cache linger {group.key}")

    async def _linger_group(self, group: IdentityGroup) -> None:
        await self._clock.sleep(self.settings.grace_period)
        if not group.members and self._groups.get(group.key) is group:
            group.linger = None
            await self._close_group(group)

    async def _close_group(self, group: IdentityGroup) -> None:
        if self._groups.get(group.key) is group:
            del self._groups[group.key]
        if group.linger is not None:
            group.linger.cancel()
            group.linger = None
        await group.close()
        self._log.debug("closed shared identity %s", group.key)

    def _reattest_members(self, group: IdentityGroup) -> None:
        for member in list(group.members.values()):
            member.request_reattest()

    # --- bundles ------------------------------------------------------------------------------

    async def _pump_bundles(self) -> None:
        reported: str | None = None
        while True:
            try:
                async for bundles in self._source.bundles():
                    reported = None
                    self._set_bundles(bundles)
                return  # the SPIRE client was closed
            except SpireError as exc:
                if str(exc) != reported:
                    reported = str(exc)
                    self._log.error("X.509 bundle stream from SPIRE failed: %s; trying again "
                                    "every %gs", exc, self.settings.retry_interval)
            await self._clock.sleep(self.settings.retry_interval)

    def _set_bundles(self, bundles: X509Bundles) -> None:
        self._received = bundles
        self._trust = TrustBundles.parse(bundles)
        for feed in self._feeds():
            feed.apply_bundles(self._trust)
        self._refresh_served_bundles()
        for view in list(self._views.values()):
            self._publish(view)
        self._bundles_seen.set()

    def _feeds(self) -> list[Feed]:
        feeds = [view.own for view in self._views.values()]
        feeds += [group.feed for group in self._groups.values()]
        return feeds

    def _refresh_served_bundles(self) -> bool:
        """Sets the bundles to serve: SPIRE's, plus every CA it dropped that still signs an
        SVID being served, so that what a workload is told to trust always verifies the
        certificates it presents (a peer holding the same SVIDs would otherwise be refused).
        Such a CA goes once no SVID in use needs it. Returns whether anything changed."""
        received = self._received
        if received is None:
            return False
        previous = self._bundles.bundles if self._bundles is not None else {}
        in_use: list[VerifiedSvid] | None = None
        now = utc_now(self._clock)
        retained: dict[str, tuple[bytes, ...]] = {}
        for td, certs in previous.items():
            dropped = [der for der in certs if der not in received.bundles.get(td, ())]
            if not dropped:
                continue
            if in_use is None:
                in_use = [v for feed in self._feeds() for v in feed.serving().values()]
            svids = [v for v in in_use if trust_domain_key(v.svid.trust_domain) == td
                     and v.not_after >= now]
            kept = tuple(der for der in dropped if _signs_any(der, svids, now))
            if kept:
                retained[td] = kept
        served = {td: tuple(certs) for td, certs in received.bundles.items()}
        for td, kept in retained.items():
            served[td] = (*served.get(td, ()), *kept)
        self._report_retained(retained, in_use or [])
        self._retained = retained
        changed = self._bundles is None or self._bundles.bundles != served
        self._bundles = X509Bundles(bundles=served)
        return changed

    def _report_retained(self, retained: dict[str, tuple[bytes, ...]],
                         in_use: list[VerifiedSvid]) -> None:
        now = utc_now(self._clock)
        for td, kept in retained.items():
            for der in kept:
                if der in self._retained.get(td, ()):
                    continue
                ids = sorted({v.svid.spiffe_id for v in in_use
                              if trust_domain_key(v.svid.trust_domain) == td
                              and _signs_any(der, [v], now)})
                self._log.warning(
                    "the X.509 bundle from SPIRE for %s no longer holds CA %s, which signed "
                    "X.509-SVIDs still being served (%s); that CA stays in the bundles served "
                    "to workloads until those SVIDs are replaced or expire, so that their "
                    "peers keep trusting them. SPIRE normally re-issues them soon; if not, "
                    "check the SPIRE agent's SVID rotation", td, _describe_ca(der),
                    ", ".join(ids) or "none")
        for td, was in self._retained.items():
            for der in was:
                if der not in retained.get(td, ()):
                    self._log.info("no X.509-SVID in use chains to CA %s of %s any longer; "
                                   "dropped from the bundles served, as SPIRE asked",
                                   _describe_ca(der), td)


def _signs_any(ca_der: bytes, svids: list[VerifiedSvid], now: datetime) -> bool:
    """Whether the CA certificate issued the top certificate of any of ``svids``' chains
    (its name and signature; an expired CA signs nothing usable)."""
    try:
        ca = x509.load_der_x509_certificate(ca_der)
    except ValueError:
        return False
    if ca.not_valid_after_utc < now:
        return False
    return any(_issued_by(verified.svid, ca) for verified in svids)


def _issued_by(svid: X509Svid, ca: x509.Certificate) -> bool:
    try:
        top = x509.load_der_x509_certificate(svid.cert_chain[-1])
        top.verify_directly_issued_by(ca)
    except Exception:  # wrong issuer name, signature or key type: not this CA's
        return False
    return True


def _describe_ca(der: bytes) -> str:
    try:
        subject = x509.load_der_x509_certificate(der).subject.rfc4514_string()
    except ValueError:
        subject = "(unparsable)"
    return f"{subject!r} (sha256 {hashlib.sha256(der).hexdigest()[:16]})"
