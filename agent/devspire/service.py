"""The DelegatedIdentity gRPC servicer, with SPIRE's authorization, status codes and messages."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from typing import Any, NoReturn

import grpc

from agent._proto.spire.api.agent.delegatedidentity.v1 import delegatedidentity_pb2 as pb
from agent._proto.spire.api.agent.delegatedidentity.v1 import delegatedidentity_pb2_grpc as pb_grpc
from agent._proto.spire.api.types import jwtsvid_pb2, selector_pb2, spiffeid_pb2, x509svid_pb2
from agent.devspire.attestor import AttestationFailed, Attestor
from agent.devspire.ca import Clock, TrustDomainCA
from agent.devspire.cache import IdentityCache, Watcher, WorkloadUpdate
from agent.devspire.corrupt import (
    FOREIGN_TRUST_DOMAIN,
    MALFORMED_BUNDLE,
    corrupt_svid,
    pad_svid_response,
    padding_bundles,
    padding_jwks,
)
from agent.devspire.faults import Faults, apply_delay
from agent.devspire.stats import Stats
from agent.model import Selector, trust_domain_key
from agent.uds.peercred import PeerCredentials

_LOG = logging.getLogger("spiffe_delegate.devspire")

Context = grpc.aio.ServicerContext[Any, Any]
PeerLookup = Callable[[str], PeerCredentials | None]

MSG_ATTESTATION_FAILED = "workload attestation failed"
MSG_NO_IDENTITY = "no identity issued"
MSG_NOT_DELEGATE = "caller not configured as an authorized delegate"
MSG_PID_XOR_SELECTORS = "must provide either selectors or non-zero PID, but not both"
MSG_BAD_SELECTORS = "could not parse provided selectors"
MSG_NO_AUDIENCE = "audience must be specified"
MSG_DROPPED = "dev-spire fault: stream dropped"


def _spiffe_id_proto(spiffe_id: str) -> spiffeid_pb2.SPIFFEID:
    td, _, path = spiffe_id.removeprefix("spiffe://").partition("/")
    return spiffeid_pb2.SPIFFEID(trust_domain=td, path="/" + path)


def selectors_from_proto(raw: Sequence[selector_pb2.Selector]) -> frozenset[Selector]:
    """SPIRE's SelectorsFromProto rules: non-empty type without ':', non-empty value."""
    out = set()
    for sel in raw:
        if not sel.type or ":" in sel.type or not sel.value:
            raise ValueError(f"invalid selector {sel.type!r}:{sel.value!r}")
        out.add(Selector(sel.type, sel.value))
    return frozenset(out)


def compose_x509_response(update: WorkloadUpdate) -> pb.SubscribeToX509SVIDsResponse:
    """composeX509SVIDBySelectors: admin/downstream skipped, federates_with sorted."""
    resp = pb.SubscribeToX509SVIDsResponse(federates_with=list(update.federates_with))
    for identity in update.identities:
        if identity.entry.admin or identity.entry.downstream:
            continue
        svid = identity.svid
        resp.x509_svids.append(pb.X509SVIDWithKey(
            x509_svid=x509svid_pb2.X509SVID(
                cert_chain=list(svid.cert_chain), id=_spiffe_id_proto(identity.entry.spiffe_id),
                expires_at=svid.expires_at, hint=identity.entry.hint),
            x509_svid_key=svid.key_der,
        ))
    return resp


