"""The SecretDiscoveryService: StreamSecrets, FetchSecrets and DeltaSecrets over the cache.

Every call starts by identifying the caller (the PID the relay pinned at accept time, read
through /proc via its pidfd) and watching its cache entry; everything it is served comes
from that entry (and, for a trusted proxy, the entries of the pods it names).

Each stream is one handler coroutine with a mailbox: a reader task posts the client's
requests, the view's watch tasks post "state changed" (coalesced: the watch hands out the
newest state, never a backlog), and shutdown posts "stop". Nothing on the send path is
shared with other streams, so a slow or stuck Envoy only holds up its own stream.

Outcomes, per stream (SotW and delta alike unless said otherwise):

* the caller cannot be identified (gone, PID not visible, ambiguous cgroup):
  UNAVAILABLE "workload attestation failed" (SPIRE's status), logged;
* the caller (or a pod asked for) has no state yet, or SPIRE issues it no identity: the
  stream waits; the caller without an identity is logged once;
* a name this server never serves: INVALID_ARGUMENT "workload is not authorized for the
  requested identities [...]" (SPIRE's message), the stream ends;
* a name the caller's current state cannot serve (a SPIFFE ID it does not hold ...):
  SotW ends the stream with that INVALID_ARGUMENT, as SPIRE does; delta keeps the stream,
  serves the other names and removes the name if the client held it;
* ``workload:<pod uid>`` from a caller none of whose SPIFFE IDs is a trusted proxy:
  PERMISSION_DENIED, logged;
* an unknown type_url, a request that cannot be decoded, or one past the limits
  (:class:`~agent.sds.limits.SdsLimits`: name length, names per request): INVALID_ARGUMENT
  saying which;
* the caller's pinned process has exited: the stream ends at once (its pidfd is watched)
  and it is checked again before every push;
* the caller's process now sits in another pod or container than the one it was identified
  in (moved cgroups): UNAVAILABLE "workload attestation failed" at the next push, logged;
* agent shutdown: the stream ends with OK (Envoy reconnects to the next agent).

Counters go to ``stats`` (:class:`~agent.sds.stats.SdsStats`; resources by their bounded
kind, never by name); the time from a push to its ACK goes to ``observer.on_ack``.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import time
from collections.abc import AsyncIterator, Callable, Collection, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import grpc
from envoy.service.discovery.v3 import discovery_pb2
from envoy.service.secret.v3 import sds_pb2_grpc
from google.protobuf.message import DecodeError

from agent.attest.procfs import ProcReader
from agent.cache.keys import WorkloadKey
from agent.sds.caller import Caller, CallerGone, CallerUnknown, identify_caller
from agent.sds.delta import DeltaProtocol
from agent.sds.limits import SdsLimits, quote_name, quote_names
from agent.sds.names import resource_kind
from agent.sds.resources import SECRET_TYPE_URL
from agent.sds.sotw import SotwProtocol
from agent.sds.stats import NoopSdsObserver, SdsObserver, SdsStats
from agent.sds.view import NoIdentityLog, Resolution, View, ViewSettings, WatchSource
from agent.uds.peercred import PeerCredentials

__all__ = ["OpenCall", "SdsHandler", "not_authorized_message"]

_LOG = logging.getLogger("spiffe_delegate.sds")
_MAX_REMEMBERED = 4096


class _Event:
    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return self.name


_STATE = _Event("state changed")
_END = _Event("client closed")
_STOP = _Event("agent stopping")
_CACHE_CLOSED = _Event("cache closed")


class _Undecodable:
    """The client sent bytes that are not a request of this RPC."""

    def __init__(self, error: str) -> None:
        self.error = error


@dataclass(frozen=True)
class OpenCall:
    """One SDS call in progress, for status pages: who asks and as whom it is served
    (public facts only, never a secret). ``opened_at`` is ``time.monotonic()``."""

    method: str
    pid: int
    uid: int
    pod_uid: str | None
    key: WorkloadKey
    spiffe_ids: tuple[str, ...]
    opened_at: float


class _StreamEnded(Exception):
    """Leaves a stream's loop without a status of our own (the caller is gone)."""


