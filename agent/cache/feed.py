"""One cache entry's SVIDs: an SvidGate in front, the accepted state behind, expiry tracked."""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable, Mapping

from agent.cache.expiry import ExpiryMonitor
from agent.cache.keys import CompositeId
from agent.cache.stats import CacheStats
from agent.clock import Clock, utc_now
from agent.model import X509SvidUpdate
from agent.spire.validation import SvidGate, TrustBundles, VerifiedSvid

__all__ = ["Feed"]


class Feed:
    """Every SVID update for one entry goes through here; invalid SVIDs never get past.

    ``known`` turns true at the first SVID update the gate could decide on (an SVID
    accepted, an empty answer, or every SVID rejected); until then there is nothing to serve, not
    even an empty state. ``on_change`` is called whenever ``accepted`` may have changed.
    """

    def __init__(self, key: CompositeId, *, clock: Clock, monitor: ExpiryMonitor,
                 stats: CacheStats, on_change: Callable[[Feed], None],
                 bundles: TrustBundles | None, logger: logging.Logger,
                 trust_domain: Callable[[], str | None] | None = None) -> None:
        self.key = key
        # The cache reports a bundle that no longer verifies the SVIDs in use, once for
        # every entry (it keeps the CA they need): the gates only note it at debug level.
        self._gate = SvidGate(clock=lambda: utc_now(clock), label=str(key), logger=logger,
                              unchained_level=logging.DEBUG, trust_domain=trust_domain)
        self._monitor = monitor
        self._stats = stats
        self._on_change = on_change
        self._rejections: Counter[str] = Counter()
        # SPIFFE ID -> fingerprint of the certificate last served for it (kept when the ID
        # drops out for a while, so an expired SVID's successor still counts as a rotation).
        self._served: dict[str, str] = {}
        self.known = False
        self._answered = False
        self.accepted = X509SvidUpdate(svids=())
        if bundles is not None:
            self._gate.update_bundles(bundles)

    def apply_svids(self, update: X509SvidUpdate) -> None:
        self._answered = True
        self._settle(self._gate.update_svids(update))

    def apply_bundles(self, bundles: TrustBundles) -> None:
        self._settle(self._gate.update_bundles(bundles))

    def refresh(self) -> None:
        """Re-evaluates what may be served now (drops SVIDs that have expired)."""
        self._settle(self._gate.accepted())

    def recheck(self) -> None:
        """Validates held-back SVIDs again (one that was not valid yet may be now)."""
        self._settle(self._gate.recheck())

    def close(self) -> None:
        self._monitor.forget(self)

    def serving(self) -> Mapping[str, VerifiedSvid]:
        """The verified SVIDs behind ``accepted``, by SPIFFE ID (what is served now)."""
        in_use = self._gate.in_use
        return {svid.spiffe_id: in_use[svid.spiffe_id] for svid in self.accepted.svids
                if svid.spiffe_id in in_use}

    def _settle(self, accepted: X509SvidUpdate) -> None:
        fresh = self._gate.rejections - self._rejections
        if fresh:
            self._stats.svids_rejected.update(fresh)
            self._rejections = Counter(self._gate.rejections)
        # SVIDs held back only for want of a bundle are not a decision yet: an empty state
        # now would be a false "no identity" until the bundle arrives.
        if not self.known and self._answered and (accepted.svids or not self._gate.pending):
            self.known = True
        self.accepted = accepted
        self._count_rotations()
        recheck = self._gate.next_recheck()
        # A hair after not_before: validation takes "now < not_before" as not valid yet.
        self._monitor.track(self, str(self.key), self._gate.in_use, self.refresh,
                            recheck_at=recheck.timestamp() + 0.001 if recheck else None,
                            on_recheck=self.recheck)
        if self.known:
            self._on_change(self)

    def _count_rotations(self) -> None:
        for spiffe_id, verified in self.serving().items():
            before = self._served.get(spiffe_id)
            if before != verified.fingerprint:
                if before is not None:
                    self._stats.rotations += 1
                self._served[spiffe_id] = verified.fingerprint
