"""Async client of the SPIRE agent's Delegated Identity API that reconnects by itself."""

from __future__ import annotations

import asyncio
import logging
import os
import random
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Protocol, TypeVar

import grpc
import grpc.aio

from agent._proto.spire.api.agent.delegatedidentity.v1 import delegatedidentity_pb2 as pb
from agent._proto.spire.api.agent.delegatedidentity.v1 import (
    delegatedidentity_pb2_grpc as pb_grpc,
)
from agent.errors import (
    SpireCallFailed,
    SpireError,
    SpireInvalidArgument,
    SpirePermissionDenied,
    SpireUnavailable,
)
from agent.model import JwtBundles, JwtSvid, Selector, X509Bundles, X509SvidUpdate
from agent.spire import convert
from agent.spire.backoff import Backoff, BackoffPolicy

__all__ = [
    "DEFAULT_MAX_RECEIVE_MESSAGE_BYTES",
    "RETRYABLE_CODES",
    "UNREACHABLE_CODES",
    "ClientObserver",
    "ClientStatus",
    "DelegatedIdentityClient",
    "NoopObserver",
    "spire_error",
]

# SPIRE sends the whole state of the world in one message; gRPC's default 4 MiB receive
# limit is too small for large deployments (spiffe/spire#3965).
DEFAULT_MAX_RECEIVE_MESSAGE_BYTES = 64 * 1024 * 1024

# Codes after which a subscription reconnects. CANCELLED reaches us only when the server
# side cancelled; our own cancellation surfaces as asyncio.CancelledError instead.
RETRYABLE_CODES = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.CANCELLED,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.INTERNAL,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.UNKNOWN,
    }
)

# Codes that mean SPIRE did not answer at all (as opposed to answering with an error, which
# proves it is there): they start an "unreachable since" episode for readiness checks.
UNREACHABLE_CODES = frozenset(
    {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED}
)

_Resp = TypeVar("_Resp")
_Item = TypeVar("_Item")

_AUTHZ_HINT = (
    "this agent's SPIFFE ID must be listed in the SPIRE agent's authorized_delegates, and "
    "the SPIRE agent's admin API must be enabled with admin_socket_path"
)
_NO_IDENTITY_HINT = (
    "SPIRE matched no registration entry to the spiffe-delegate process itself: the "
    "delegate needs a registration entry matching its own process (e.g. selectors for its "
    "namespace and service account) with a SPIFFE ID that is listed in the SPIRE agent's "
    "authorized_delegates; the admin API must be enabled with admin_socket_path"
)


class ClientObserver(Protocol):
    """Hooks for metrics; every method must be cheap and must not raise."""

    def on_call(self, method: str, code: str, seconds: float) -> None:
        """A unary call finished, or a stream attempt produced its first message ("OK")
        or failed before it; ``seconds`` is the latency from the start of the attempt."""

    def on_stream_error(self, method: str, code: str, seconds: float) -> None:
        """A stream that had delivered messages ended; ``seconds`` is how long it lived."""

    def on_retry(self, method: str, code: str, attempt: int, delay: float) -> None:
        """A call failed with a retryable code; attempt ``attempt`` follows after ``delay``."""


class NoopObserver:
    """The default observer: does nothing."""

    def on_call(self, method: str, code: str, seconds: float) -> None:
        pass

    def on_stream_error(self, method: str, code: str, seconds: float) -> None:
        pass

    def on_retry(self, method: str, code: str, attempt: int, delay: float) -> None:
        pass


@dataclass(frozen=True)
class ClientStatus:
    """A snapshot for health checks and metrics.

    ``connected`` is true when the most recent outcome of any call was a success (a
    message on a stream, or a unary answer) and false after any failure.

    ``reached``: SPIRE has answered at least once (a message, or an error status that only
    a running SPIRE agent sends, such as PERMISSION_DENIED). ``unreachable_since``: the
    client clock's time of the first failure in :data:`UNREACHABLE_CODES` since SPIRE last
    answered; None while it answers.
    """

    socket_path: str
    connected: bool
    reconnects: int
    active_streams: int
    last_error: str | None
    last_error_code: str | None
    reached: bool = False
    unreachable_since: float | None = None