class _Mailbox:
    """One stream's events, in order; state changes are coalesced into one pending item."""

    def __init__(self) -> None:
        self._queue: asyncio.Queue[object] = asyncio.Queue()
        self._state_pending = False

    def post(self, item: object) -> None:
        self._queue.put_nowait(item)

    def state_changed(self) -> None:
        if not self._state_pending:
            self._state_pending = True
            self._queue.put_nowait(_STATE)

    def cache_closed(self) -> None:
        self._queue.put_nowait(_CACHE_CLOSED)

    async def get(self) -> object:
        item = await self._queue.get()
        if item is _STATE:
            self._state_pending = False
        return item


def not_authorized_message(names: Mapping[str, str]) -> str:
    """SPIRE's INVALID_ARGUMENT message (Go's %q of the sorted names), then the reasons.

    Bounded: a handful of names, each quoted and cut (:func:`~agent.sds.limits.quote_names`),
    so a hostile request can neither blow the status past gRPC's metadata limit nor put
    control characters into the log."""
    ordered = sorted(names)
    message = ("workload is not authorized for the requested identities "
               f"[{quote_names(ordered, sep=' ')}]")
    reasons = [(name, names[name]) for name in ordered if names[name]]
    if not reasons:
        return message
    shown = "; ".join(f"{quote_name(name)}: {why}" for name, why in reasons[:3])
    if len(reasons) > 3:
        shown += f"; and {len(reasons) - 3} more"
    return f"{message} ({shown})"


def _digest(names: Iterable[str]) -> str:
    """A short fixed-size key for a set of names (log-once memory stays bounded)."""
    return hashlib.sha256("\0".join(names).encode("utf-8", "surrogatepass")).hexdigest()[:32]