class DelegatedIdentityService(pb_grpc.DelegatedIdentityServicer):
    """Serves the four RPCs over an :class:`IdentityCache`."""

    def __init__(self, *, cache: IdentityCache, attestor: Attestor, peers: PeerLookup,
                 authorized_delegates: Sequence[str], faults: Faults, stats: Stats,
                 clock: Clock) -> None:
        self.cache = cache
        self.attestor = attestor  # replaced when the pods file is reloaded
        self._peers = peers
        self._authorized = frozenset(authorized_delegates)
        self._faults = faults
        self._stats = stats
        self._clock = clock
        self._foreign: TrustDomainCA | None = None
        # (leaf DER, mode, valid_in) -> the broken SVID sent for it: a re-send is the same
        # broken certificate, as SPIRE re-sends the same bytes.
        self._corrupted: dict[tuple[bytes, str, float | None], pb.X509SVIDWithKey] = {}

    # --- shared steps ----------------------------------------------------------------------
    @contextlib.contextmanager
    def _track(self, rpc: str) -> Iterator[None]:
        self._stats.streams_opened[rpc] += 1
        self._stats.open_streams[rpc] += 1
        try:
            yield
        finally:
            self._stats.open_streams[rpc] -= 1

    async def _abort(self, context: Context, rpc: str, code: grpc.StatusCode,
                     message: str) -> NoReturn:
        self._stats.errors_returned[rpc] += 1
        await context.abort(code, message)

    async def _prelude(self, rpc: str, context: Context) -> None:
        await apply_delay(self._faults, rpc)
        injected = self._faults.take_injected(rpc)
        if injected is not None:
            _LOG.info("%s: injecting %s", rpc, injected.code.name)
            await self._abort(context, rpc, injected.code, injected.message)

    async def _attest_caller(self, rpc: str, context: Context) -> frozenset[Selector]:
        """The peer tracker: SO_PEERCRED PID, all attestors, then the caller must still live."""
        creds = self._peers(context.peer())
        if creds is None or creds.pid <= 0:
            _LOG.error("%s: caller's PID is unknown (peer %s)", rpc, context.peer())
            await self._abort(context, rpc, grpc.StatusCode.UNAVAILABLE, MSG_ATTESTATION_FAILED)
        try:
            selectors = self.attestor.attest(creds.pid).selectors
        except AttestationFailed as exc:
            _LOG.error("%s: caller pid %d: workload attestation failed: %s", rpc, creds.pid, exc)
            await self._abort(context, rpc, grpc.StatusCode.UNAVAILABLE, MSG_ATTESTATION_FAILED)
        if creds.exited():
            _LOG.error("%s: caller pid %d exited during attestation", rpc, creds.pid)
            await self._abort(context, rpc, grpc.StatusCode.UNAVAILABLE, MSG_ATTESTATION_FAILED)
        return selectors

    def authorization_error(self, caller: frozenset[Selector]) -> str | None:
        entries = self.cache.matching(caller)
        if not entries:
            return MSG_NO_IDENTITY
        if not any(e.spiffe_id in self._authorized for e in entries):
            return MSG_NOT_DELEGATE
        return None

    async def _authorize(self, rpc: str, context: Context,
                         cached: frozenset[Selector] | None = None) -> frozenset[Selector]:
        caller = cached if cached is not None else await self._attest_caller(rpc, context)
        error = self.authorization_error(caller)
        if error is not None:
            _LOG.error("%s: permission denied: %s (caller selectors %s)", rpc, error,
                       sorted(map(str, caller)))
            await self._abort(context, rpc, grpc.StatusCode.PERMISSION_DENIED, error)
        return caller

    async def _request_selectors(self, rpc: str, context: Context, pid: int,
                                 raw: Sequence[selector_pb2.Selector]) -> frozenset[Selector]:
        if (pid != 0) == (len(raw) > 0):
            await self._abort(context, rpc, grpc.StatusCode.INVALID_ARGUMENT,
                              MSG_PID_XOR_SELECTORS)
        if raw:
            try:
                return selectors_from_proto(raw)
            except ValueError as exc:
                _LOG.error("%s: %s", rpc, exc)
                await self._abort(context, rpc, grpc.StatusCode.INVALID_ARGUMENT,
                                  MSG_BAD_SELECTORS)
        try:
            selectors = self.attestor.attest(pid).selectors
        except AttestationFailed as exc:
            _LOG.error("%s: pid %d: workload attestation failed: %s", rpc, pid, exc)
            await self._abort(context, rpc, grpc.StatusCode.UNAVAILABLE, MSG_ATTESTATION_FAILED)
        _LOG.info("%s: pid %d attested as %s", rpc, pid, sorted(map(str, selectors)))
        return selectors

    def _foreign_ca(self) -> TrustDomainCA:
        if self._foreign is None:
            self._foreign = TrustDomainCA(FOREIGN_TRUST_DOMAIN, ca_ttl=self.cache.ca_ttl,
                                          clock=self._clock, key_type=self.cache.key_type)
        return self._foreign

    async def _stream(self, rpc: str, context: Context, cached: frozenset[Selector],
                      selectors: frozenset[Selector] | None,
                      ) -> AsyncIterator[tuple[Watcher, bool]]:
        """Yields (watcher, forced) once at once and then after every notification, after
        applying the stream faults and re-checking the caller's authorization."""
        watcher = self.cache.watch(selectors)
        epoch = self._faults.drop_epoch
        self._faults.add_drop_listener(watcher.poke)
        try:
            forced, sent = True, 0
            while True:
                if self._faults.drop_epoch != epoch or (
                        (limit := self._faults.drop_limit(rpc)) is not None and sent >= limit):
                    _LOG.info("%s: dropping the stream (fault)", rpc)
                    await self._abort(context, rpc, grpc.StatusCode.UNAVAILABLE, MSG_DROPPED)
                await self._authorize(rpc, context, cached)
                before = self._stats.responses_sent[rpc]
                yield watcher, forced
                sent += self._stats.responses_sent[rpc] - before
                if self._faults.drop_epoch == epoch and not (
                        (limit := self._faults.drop_limit(rpc)) is not None and sent >= limit):
                    forced = await watcher.wait()
        finally:
            self._faults.remove_drop_listener(watcher.poke)
            self.cache.unwatch(watcher)

    # --- the RPCs --------------------------------------------------------------------------
    async def SubscribeToX509SVIDs(self, request: pb.SubscribeToX509SVIDsRequest,
                                   context: Context,
                                   ) -> AsyncIterator[pb.SubscribeToX509SVIDsResponse]:
        rpc = "SubscribeToX509SVIDs"
        with self._track(rpc):
            await self._prelude(rpc, context)
            caller = await self._authorize(rpc, context)
            selectors = await self._request_selectors(rpc, context, request.pid,
                                                      request.selectors)
            last: tuple[object, ...] | None = None
            async for _, forced in self._stream(rpc, context, caller, selectors):
                update = self.cache.workload_update(selectors)
                if not forced and update.fingerprint == last:
                    continue
                last = update.fingerprint
                yield self._x509_response(rpc, update)

    def _x509_response(self, rpc: str, update: WorkloadUpdate) -> pb.SubscribeToX509SVIDsResponse:
        resp = compose_x509_response(update)
        if resp.x509_svids and (mode := self._faults.take_corruption()) is not None:
            _LOG.info("%s: corrupting %d SVIDs (%s)", rpc, len(resp.x509_svids), mode)
            broken = [self._corrupt(item, mode) for item in resp.x509_svids]
            del resp.x509_svids[:]
            resp.x509_svids.extend(broken)
        if (size := self._faults.take_oversize(rpc)) is not None:
            pad_svid_response(resp, size)
        self._stats.responses_sent[rpc] += 1
        return resp

    def _corrupt(self, item: pb.X509SVIDWithKey, mode: str) -> pb.X509SVIDWithKey:
        valid_in = self._faults.valid_in
        key = (bytes(item.x509_svid.cert_chain[0]) if item.x509_svid.cert_chain else b"",
               mode, valid_in)
        broken = self._corrupted.get(key)
        if broken is None:
            if len(self._corrupted) >= 256:
                self._corrupted.clear()
            broken = corrupt_svid(item, mode, self.cache.local, self._foreign_ca(),
                                  self._clock(), valid_in)
            self._corrupted[key] = broken
        return broken

    def _x509_bundles(self) -> dict[str, bytes]:
        """The bundles to send, after the bundle faults."""
        bundles = self.cache.x509_bundles()
        dropped = self._faults.dropped_cas
        if dropped is not None:
            local = self.cache.local
            serials = {local.active.serial} if dropped == "active" else dropped
            bundles[trust_domain_key(local.trust_domain)] = b"".join(
                a.der for a in local.authorities() if a.serial not in serials)
        if (malformed := self._faults.malformed_bundle_domain) is not None:
            bundles[trust_domain_key(malformed)] = MALFORMED_BUNDLE
        return bundles

    async def SubscribeToX509Bundles(self, request: pb.SubscribeToX509BundlesRequest,
                                     context: Context,
                                     ) -> AsyncIterator[pb.SubscribeToX509BundlesResponse]:
        rpc = "SubscribeToX509Bundles"
        with self._track(rpc):
            await self._prelude(rpc, context)
            caller = await self._authorize(rpc, context)
            # Like SPIRE, one map for the whole stream that only gains or updates keys.
            ca_certs: dict[str, bytes] = {}
            first = True
            async for _ in self._stream(rpc, context, caller, None):
                merged = {**ca_certs, **self._x509_bundles()}
                if not first and merged == ca_certs:
                    continue
                first, ca_certs = False, merged
                resp = pb.SubscribeToX509BundlesResponse(ca_certificates=ca_certs)
                if (size := self._faults.take_oversize(rpc)) is not None:
                    resp.ca_certificates.update(padding_bundles(self.cache.local.bundle_der(),
                                                                size))
                self._stats.responses_sent[rpc] += 1
                yield resp

    async def FetchJWTSVIDs(self, request: pb.FetchJWTSVIDsRequest,
                            context: Context) -> pb.FetchJWTSVIDsResponse:
        rpc = "FetchJWTSVIDs"
        with self._track(rpc):
            await self._prelude(rpc, context)
            if not request.audience:
                await self._abort(context, rpc, grpc.StatusCode.INVALID_ARGUMENT, MSG_NO_AUDIENCE)
            await self._authorize(rpc, context)
            selectors = await self._request_selectors(rpc, context, request.pid,
                                                      request.selectors)
            resp = pb.FetchJWTSVIDsResponse()
            for entry in self.cache.matching(selectors):
                if entry.admin or entry.downstream:
                    continue
                token = self.cache.fetch_jwt(entry, list(request.audience))
                resp.svids.append(jwtsvid_pb2.JWTSVID(
                    token=token.token, id=_spiffe_id_proto(entry.spiffe_id),
                    expires_at=token.expires_at, issued_at=token.issued_at, hint=entry.hint))
            if not resp.svids:
                await self._abort(context, rpc, grpc.StatusCode.PERMISSION_DENIED,
                                  MSG_NO_IDENTITY)
            self._stats.responses_sent[rpc] += 1
            return resp

    async def SubscribeToJWTBundles(self, request: pb.SubscribeToJWTBundlesRequest,
                                    context: Context,
                                    ) -> AsyncIterator[pb.SubscribeToJWTBundlesResponse]:
        rpc = "SubscribeToJWTBundles"
        with self._track(rpc):
            await self._prelude(rpc, context)
            caller = await self._authorize(rpc, context)
            bundles: dict[str, bytes] = {}
            first = True
            async for _ in self._stream(rpc, context, caller, None):
                merged = {**bundles, **self.cache.jwt_bundles()}
                if not first and merged == bundles:
                    continue
                first, bundles = False, merged
                resp = pb.SubscribeToJWTBundlesResponse(bundles=bundles)
                if (size := self._faults.take_oversize(rpc)) is not None:
                    resp.bundles.update(padding_jwks(self.cache.local.jwks(), size))
                self._stats.responses_sent[rpc] += 1
                yield resp