def spire_error(
    method: str,
    code: grpc.StatusCode,
    details: str,
    *,
    socket_path: str,
    by_pid: bool = False,
    attempts: int = 0,
) -> SpireError:
    """Turns a gRPC status from SPIRE into a typed error with operator guidance."""
    details = details or "(no message)"
    if code == grpc.StatusCode.PERMISSION_DENIED:
        hint = _NO_IDENTITY_HINT if "no identity issued" in details else _AUTHZ_HINT
        return SpirePermissionDenied(
            f"SPIRE agent at {socket_path} denied {method}: {details}", hint
        )
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        hint = "this is a bug in spiffe-delegate; please report it with this message"
        if by_pid and "PID" in details:
            hint = (
                "SPIRE agents older than v1.10.2 ignore the pid field; upgrade the SPIRE "
                "agent, or else this is a bug in spiffe-delegate (please report it)"
            )
        return SpireInvalidArgument(
            f"SPIRE agent at {socket_path} rejected the {method} request as invalid: {details}",
            hint,
        )
    tried = f" after {attempts} attempts" if attempts else ""
    if code == grpc.StatusCode.UNAVAILABLE:
        return SpireUnavailable(
            f"SPIRE agent at {socket_path} unavailable for {method}{tried}: {details}",
            "check that the SPIRE agent is running, that admin_socket_path points at "
            f"{socket_path}, and that this process may connect to it",
        )
    if code == grpc.StatusCode.UNIMPLEMENTED:
        return SpireCallFailed(
            f"SPIRE agent at {socket_path} does not implement {method}: {details}",
            "point spiffe-delegate at the SPIRE agent's admin socket (admin_socket_path), "
            "not the Workload API socket; FetchJWTSVIDs needs SPIRE >= 1.3",
            code_name=code.name,
        )
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        return SpireCallFailed(
            f"{method} from SPIRE agent at {socket_path} failed{tried}: {details}",
            "a response may exceed the configured receive limit; raise it, or subscribe "
            "per workload rather than to many identities at once",
            code_name=code.name,
            retryable=True,
        )
    return SpireCallFailed(
        f"{method} from SPIRE agent at {socket_path} failed{tried}: {code.name}: {details}",
        code_name=code.name,
        retryable=code in RETRYABLE_CODES,
    )