class SdsHandler(sds_pb2_grpc.SecretDiscoveryServiceServicer):  # type: ignore[misc]
    """The servicer. ``lookup`` maps ``context.peer()`` to the relay's credentials."""

    def __init__(self, cache: WatchSource, lookup: Callable[[str], PeerCredentials | None], *,
                 settings: ViewSettings | None = None, reader: ProcReader | None = None,
                 stats: SdsStats | None = None, fetch_timeout: float = 5.0,
                 observer: SdsObserver | None = None, limits: SdsLimits | None = None,
                 logger: logging.Logger | None = None) -> None:
        self._cache = cache
        self._limits = limits if limits is not None else SdsLimits()
        self._lookup = lookup
        self._settings = settings if settings is not None else ViewSettings()
        self._reader = reader if reader is not None else ProcReader()
        self.stats = stats if stats is not None else SdsStats()
        self._observer: SdsObserver = observer if observer is not None else NoopSdsObserver()
        self._fetch_timeout = fetch_timeout
        self._log = logger if logger is not None else _LOG
        self._no_identity = NoIdentityLog(self._log)
        self._mailboxes: set[_Mailbox] = set()
        self._calls: dict[_Mailbox, tuple[str, View, float]] = {}
        self._draining = False
        self._logged: set[tuple[object, ...]] = set()
        self._idle = asyncio.Event()
        self._idle.set()

    # --- lifecycle ----------------------------------------------------------------------

    def drain(self) -> None:
        """Ends every open stream (cleanly, status OK) and refuses new calls."""
        self._draining = True
        for mailbox in list(self._mailboxes):
            mailbox.post(_STOP)

    async def wait_idle(self) -> None:
        """Returns once no stream is open."""
        await self._idle.wait()

    def open_calls(self) -> list[OpenCall]:
        """A snapshot of the calls in progress (streams, and fetches still waiting)."""
        out = []
        for method, view, opened_at in list(self._calls.values()):
            process, state = view.caller.process, view.caller_state
            out.append(OpenCall(method, process.pid, process.uid, process.pod_uid,
                                view.caller.key, state.spiffe_ids if state else (),
                                opened_at))
        return out

    # --- helpers ------------------------------------------------------------------------

    def _once(self, *key: object) -> bool:
        """True the first time ``key`` is seen (bounded memory): log-once helper."""
        if key in self._logged:
            return False
        if len(self._logged) >= _MAX_REMEMBERED:
            self._logged.clear()
        self._logged.add(key)
        return True

    async def _refuse(self, context: Any, code: grpc.StatusCode, message: str) -> None:
        self.stats.refused[code.name] += 1
        await context.abort(code, message)

    async def _identify(self, context: Any, rpc: str) -> Caller:
        if self._draining:
            await self._refuse(context, grpc.StatusCode.UNAVAILABLE,
                               "the agent is shutting down")
        try:
            return identify_caller(context.peer(), self._lookup, self._reader)
        except CallerUnknown as exc:
            self.stats.caller_failures += 1
            # A caller that vanished with a call in flight is no attestation failure.
            self._log.log(logging.DEBUG if isinstance(exc, CallerGone) else logging.WARNING,
                          "SDS %s: workload attestation failed: %s", rpc, exc)
            await self._refuse(context, grpc.StatusCode.UNAVAILABLE,
                               "workload attestation failed")
            raise AssertionError("unreachable: abort raises") from None

    async def _check_refusals(self, context: Any, caller: Caller, resolution: Resolution,
                              *, unmet_is_fatal: bool) -> None:
        if resolution.denied:
            names = sorted(resolution.denied)
            if self._once("denied", caller.key, _digest(names)):
                self._log.warning("SDS caller %s asked for %s but is not a trusted proxy "
                                  "(%s); refused", caller.describe(), quote_names(names),
                                  next(iter(resolution.denied.values())))
            await self._refuse(context, grpc.StatusCode.PERMISSION_DENIED,
                               f"the caller may not ask for {quote_names(names)}: it is not "
                               "a trusted proxy")
        fatal = dict(resolution.invalid)
        if unmet_is_fatal:
            fatal.update(resolution.unmet)
        if fatal:
            message = not_authorized_message(fatal)
            if self._once("invalid", caller.key, _digest(sorted(fatal))):
                self._log.warning("SDS caller %s: %s", caller.describe(), message)
            await self._refuse(context, grpc.StatusCode.INVALID_ARGUMENT, message)

    async def _check_type_url(self, context: Any, type_url: str) -> None:
        if type_url not in ("", SECRET_TYPE_URL):
            await self._refuse(context, grpc.StatusCode.INVALID_ARGUMENT,
                               f"unsupported type_url {quote_name(type_url)}; this server "
                               f"serves {SECRET_TYPE_URL}")

    async def _check_names(self, context: Any, caller: Caller, names: Collection[str],
                           what: str = "in one request") -> None:
        problem = self._limits.check_names(names, what=what)
        if problem is not None:
            self.stats.over_limits += 1
            if self._once("limits", caller.key):
                self._log.warning("SDS caller %s: %s", caller.describe(), problem)
            await self._refuse(context, grpc.StatusCode.INVALID_ARGUMENT, problem)

    async def _check_request(self, context: Any, caller: Caller, request: Any) -> None:
        """What every request on a stream must satisfy before anything is booked."""
        await self._check_type_url(context, request.type_url)
        if isinstance(request, discovery_pb2.DeltaDiscoveryRequest):
            await self._check_names(context, caller, request.resource_names_subscribe)
            await self._check_names(context, caller, request.resource_names_unsubscribe)
            await self._check_names(context, caller, request.initial_resource_versions)
        else:
            await self._check_names(context, caller, request.resource_names)

    async def _check_alive(self, context: Any, caller: Caller) -> None:
        """Before every push: the process that connected still lives, in the pod it was
        identified in (else it is not served as that pod any more)."""
        reason = caller.verify(self._reader)
        if reason == "exited":
            self._caller_exited(caller)
            raise _StreamEnded
        if reason is not None:
            self.stats.caller_failures += 1
            self._log.warning("SDS caller %s %s; ending its stream", caller.describe(), reason)
            await self._refuse(context, grpc.StatusCode.UNAVAILABLE,
                               "workload attestation failed")

    def _caller_exited(self, caller: Caller, mailbox: _Mailbox | None = None) -> None:
        """Counts and logs a caller's exit once; ``mailbox``: end its stream now."""
        if not caller.exit_reported:
            caller.exit_reported = True
            self.stats.callers_exited += 1
            self._log.info("SDS caller %s has exited; ending its stream", caller.describe())
        if mailbox is not None:
            mailbox.post(_END)

    def _kinds(self, names: Iterable[str]) -> list[str]:
        return [resource_kind(name, self._settings.names) for name in names]

    def _pushed(self, names: Iterable[str]) -> None:
        self.stats.pushes_by_kind.update(self._kinds(names))

    def _answered(self, caller: Caller, acked: tuple[str, ...], nacked: tuple[str, ...],
                  detail: str, sent_at: float | None = None) -> None:
        """Counts an ACK or a NACK (and logs the NACK's error_detail, as SPIRE logs any)."""
        if nacked:
            self.stats.nacks += 1
            self.stats.count_nacks(nacked)
            self.stats.nacks_by_kind.update(self._kinds(nacked))
            self.stats.last_nack_detail = detail
            self._log.error("SDS caller %s rejected %s: %s; it keeps its previous secret and "
                            "this content is not sent again", caller.describe(),
                            quote_names(nacked), _clip(detail) or "(no detail)")
        elif detail:
            self._log.error("SDS caller %s reported an error: %s", caller.describe(),
                            _clip(detail))
        elif acked:
            self.stats.acks += 1
            self.stats.acks_by_kind.update(self._kinds(acked))
            if sent_at is not None:
                try:
                    self._observer.on_ack(time.monotonic() - sent_at)
                except Exception:  # a metrics bug must not break secret delivery
                    self._log.exception("SdsObserver.on_ack raised; ignored")

    def _log_push(self, caller: Caller, view: View, resolution: Resolution,
                  version: str) -> None:
        """INFO for a stream's first push (who got which names as whom), DEBUG after."""
        state = view.caller_state
        first = not view.pushed
        view.pushed = True
        level = logging.INFO if first else logging.DEBUG
        if not self._log.isEnabledFor(level):
            return  # quoting every name of every push costs, on a rotation of 1,000 streams
        self._log.log(level,
                      "SDS %s %s to %s (%s), version %s",
                      "serving" if first else "pushing", quote_names(resolution.secrets),
                      caller.describe(), ", ".join(state.spiffe_ids) if state else "?",
                      version)

    async def _open(self, context: Any, caller: Caller, mailbox: _Mailbox,
                    method: str) -> View:
        try:
            view = View(self._cache, caller, self._settings, on_change=mailbox.state_changed,
                        on_closed=mailbox.cache_closed, no_identity=self._no_identity)
        except RuntimeError:  # the cache is closed: the agent is on its way out
            caller.close()
            await self._refuse(context, grpc.StatusCode.UNAVAILABLE,
                               "the agent is shutting down")
            raise
        self._mailboxes.add(mailbox)
        self._calls[mailbox] = (method, view, time.monotonic())
        self._idle.clear()
        self.stats.streams_active += 1
        return view

    async def _begin_stream(self, context: Any, requests: AsyncIterator[Any], method: str
                            ) -> tuple[Caller, _Mailbox, View, asyncio.Task[None]]:
        """Identifies the caller, opens its view, and starts reading its requests."""
        caller = await self._identify(context, method)
        mailbox = _Mailbox()
        view = await self._open(context, caller, mailbox, method)
        caller.on_exit(lambda: self._caller_exited(caller, mailbox))
        reader = asyncio.create_task(self._read(requests, mailbox),
                                     name=f"sds {method} read {caller.describe()}")
        return caller, mailbox, view, reader

    async def _close(self, view: View, mailbox: _Mailbox,
                     reader: asyncio.Task[None] | None) -> None:
        if reader is not None:
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reader
        await view.close()
        view.caller.close()
        self._mailboxes.discard(mailbox)
        self._calls.pop(mailbox, None)
        self.stats.streams_active -= 1
        if not self._mailboxes:
            self._idle.set()

    @staticmethod
    async def _read(requests: AsyncIterator[Any], mailbox: _Mailbox) -> None:
        try:
            async for request in requests:
                mailbox.post(request)
        except asyncio.CancelledError:
            raise
        except DecodeError as exc:  # gRPC's deserializer: not a request of this RPC
            mailbox.post(_Undecodable(str(exc)))
            return
        except Exception as exc:  # the connection broke: the stream is over either way
            _LOG.debug("SDS request stream ended: %s", exc)
        mailbox.post(_END)

    async def _next_event(self, mailbox: _Mailbox, context: Any) -> object:
        event = await mailbox.get()
        if event is _CACHE_CLOSED:
            await self._refuse(context, grpc.StatusCode.UNAVAILABLE,
                               "the agent is shutting down")
        if isinstance(event, _Undecodable):
            await self._refuse(context, grpc.StatusCode.INVALID_ARGUMENT,
                               f"the request could not be decoded ({_clip(event.error)}); "
                               "send an envoy.service.discovery.v3 DiscoveryRequest "
                               "(DeltaDiscoveryRequest for DeltaSecrets)")
        return event

    async def _take(self, context: Any, caller: Caller, mailbox: _Mailbox,
                    protocol: SotwProtocol | DeltaProtocol) -> tuple[Any, Any]:
        """The stream's next event: ``(_END or _STOP, None)`` to end it, ``(_STATE,
        None)`` for a state change, or a checked request and the protocol's outcome for it
        (its ACK or NACK already booked). Refusals abort the call."""
        event = await self._next_event(mailbox, context)
        if event is _END or event is _STOP or event is _STATE:
            return event, None
        request: Any = event
        await self._check_request(context, caller, request)
        outcome = protocol.on_request(request)
        self._answered(caller, outcome.acked, outcome.nacked, outcome.error_detail,
                       outcome.sent_at)
        return request, outcome

    # --- StreamSecrets ------------------------------------------------------------------

    async def StreamSecrets(self, request_iterator: AsyncIterator[Any],
                            context: Any) -> AsyncIterator[Any]:
        caller, mailbox, view, reader = await self._begin_stream(
            context, request_iterator, "StreamSecrets")
        self.stats.streams_opened += 1
        protocol = SotwProtocol()
        self._log.debug("SDS stream opened by %s (%s)", caller.describe(), caller.key)
        try:
            if self._draining:
                return
            while True:
                event, outcome = await self._take(context, caller, mailbox, protocol)
                if event is _END or event is _STOP:
                    return
                if outcome is not None:
                    if outcome.stale:
                        self.stats.stale_nonces += 1
                        self._log.debug("SDS caller %s: stale nonce %s ignored",
                                        caller.describe(),
                                        quote_name(event.response_nonce))
                        continue
                    if not outcome.names_changed:
                        continue
                if protocol.names is None:
                    continue
                resolution = view.resolve(protocol.names, protocol.node)
                await self._check_refusals(context, caller, resolution, unmet_is_fatal=True)
                if resolution.waiting or resolution.unissued:
                    continue
                response = protocol.build(resolution.version, resolution.secrets,
                                          sent_at=time.monotonic())
                if response is None:
                    self.stats.repushes_avoided += 1
                    continue
                # The caller is re-checked before every push, after the response is built:
                # a wake-up with nothing to send (the bundle stream on an SVID rotation)
                # then costs no /proc reads, and the check sits right before the send.
                await self._check_alive(context, caller)
                self._pushed(resolution.secrets)
                self.stats.responses += 1
                self.stats.resources_sent += len(response.resources)
                self._log_push(caller, view, resolution, response.version_info)
                yield response
        except _StreamEnded:
            return
        finally:
            await self._close(view, mailbox, reader)

    # --- DeltaSecrets -------------------------------------------------------------------

    async def DeltaSecrets(self, request_iterator: AsyncIterator[Any],
                           context: Any) -> AsyncIterator[Any]:
        caller, mailbox, view, reader = await self._begin_stream(
            context, request_iterator, "DeltaSecrets")
        self.stats.delta_streams_opened += 1
        protocol = DeltaProtocol()
        reported: set[tuple[str, str]] = set()  # unmet names logged on this stream
        try:
            if self._draining:
                return
            while True:
                event, outcome = await self._take(context, caller, mailbox, protocol)
                if event is _END or event is _STOP:
                    return
                if outcome is not None and outcome.unknown_nonce:
                    self.stats.stale_nonces += 1
                requested = protocol.requested()
                if requested is None:
                    continue
                await self._check_names(context, caller, requested, what="subscribed at once")
                resolution = view.resolve(requested, protocol.node)
                await self._check_refusals(context, caller, resolution, unmet_is_fatal=False)
                for name, why in resolution.unmet.items():
                    if (name, why) not in reported:
                        reported.add((name, why))
                        self._log.warning("SDS caller %s: cannot serve %s: %s",
                                          caller.describe(), quote_name(name), why)
                settled = not resolution.waiting and not resolution.unissued
                response = protocol.build(resolution.version, resolution.secrets,
                                          gone=sorted(resolution.unmet), settled=settled,
                                          sent_at=time.monotonic())
                if response is None:
                    if settled:
                        self.stats.repushes_avoided += 1
                    continue
                await self._check_alive(context, caller)  # as in StreamSecrets
                self._pushed([*(r.name for r in response.resources),
                              *response.removed_resources])
                self.stats.responses += 1
                self.stats.resources_sent += len(response.resources)
                self._log_push(caller, view, resolution, response.system_version_info)
                yield response
        except _StreamEnded:
            return
        finally:
            await self._close(view, mailbox, reader)

    # --- FetchSecrets -------------------------------------------------------------------

    async def FetchSecrets(self, request: Any, context: Any) -> Any:
        self.stats.fetches += 1
        await self._check_type_url(context, request.type_url)
        caller = await self._identify(context, "FetchSecrets")
        try:
            await self._check_names(context, caller, request.resource_names)
        except BaseException:
            caller.close()
            raise
        mailbox = _Mailbox()
        view = await self._open(context, caller, mailbox, "FetchSecrets")
        caller.on_exit(lambda: self._caller_exited(caller, mailbox))
        loop = asyncio.get_running_loop()
        budget = self._fetch_timeout
        remaining = context.time_remaining()
        if remaining is not None:
            budget = min(budget, max(remaining - 0.05, 0.0))
        deadline = loop.time() + budget
        try:
            while True:
                resolution = view.resolve(list(request.resource_names), request.node)
                await self._check_refusals(context, caller, resolution, unmet_is_fatal=True)
                if resolution.unissued:
                    await self._refuse(context, grpc.StatusCode.PERMISSION_DENIED,
                                       "no identity issued: "
                                       + "; ".join(sorted(set(resolution.unissued.values()))))
                if not resolution.waiting or caller.exit_reported:
                    # Answered only to the process that asked, where it was identified.
                    try:
                        await self._check_alive(context, caller)
                    except _StreamEnded:
                        await self._refuse(context, grpc.StatusCode.UNAVAILABLE,
                                           "the caller has exited")
                if not resolution.waiting:
                    response = discovery_pb2.DiscoveryResponse(
                        version_info=str(resolution.version), type_url=SECRET_TYPE_URL)
                    for secret in resolution.secrets.values():
                        response.resources.add().Pack(secret)
                    self.stats.responses += 1
                    self.stats.resources_sent += len(response.resources)
                    return response
                try:
                    # asyncio.timeout, not wait_for: Python 3.11's wait_for can swallow a
                    # cancellation that races the mailbox's completion.
                    async with asyncio.timeout_at(deadline):
                        event = await mailbox.get()
                except TimeoutError:
                    await self._refuse(context, grpc.StatusCode.UNAVAILABLE,
                                       "timed out: " + "; ".join(
                                           sorted(set(resolution.waiting.values()))))
                if event is _CACHE_CLOSED or self._draining:
                    await self._refuse(context, grpc.StatusCode.UNAVAILABLE,
                                       "the agent is shutting down")
        finally:
            await self._close(view, mailbox, None)


def _clip(text: str, limit: int = 512) -> str:
    """A client-supplied text (an error_detail, a decoder error) fit for one log line."""
    flat = text.encode("unicode_escape", "backslashreplace").decode("ascii")
    return flat if len(flat) <= limit else flat[:limit] + f"... ({len(text)} characters)"
