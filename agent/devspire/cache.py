"""The agent-side cache: entries, one shared SVID per entry, rotation, and change notification."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from agent.devspire.ca import Clock, JwtToken, MintedSvid, TrustDomainCA
from agent.devspire.entries import Entry, matching_entries
from agent.devspire.stats import Stats
from agent.model import Selector, trust_domain_key

_LOG = logging.getLogger("spiffe_delegate.devspire")


@dataclass(frozen=True)
class Identity:
    entry: Entry
    svid: MintedSvid


@dataclass(frozen=True)
class WorkloadUpdate:
    """Everything one X.509 subscriber is entitled to right now."""

    identities: tuple[Identity, ...]
    federates_with: tuple[str, ...]
    federated_versions: tuple[int, ...]

    @property
    def fingerprint(self) -> tuple[object, ...]:
        """Equal fingerprints mean an identical response, so no push is needed."""
        ids = tuple((i.entry.entry_id, i.entry.spiffe_id, i.entry.hint, i.entry.admin,
                     i.entry.downstream, i.svid.serial) for i in self.identities)
        return ids, self.federates_with, self.federated_versions


class Watcher:
    """One stream's wake-up: latest-value, so a burst of changes costs one re-evaluation."""

    def __init__(self, selectors: frozenset[Selector] | None) -> None:
        self.selectors = selectors
        self._event = asyncio.Event()
        self._force = False

    def notify(self, force: bool = False) -> None:
        self._force = self._force or force
        self._event.set()

    def poke(self) -> None:
        self.notify(False)

    async def wait(self) -> bool:
        """Waits for a notification; returns whether a re-send was forced."""
        await self._event.wait()
        self._event.clear()
        force, self._force = self._force, False
        return force


def _svid_inputs(entry: Entry) -> tuple[object, ...]:
    """The entry fields an SVID is minted from; when they change the SVID is minted again."""
    return entry.spiffe_id, entry.dns_names, entry.x509_svid_ttl