class DelegatedIdentityClient:
    """Talks to one SPIRE agent admin socket; safe to share between tasks.

    Subscriptions are async iterators that outlive SPIRE restarts: on a retryable error
    they reconnect with back-off and carry on, and the first message after a reconnect is
    SPIRE's fresh state of the world. Non-retryable errors raise typed ``SpireError``s.
    Iterators end when the client is closed; cancelling the iterating task cancels the RPC.

    ``backoff`` governs every retry loop (``max_attempts`` None: subscriptions retry
    forever); ``max_receive_message_bytes`` is the gRPC receive limit;
    ``jwt_timeout`` is FetchJWTSVIDs' default time budget including retries;
    ``first_message_warning`` logs a warning when a stream has said nothing for that long
    (None: never); ``rng`` and ``clock`` (monotonic seconds) are injectable for tests.
    """

    def __init__(
        self,
        socket_path: str | os.PathLike[str],
        *,
        backoff: BackoffPolicy | None = None,
        max_receive_message_bytes: int = DEFAULT_MAX_RECEIVE_MESSAGE_BYTES,
        jwt_timeout: float = 30.0,
        first_message_warning: float | None = 30.0,
        observer: ClientObserver | None = None,
        rng: random.Random | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if max_receive_message_bytes <= 0:
            raise ValueError("max_receive_message_bytes must be positive")
        self._path = os.fspath(socket_path)
        self._policy = backoff if backoff is not None else BackoffPolicy()
        self._max_receive = max_receive_message_bytes
        self._jwt_timeout = jwt_timeout
        self._first_message_warning = first_message_warning
        self._observer: ClientObserver = observer if observer is not None else NoopObserver()
        self._rng = rng if rng is not None else random.Random()
        self._clock = clock
        self._log = logging.getLogger("spiffe_delegate.spire")
        self._channel: grpc.aio.Channel | None = None
        self._stub: pb_grpc.DelegatedIdentityAsyncStub | None = None
        self._closed = asyncio.Event()
        self._connected = False
        self._reconnects = 0
        self._active_streams = 0
        self._last_error: str | None = None
        self._last_error_code: str | None = None
        self._reached = False
        self._unreachable_since: float | None = None
        # Outage episodes, for logging each cause once: the retry loops failing right now,
        # and the causes (status code names) already logged since SPIRE last answered.
        self._failing: set[object] = set()
        self._episode_causes: dict[str, str] = {}
        # Streams whose first message is overdue, and whether that was logged.
        self._slow: set[object] = set()
        self._slow_reported = False
        # Trust domains whose bundle SPIRE sent malformed (logged once for all bundle
        # subscriptions of this client, until one of them sees a good one).
        self._refused_bundles: set[str] = set()

    # --- lifecycle ------------------------------------------------------------------------

    @property
    def socket_path(self) -> str:
        return self._path

    @property
    def status(self) -> ClientStatus:
        return ClientStatus(
            socket_path=self._path,
            connected=self._connected,
            reconnects=self._reconnects,
            active_streams=self._active_streams,
            last_error=self._last_error,
            last_error_code=self._last_error_code,
            reached=self._reached,
            unreachable_since=self._unreachable_since,
        )

    @property
    def closed(self) -> bool:
        return self._closed.is_set()

    async def close(self) -> None:
        """Cancels every RPC in flight and ends every subscription iterator."""
        if self._closed.is_set():
            return
        self._closed.set()
        channel, self._channel, self._stub = self._channel, None, None
        self._connected = False
        if channel is not None:
            await channel.close(None)

    async def __aenter__(self) -> DelegatedIdentityClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    def _check_open(self) -> None:
        if self._closed.is_set():
            raise RuntimeError("DelegatedIdentityClient is closed")

    def _get_stub(self) -> pb_grpc.DelegatedIdentityAsyncStub:
        self._check_open()
        if self._stub is None:
            # Created lazily: a grpc.aio channel belongs to the event loop it is made in.
            to_ms = 1000
            self._channel = grpc.aio.insecure_channel(
                "unix:" + self._path,
                options=[
                    ("grpc.max_receive_message_length", self._max_receive),
                    # Keep gRPC's own reconnect timer within our policy, so that it
                    # does not hold the channel in TRANSIENT_FAILURE far longer than our
                    # back-off would wait (its default grows to 120 s).
                    ("grpc.initial_reconnect_backoff_ms", int(self._policy.initial * to_ms)),
                    ("grpc.min_reconnect_backoff_ms", int(self._policy.initial * to_ms)),
                    ("grpc.max_reconnect_backoff_ms", int(self._policy.maximum * to_ms)),
                ],
            )
            self._stub = pb_grpc.DelegatedIdentityStub(self._channel)
        return self._stub

    # --- public API -----------------------------------------------------------------------

    def subscribe_x509_svids(
        self, *, pid: int | None = None, selectors: Sequence[Selector] | None = None
    ) -> AsyncIterator[X509SvidUpdate]:
        """Yields SPIRE's X.509-SVIDs for one workload, named by ``pid`` or ``selectors``.

        Each item is the full state for that workload (it may be empty). Raises ValueError
        at once unless exactly one of ``pid`` and ``selectors`` is given.
        """
        request = convert.x509_svids_request(pid=pid, selectors=selectors)
        self._check_open()
        label = _workload_label(pid, selectors)
        return self._subscribe(
            "SubscribeToX509SVIDs",
            label,
            lambda stub: stub.SubscribeToX509SVIDs(request),
            convert.x509_svid_update_from_proto,
            by_pid=pid is not None,
        )

    def subscribe_x509_bundles(self) -> AsyncIterator[X509Bundles]:
        """Yields every X.509 bundle the SPIRE agent tracks, in full, on each change."""
        self._check_open()
        request = pb.SubscribeToX509BundlesRequest()
        return self._subscribe(
            "SubscribeToX509Bundles",
            "",
            lambda stub: stub.SubscribeToX509Bundles(request),
            _BundleFilter(self._path, self._log, self._refused_bundles),
        )

    def subscribe_jwt_bundles(self) -> AsyncIterator[JwtBundles]:
        """Yields every JWT bundle (JWKS) the SPIRE agent tracks, in full, on each change."""
        self._check_open()
        request = pb.SubscribeToJWTBundlesRequest()
        return self._subscribe(
            "SubscribeToJWTBundles",
            "",
            lambda stub: stub.SubscribeToJWTBundles(request),
            convert.jwt_bundles_from_proto,
        )

    async def fetch_jwt_svids(
        self,
        audience: Sequence[str],
        *,
        pid: int | None = None,
        selectors: Sequence[Selector] | None = None,
        give_up_after: float | None = None,
    ) -> list[JwtSvid]:
        """Fetches JWT-SVIDs for one workload.

        Retryable failures are retried with back-off within ``give_up_after`` seconds
        (default: the client's ``jwt_timeout``); then, or on a non-retryable status, a
        SpireError is raised. When nothing matches, SPIRE answers PERMISSION_DENIED
        "no identity issued".
        """
        method = "FetchJWTSVIDs"
        request = convert.jwt_svids_request(audience, pid=pid, selectors=selectors)
        label = _workload_label(pid, selectors)
        budget = self._jwt_timeout if give_up_after is None else give_up_after
        deadline = self._clock() + budget
        backoff = Backoff(self._policy, rng=self._rng, clock=self._clock)
        earlier: tuple[grpc.StatusCode, str] | None = None
        token = object()
        try:
            return await self._fetch_jwt_loop(
                method, request, label, budget, deadline, backoff, earlier, token, pid
            )
        finally:
            self._failing.discard(token)

    async def _fetch_jwt_loop(
        self,
        method: str,
        request: pb.FetchJWTSVIDsRequest,
        label: str,
        budget: float,
        deadline: float,
        backoff: Backoff,
        earlier: tuple[grpc.StatusCode, str] | None,
        token: object,
        pid: int | None,
    ) -> list[JwtSvid]:
        while True:
            remaining = deadline - self._clock()
            started = self._clock()
            try:
                if remaining <= 0:
                    raise _Timeout()
                response = await self._get_stub().FetchJWTSVIDs(request, timeout=remaining)
            except grpc.aio.AioRpcError as exc:
                code, details = exc.code(), exc.details() or ""
            except _Timeout:
                code, details = grpc.StatusCode.DEADLINE_EXCEEDED, "no answer in time"
            else:
                self._failing.discard(token)
                self._succeeded()
                self._notify_call(method, "OK", self._clock() - started)
                return convert.jwt_svids_from_proto(response)
            if self._closed.is_set():
                raise RuntimeError("DelegatedIdentityClient was closed during FetchJWTSVIDs")
            self._failed(code, details)
            self._notify_call(method, code.name, self._clock() - started)
            delay = backoff.failed()
            out_of_time = self._clock() + delay >= deadline
            if code not in RETRYABLE_CODES or backoff.exhausted or out_of_time:
                if code == grpc.StatusCode.DEADLINE_EXCEEDED:
                    if earlier is not None:
                        # The budget ran out while retrying: the earlier error is the news.
                        code, details = earlier
                        details = f"{details}; gave up after {budget:g}s"
                    else:
                        details = f"no answer from SPIRE within {budget:g}s ({details})"
                raise spire_error(
                    method,
                    code,
                    details,
                    socket_path=self._path,
                    by_pid=pid is not None,
                    attempts=backoff.failures if code in RETRYABLE_CODES else 0,
                ) from None
            if code != grpc.StatusCode.DEADLINE_EXCEEDED:
                earlier = (code, details)
            self._failing.add(token)
            self._report_retry(
                method, f"{method}({label})", code, details, backoff.failures, delay
            )
            if await self._sleep(delay):
                raise RuntimeError("DelegatedIdentityClient was closed during FetchJWTSVIDs")

    # --- the retry loop -------------------------------------------------------------------

    async def _subscribe(
        self,
        method: str,
        label: str,
        open_call: Callable[
            [pb_grpc.DelegatedIdentityAsyncStub], grpc.aio.UnaryStreamCall[Any, _Resp]
        ],
        to_model: Callable[[_Resp], _Item],
        *,
        by_pid: bool = False,
    ) -> AsyncIterator[_Item]:
        name = f"{method}({label})" if label else method
        backoff = Backoff(self._policy, rng=self._rng, clock=self._clock)
        loop = asyncio.get_running_loop()
        token = object()  # this retry loop, in the outage bookkeeping
        self._active_streams += 1
        try:
            while not self._closed.is_set():
                call = open_call(self._get_stub())
                started = self._clock()
                first_at: float | None = None
                watchdog = (
                    loop.call_later(
                        self._first_message_warning,
                        self._warn_slow_first_message,
                        name,
                        token,
                    )
                    if self._first_message_warning is not None
                    else None
                )
                code: grpc.StatusCode
                try:
                    async for message in call:
                        if first_at is None:
                            first_at = self._clock()
                            if watchdog is not None:
                                watchdog.cancel()
                            backoff.healthy()
                            self._notify_call(method, "OK", first_at - started)
                            self._answered_first(token, first_at - started)
                            self._failing.discard(token)
                            if backoff.failures:
                                self._log.debug(
                                    "%s to SPIRE agent at %s re-established after %d failed "
                                    "attempt(s)",
                                    name,
                                    self._path,
                                    backoff.failures,
                                )
                        self._succeeded()
                        try:
                            item = to_model(message)
                        except ValueError as exc:
                            self._log.error("%s: ignoring a malformed message: %s", name, exc)
                            continue
                        yield item
                except grpc.aio.AioRpcError as exc:
                    code, details = exc.code(), exc.details() or ""
                except asyncio.CancelledError:
                    task = asyncio.current_task()
                    if self._closed.is_set() and task is not None and not task.cancelling():
                        return  # the channel was closed under us: end quietly
                    raise
                else:
                    # SPIRE's streams never end with OK on purpose (e.g. shutting down).
                    code, details = grpc.StatusCode.UNAVAILABLE, "stream closed by SPIRE"
                finally:
                    if watchdog is not None:
                        watchdog.cancel()
                    self._slow.discard(token)
                    call.cancel()
                if self._closed.is_set():
                    return
                elapsed = self._clock() - (first_at if first_at is not None else started)
                if first_at is None:
                    self._notify_call(method, code.name, elapsed)
                else:
                    self._notify_stream_error(method, code.name, elapsed)
                self._failed(code, details)
                if code not in RETRYABLE_CODES:
                    raise spire_error(
                        method, code, details, socket_path=self._path, by_pid=by_pid
                    ) from None
                delay = backoff.failed()
                if backoff.exhausted:
                    raise spire_error(
                        method,
                        code,
                        details,
                        socket_path=self._path,
                        by_pid=by_pid,
                        attempts=backoff.failures,
                    ) from None
                self._reconnects += 1
                self._failing.add(token)
                self._report_retry(method, name, code, details, backoff.failures, delay)
                if await self._sleep(delay):
                    return
        finally:
            self._active_streams -= 1
            self._failing.discard(token)
            self._slow.discard(token)

    # --- bookkeeping and logs -------------------------------------------------------------

    async def _sleep(self, delay: float) -> bool:
        """Waits ``delay`` seconds; True if the client was closed meanwhile."""
        # Not asyncio.wait_for: on Python 3.11 it swallows a cancellation that arrives as
        # the client is closed, and the cancelled task then carries on retrying.
        try:
            async with asyncio.timeout(delay):
                await self._closed.wait()
        except TimeoutError:
            return False
        return True

    def _succeeded(self) -> None:
        self._connected = True
        self._reached = True
        self._unreachable_since = None
        if self._episode_causes and not self._failing:
            causes, self._episode_causes = self._episode_causes, {}
            self._log.info(
                "SPIRE agent at %s answers again; every call recovered (the outage was: %s)",
                self._path,
                "; ".join(causes.values()),
            )

    def _failed(self, code: grpc.StatusCode, details: str) -> None:
        self._connected = False
        self._last_error = f"{code.name}: {details}"
        self._last_error_code = code.name
        if code not in UNREACHABLE_CODES:
            self._reached = True  # an answer, if an unwelcome one
            self._unreachable_since = None
        elif self._unreachable_since is None:
            self._unreachable_since = self._clock()

    def _report_retry(
        self,
        method: str,
        name: str,
        code: grpc.StatusCode,
        details: str,
        attempt: int,
        delay: float,
    ) -> None:
        """Logs a failure that will be retried: each cause once per outage episode.

        An episode lasts from the first failure until every retry loop has been answered
        again; the failures of all streams count as one episode, so a SPIRE restart is one
        warning (and one "answers again"), not one per subscription and attempt."""
        self._safely(lambda: self._observer.on_retry(method, code.name, attempt, delay))
        if code == grpc.StatusCode.UNAVAILABLE and not Path(self._path).exists():
            # One cause with "connection refused": SPIRE coming up goes from one to the
            # other (and gRPC may report the stale error once the socket is there).
            cause = code.name
            summary = f"admin socket {self._path} missing"
            message = (
                f"SPIRE agent admin socket {self._path} does not exist (yet); waiting for "
                "the SPIRE agent to start. Its config must set admin_socket_path to this path"
            )
        else:
            cause = code.name
            summary = f"{code.name}: {details}"
            message = (
                f"{name} to SPIRE agent at {self._path} failed ({code.name}: {details}); "
                f"retrying with back-off (next in {delay:.2f}s). Further {code.name} "
                "failures are logged at debug level until SPIRE answers again"
            )
        if cause not in self._episode_causes:
            self._episode_causes[cause] = summary
            self._log.warning("%s", message)
            return
        self._log.debug(
            "%s to SPIRE agent at %s failed (%s: %s); retrying in %.2fs (attempt %d)",
            name,
            self._path,
            code.name,
            details,
            delay,
            attempt + 1,
        )

    def _warn_slow_first_message(self, name: str, token: object) -> None:
        first = not self._slow
        self._slow.add(token)
        if first and not self._slow_reported:
            self._slow_reported = True
            self._log.warning(
                "%s: no answer from SPIRE agent at %s after %gs; SPIRE waits until every "
                "matching entry has a minted SVID, so check its registration entries and "
                "logs (other slow answers are not logged until SPIRE answers in time again)",
                name,
                self._path,
                self._first_message_warning,
            )

    def _answered_first(self, token: object, seconds: float) -> None:
        if token in self._slow:
            self._slow.discard(token)
            if not self._slow and self._slow_reported:
                self._slow_reported = False
                self._log.info(
                    "SPIRE agent at %s answered after %.1fs; no stream is waiting for a "
                    "first answer any longer",
                    self._path,
                    seconds,
                )

    def _notify_call(self, method: str, code: str, seconds: float) -> None:
        self._safely(lambda: self._observer.on_call(method, code, seconds))

    def _notify_stream_error(self, method: str, code: str, seconds: float) -> None:
        self._safely(lambda: self._observer.on_stream_error(method, code, seconds))

    def _safely(self, hook: Callable[[], None]) -> None:
        try:
            hook()
        except Exception:  # a metrics bug must not break identity delivery
            self._log.exception("ClientObserver hook raised; ignored")


class _BundleFilter:
    """Converts one bundle subscription's messages, a trust domain at a time.

    A trust domain whose bundle is malformed is refused on its own: the others are applied,
    and it keeps its last good bundle from this subscription (or stays absent if it never
    had one). Each refusal is logged once (for all the client's bundle subscriptions),
    until that trust domain's bundle parses again.
    """

    def __init__(self, socket_path: str, log: logging.Logger, refused: set[str]) -> None:
        self._path = socket_path
        self._log = log
        self._good: dict[str, tuple[bytes, ...]] = {}
        self._refused = refused  # shared by the client's bundle subscriptions

    def __call__(self, message: pb.SubscribeToX509BundlesResponse) -> X509Bundles:
        parsed, bad = convert.x509_bundles_by_trust_domain(message)
        out = dict(parsed.bundles)
        for key, reason in sorted(bad.items()):
            kept = self._good.get(key)
            if kept is not None:
                out[key] = kept
            if key not in self._refused:
                self._refused.add(key)
                self._log.warning(
                    "SPIRE agent at %s sent a malformed X.509 bundle for %s (%s); refused: %s. "
                    "The other trust domains' bundles are applied",
                    self._path,
                    key,
                    reason,
                    "its previous bundle stays in use" if kept is not None
                    else "it has no bundle until SPIRE sends a good one",
                )
        for key in sorted(self._refused & set(parsed.bundles)):
            self._refused.discard(key)
            self._log.info("the X.509 bundle for %s from SPIRE parses again; applied", key)
        self._good = dict(out)
        return X509Bundles(bundles=out)


class _Timeout(Exception):
    """The FetchJWTSVIDs time budget ran out before an attempt could start."""


def _workload_label(pid: int | None, selectors: Sequence[Selector] | None) -> str:
    if pid is not None:
        return f"pid {pid}"
    return "selectors " + ",".join(str(s) for s in selectors or ())
