"""One SDS stream's view of the cache: the caller's state (and, for a trusted proxy, the
states of the pods it asks for), turned into Secrets by requested name.

A view owns its watches and one task per watch; each task only records the newest state
and calls ``on_change``. Nothing here is shared between streams, so one stream never waits
for another.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Protocol

from agent.cache.keys import WorkloadKey, WorkloadUid
from agent.cache.watch import CacheState, Watch, WatchClosed
from agent.sds.caller import Caller
from agent.sds.names import NameKind, RequestedName, SdsNames, classify
from agent.sds.resources import select_secrets, tls_certificate_secret, use_spiffe_validator

__all__ = ["EVERYTHING", "NoIdentityLog", "Resolution", "View", "ViewSettings", "WatchSource"]

_LOG = logging.getLogger("spiffe_delegate.sds")

EVERYTHING = "*"
"""The key under which an empty request (all resources) waits in ``Resolution.waiting``."""

_EMPTY: Mapping[str, str] = MappingProxyType({})
_REPORTED_KEPT = 4096
_BUNDLE_KINDS = frozenset({NameKind.LOCAL_BUNDLE, NameKind.ALL_BUNDLES, NameKind.TRUST_DOMAIN})


def _no_reasons() -> Mapping[str, str]:
    return _EMPTY


class WatchSource(Protocol):
    """What the SDS server needs from the cache (:class:`agent.cache.SvidCache` is one)."""

    def watch(self, key: WorkloadKey, *, pidfd: int | None = None) -> Watch: ...


@dataclass(frozen=True)
class ViewSettings:
    """``trust_domain``: names ``ROOTCA`` before the caller has an SVID to take it from.
    ``trusted_proxies``: SPIFFE IDs whose holders may ask for ``workload:<pod uid>``."""

    names: SdsNames = field(default_factory=SdsNames)
    trust_domain: str | None = None
    trusted_proxies: frozenset[str] = frozenset()


@dataclass(frozen=True)
class Resolution:
    """What a set of requested names comes to, now.

    ``secrets``: served now, by requested name. ``waiting``: names that cannot be served
    yet because the caller (or the pod asked for) is still being attested; ``unissued``:
    names that cannot be served because SPIRE issues no identity to the caller (or that
    pod), which may change when an entry is registered. Both use ``EVERYTHING`` for an
    empty request. ``unmet``: names the caller's current state cannot serve (a SPIFFE ID it
    does not hold, a trust domain without a bundle). ``invalid``: names this server never
    serves. ``denied``: ``workload:`` names asked by a caller that is not a trusted proxy.
    Each maps a name to a reason for the log. ``version`` is the newest cache version
    among the states used (0 when none).
    """

    version: int
    secrets: Mapping[str, Any]
    waiting: Mapping[str, str] = field(default_factory=_no_reasons)
    unissued: Mapping[str, str] = field(default_factory=_no_reasons)
    unmet: Mapping[str, str] = field(default_factory=_no_reasons)
    invalid: Mapping[str, str] = field(default_factory=_no_reasons)
    denied: Mapping[str, str] = field(default_factory=_no_reasons)


class NoIdentityLog:
    """Says once per caller (per workload key) that SPIRE has no identity for it."""

    def __init__(self, logger: logging.Logger | None = None) -> None:
        self._log = logger if logger is not None else _LOG
        self._reported: set[WorkloadKey] = set()

    def report(self, caller: Caller) -> bool:
        if caller.key in self._reported:
            return False
        if len(self._reported) >= _REPORTED_KEPT:  # keys of long-gone callers: start over
            self._reported.clear()
        self._reported.add(caller.key)
        self._log.warning("SDS caller %s has no identity from SPIRE (no registration entry "
                          "matches it); its requests wait until one does", caller.describe())
        return True

    def clear(self, key: WorkloadKey) -> None:
        self._reported.discard(key)


class _Followed:
    """One watch and the task that keeps its newest state."""

    def __init__(self, watch: Watch, on_change: Callable[[], None],
                 on_closed: Callable[[], None]) -> None:
        self.watch = watch
        self.state: CacheState | None = watch.latest()
        self._on_change = on_change
        self._on_closed = on_closed
        self.task = asyncio.create_task(self._follow(), name=f"sds follow {watch.key}")

    async def _follow(self) -> None:
        version = self.state.version if self.state is not None else 0
        try:
            while True:
                state = await self.watch.next(version)
                version = state.version
                self.state = state
                self._on_change()
        except WatchClosed:
            self._on_closed()

    async def close(self) -> None:
        self.task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self.task
        self.watch.close()


class View:
    """The caller's watch (opened at once) and pod watches (opened only once the caller has
    been found to be a trusted proxy). ``on_change`` is called after any state changed;
    ``on_closed`` when the cache closed a watch (the agent is shutting down)."""

    def __init__(self, cache: WatchSource, caller: Caller, settings: ViewSettings, *,
                 on_change: Callable[[], None], on_closed: Callable[[], None],
                 no_identity: NoIdentityLog | None = None) -> None:
        self.caller = caller
        self._cache = cache
        self._settings = settings
        self._on_change = on_change
        self._on_closed = on_closed
        self._no_identity = no_identity if no_identity is not None else NoIdentityLog()
        self._own = _Followed(cache.watch(caller.key, pidfd=caller.pidfd),
                              on_change, on_closed)
        self._pods: dict[str, _Followed] = {}
        self._closed = False
        self.pushed = False  # whether the stream has sent anything yet (for the log)

    @property
    def caller_state(self) -> CacheState | None:
        return self._own.state

    def trusted_proxy(self, state: CacheState | None = None) -> bool:
        state = state if state is not None else self._own.state
        return state is not None and bool(
            set(state.spiffe_ids) & self._settings.trusted_proxies)

    def resolve(self, requested: Sequence[str], node: Any) -> Resolution:
        """The Secrets for ``requested`` (empty: everything the caller has) from the newest
        states. Opens or closes pod watches to match the ``workload:`` names asked for."""
        names = self._settings.names
        wanted = [name for name in dict.fromkeys(requested) if name]
        kinds = {name: classify(name, names) for name in wanted}
        invalid = {name: asked.problem for name, asked in kinds.items()
                   if asked.kind is NameKind.INVALID}
        pods = {name: asked.value for name, asked in kinds.items()
                if asked.kind is NameKind.WORKLOAD}

        state = self._own.state
        if state is None:
            self._follow_pods(set())
            why = "the caller is still being attested"
            pending = ({name: why for name in wanted if name not in invalid} if wanted
                       else {EVERYTHING: why})
            return Resolution(0, _EMPTY, waiting=pending, invalid=invalid)
        if state.empty:
            self._follow_pods(set())
            return self._resolve_without_identity(state, wanted, kinds, invalid, node)
        self._no_identity.clear(self.caller.key)

        denied: dict[str, str] = {}
        if pods and not self.trusted_proxy(state):
            denied = {name: "only a trusted proxy may ask for another pod's SVID "
                            f"(the caller holds {', '.join(state.spiffe_ids)})"
                      for name in pods}
            self._follow_pods(set())
        else:
            self._follow_pods(set(pods.values()))

        trust_domain = state.trust_domain or self._settings.trust_domain or ""
        selection = select_secrets(wanted, state.svids, state.all_bundles(), trust_domain,
                                   spiffe_validator=use_spiffe_validator(node, names),
                                   names=names)
        secrets: dict[str, Any] = {str(s.name): s for s in selection.secrets}
        unmet = {name: why for name, why in selection.reasons.items() if name not in invalid}
        waiting: dict[str, str] = {}
        unissued: dict[str, str] = {}
        version = state.version
        for name, uid in selection.workloads.items():
            if name in denied:
                continue
            pod_state = self._pods[uid].state
            if pod_state is None:
                waiting[name] = f"pod {uid} is still being attested"
            elif pod_state.empty:
                unissued[name] = f"SPIRE issues no identity to pod {uid}"
                version = max(version, pod_state.version)
            else:
                version = max(version, pod_state.version)
                try:
                    secrets[name] = tls_certificate_secret(name, pod_state.svids[0])
                except ValueError as exc:
                    unmet[name] = str(exc)
        return Resolution(version, secrets, waiting=waiting, unissued=unissued, unmet=unmet,
                          invalid=invalid, denied=denied)

    def _resolve_without_identity(self, state: CacheState, wanted: list[str],
                                  kinds: Mapping[str, RequestedName],
                                  invalid: Mapping[str, str], node: Any) -> Resolution:
        """A caller SPIRE issues nothing to gets bundles it names (public CA certificates,
        as SPIRE's SDS server serves them) and nothing else: SVID names, and an empty
        request (everything), wait until an entry matches it."""
        self._no_identity.report(self.caller)
        why = "SPIRE issues no identity to the caller"
        if not wanted:
            return Resolution(state.version, _EMPTY, unissued={EVERYTHING: why},
                              invalid=invalid)
        trust_domain = state.trust_domain or self._settings.trust_domain or ""
        unissued: dict[str, str] = {}
        bundle_names: list[str] = []
        for name in wanted:
            kind = kinds[name].kind
            if name in invalid:
                continue
            if kind not in _BUNDLE_KINDS:
                unissued[name] = why
            elif kind is NameKind.LOCAL_BUNDLE and not trust_domain:
                unissued[name] = ("the local trust domain is not known yet (set "
                                  "--trust-domain, or register spiffe-delegate itself)")
            else:
                bundle_names.append(name)
        secrets: dict[str, Any] = {}
        if bundle_names:
            selection = select_secrets(
                bundle_names, (), state.all_bundles(), trust_domain,
                spiffe_validator=use_spiffe_validator(node, self._settings.names),
                names=self._settings.names)
            secrets = {str(secret.name): secret for secret in selection.secrets}
            # A bundle missing now may come with the bundle stream or an entry: wait.
            unissued.update(selection.reasons)
        return Resolution(state.version, secrets, unissued=unissued, invalid=invalid)

    def _follow_pods(self, uids: set[str]) -> None:
        for uid in list(self._pods):
            if uid not in uids:
                followed = self._pods.pop(uid)
                followed.task.cancel()
                followed.watch.close()
        for uid in uids:
            if uid not in self._pods and not self._closed:
                self._pods[uid] = _Followed(self._cache.watch(WorkloadUid(uid)),
                                            self._on_change, self._on_closed)

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        followed = [self._own, *self._pods.values()]
        self._pods.clear()
        for item in followed:
            await item.close()