class IdentityCache:
    """Holds entries and minted SVIDs, rotates them, and wakes the streams that care."""

    def __init__(self, trust_domain: str, *, svid_ttl: float, jwt_svid_ttl: float,
                 ca_ttl: float, clock: Clock, stats: Stats, key_type: str = "ec-p256",
                 local: TrustDomainCA | None = None) -> None:
        """``local`` is the local trust domain's CA when the caller keeps it (``--data-dir``);
        otherwise a new one is made, in memory only."""
        self.trust_domain = trust_domain
        self.svid_ttl = svid_ttl
        self.jwt_svid_ttl = jwt_svid_ttl
        self.ca_ttl = ca_ttl
        self.key_type = key_type
        self._clock = clock
        self._stats = stats
        if local is not None and local.trust_domain != trust_domain:
            raise ValueError(f"local CA is of {local.trust_domain}, not of {trust_domain}")
        self.local = local or TrustDomainCA(trust_domain, ca_ttl=ca_ttl, clock=clock,
                                            key_type=key_type)
        self.federated: dict[str, TrustDomainCA] = {}  # keyed "spiffe://td"
        self._entries: tuple[Entry, ...] = ()
        self._svids: dict[str, tuple[tuple[object, ...], MintedSvid]] = {}
        self._jwts: dict[tuple[str, tuple[str, ...]], JwtToken] = {}
        self._watchers: set[Watcher] = set()
        self._live: frozenset[str] = frozenset()
        self.wakeup = asyncio.Event()  # tells the rotation loop its schedule may have changed

    # --- entries -----------------------------------------------------------------------------
    @property
    def entries(self) -> tuple[Entry, ...]:
        return self._entries

    def set_entries(self, entries: Iterable[Entry]) -> None:
        new = tuple(entries)
        by_id = {e.entry_id: e for e in new}
        for entry_id, (inputs, _) in list(self._svids.items()):
            entry = by_id.get(entry_id)
            if entry is None or _svid_inputs(entry) != inputs:
                del self._svids[entry_id]
        self._jwts = {k: v for k, v in self._jwts.items() if k[0] in by_id}
        for entry in new:
            for td in entry.federates_with:
                self.federated_ca(td)
        self._entries = new
        self._stats.entries_loaded = len(new)
        self.notify_all()

    def federated_ca(self, trust_domain: str) -> TrustDomainCA:
        """The CA of a federated trust domain, created on first reference."""
        key = trust_domain_key(trust_domain)
        ca = self.federated.get(key)
        if ca is None:
            ca = TrustDomainCA(key.removeprefix("spiffe://"), ca_ttl=self.ca_ttl,
                               clock=self._clock, key_type=self.key_type)
            self.federated[key] = ca
        return ca

    def matching(self, selectors: frozenset[Selector]) -> list[Entry]:
        return matching_entries(self._entries, selectors, self._clock())

    # --- X.509 ---------------------------------------------------------------------------------
    def svid_for(self, entry: Entry) -> MintedSvid:
        """The entry's shared SVID, minted on first use."""
        cached = self._svids.get(entry.entry_id)
        if cached is not None:
            return cached[1]
        svid = self._mint(entry)
        self._svids[entry.entry_id] = (_svid_inputs(entry), svid)
        return svid

    def _mint(self, entry: Entry) -> MintedSvid:
        ttl = entry.x509_svid_ttl or self.svid_ttl
        svid = self.local.mint_x509(entry.spiffe_id, ttl, dns_names=entry.dns_names)
        self._stats.svids_minted += 1
        _LOG.info("minted X509-SVID %s serial %x expiring %d", entry.spiffe_id, svid.serial,
                  svid.expires_at)
        self.wakeup.set()
        return svid

    def workload_update(self, selectors: frozenset[Selector]) -> WorkloadUpdate:
        entries = self.matching(selectors)
        identities = tuple(Identity(e, self.svid_for(e)) for e in entries)
        federates = sorted({td for e in entries for td in e.federates_with})
        versions = tuple(self.federated_ca(td).version for td in federates)
        return WorkloadUpdate(identities, tuple(federates), versions)

    # --- bundles -------------------------------------------------------------------------------
    def bundle_cas(self) -> dict[str, TrustDomainCA]:
        """The local CA and every federated one that some entry federates with."""
        referenced = {td for e in self._entries for td in e.federates_with}
        cas = {trust_domain_key(self.trust_domain): self.local}
        cas.update({td: ca for td, ca in self.federated.items() if td in referenced})
        return cas

    def x509_bundles(self) -> dict[str, bytes]:
        return {td: ca.bundle_der() for td, ca in self.bundle_cas().items()}

    def jwt_bundles(self) -> dict[str, bytes]:
        return {td: ca.jwks() for td, ca in self.bundle_cas().items()}

    # --- JWT -----------------------------------------------------------------------------------
    def fetch_jwt(self, entry: Entry, audience: Sequence[str]) -> JwtToken:
        """A cached token while it is in its first half of life, else a fresh one."""
        key = (entry.entry_id, tuple(sorted(set(audience))))
        now = self._clock()
        cached = self._jwts.get(key)
        if cached is not None and cached.spiffe_id == entry.spiffe_id and \
                now < cached.issued_at + (cached.expires_at - cached.issued_at) / 2:
            return cached
        ttl = entry.jwt_svid_ttl or self.jwt_svid_ttl
        token = self.local.sign_jwt(entry.spiffe_id, list(audience), ttl, now)
        self._stats.jwt_svids_minted += 1
        self._jwts[key] = token
        return token

    # --- watchers ------------------------------------------------------------------------------
    def watch(self, selectors: frozenset[Selector] | None = None) -> Watcher:
        watcher = Watcher(selectors)
        self._watchers.add(watcher)
        return watcher

    def unwatch(self, watcher: Watcher) -> None:
        self._watchers.discard(watcher)

    def notify_all(self, force: bool = False) -> None:
        """Wakes every stream; ``force`` makes X.509-SVID streams re-send even if unchanged
        (SPIRE's notifyAll when the local bundle changes)."""
        for watcher in list(self._watchers):
            watcher.notify(force)
        self.wakeup.set()

    def _subscribed_selector_sets(self) -> list[frozenset[Selector]]:
        return [w.selectors for w in self._watchers if w.selectors is not None]

    # --- rotation ------------------------------------------------------------------------------
    def next_due(self) -> float:
        times = [svid.rotate_at for _, svid in self._svids.values()]
        times.append(self.local.next_event())
        times += [ca.next_event() for ca in self.federated.values()]
        now = self._clock()
        times += [e.expires_at for e in self._entries if e.expires_at and e.expires_at > now]
        return min(times)

    def tick(self) -> None:
        """Does whatever is due at the clock's current time."""
        now = self._clock()
        local_changed = self.local.advance(now)
        if local_changed:
            self._stats.ca_rotations += 1
        federated_changed = any([ca.advance(now) for ca in self.federated.values()])
        rotated = False
        due = [(entry_id, inputs) for entry_id, (inputs, svid) in self._svids.items()
               if now >= svid.rotate_at]
        entries = {e.entry_id: e for e in self._entries} if due else {}
        subscribed = self._subscribed_selector_sets() if due else []
        for entry_id, inputs in due:
            entry = entries.get(entry_id)
            if entry is None or not any(entry.matches(sels) for sels in subscribed):
                del self._svids[entry_id]  # nobody holds it; mint afresh on next use
                continue
            self._svids[entry_id] = (inputs, self._mint(entry))
            rotated = True
        live = frozenset(e.entry_id for e in self._entries
                         if not (e.expires_at and e.expires_at <= now))
        expired, self._live = live != self._live, live
        if local_changed:
            self.notify_all(force=True)
        elif rotated or federated_changed or expired:
            self.notify_all()

    def rotate_svids(self, spiffe_id: str | None = None) -> int:
        """Re-mints the cached SVIDs (of ``spiffe_id`` only, if given) right now."""
        count = 0
        for entry in self._entries:
            if entry.entry_id not in self._svids:
                continue
            if spiffe_id is not None and entry.spiffe_id != spiffe_id:
                continue
            self._svids[entry.entry_id] = (_svid_inputs(entry), self._mint(entry))
            count += 1
        self.notify_all()
        return count

    def rotate_ca(self, trust_domain: str | None = None) -> None:
        """Rotates the local CA (or a federated one) at once; the old one stays published."""
        if trust_domain is None or trust_domain_key(trust_domain) == trust_domain_key(
                self.trust_domain):
            self.local.rotate_now()
            self._stats.ca_rotations += 1
            self.notify_all(force=True)
        else:
            self.federated_ca(trust_domain).rotate_now()
            self.notify_all()
