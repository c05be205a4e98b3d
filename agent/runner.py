"""``spiffe-delegate run``: SPIRE -> attest-then-re-verify -> SVID cache -> SDS for Envoy.

:class:`Agent` wires one DelegatedIdentityClient to a :class:`~agent.cache.SpireSource`
(which attests and re-verifies every PID), the :class:`~agent.cache.SvidCache` and the
:class:`~agent.sds.server.SdsServer`; it also follows the agent's own X.509-SVIDs (by its
own PID), the X.509 bundles and the JWT bundles, and logs what it holds. SIGTERM or SIGINT
drain: SDS streams end cleanly (status OK), the socket file is removed, and the process
exits within ``--shutdown-grace``; a second signal ends the drain at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import time
from collections.abc import Awaitable, Callable, Iterator
from datetime import UTC, datetime
from typing import Any

from cryptography import x509
from prometheus_client import CollectorRegistry

from agent.admin.recent import RecentErrors
from agent.admin.status import StatusInputs, build_status
from agent.attest.procfs import ProcReader
from agent.cache import CacheSettings, KeyMode, SpireSource, SvidCache
from agent.clock import Clock, SystemClock
from agent.config import AgentSettings, HostPort
from agent.errors import SpireError, SpirePermissionDenied
from agent.http.endpoints import Endpoints
from agent.malloc import HeapTrimmer
from agent.metrics import AgentMetrics, SdsAckMetrics, SpireRpcMetrics
from agent.model import JwtBundles, X509Bundles, X509SvidUpdate
from agent.sds.server import SdsServer, SdsSettings
from agent.sds.view import ViewSettings
from agent.spire.backoff import BackoffPolicy
from agent.spire.client import DelegatedIdentityClient
from agent.spire.validation import SvidGate

_LOG = logging.getLogger("spiffe_delegate.run")


def describe_update(update: X509SvidUpdate, now: datetime) -> list[str]:
    """One line per SVID: SPIFFE ID, serial, expiry and time left (never key material)."""
    lines = []
    for svid in update.svids:
        leaf = x509.load_der_x509_certificate(svid.cert_chain[0])
        left = leaf.not_valid_after_utc - now
        lines.append(f"{svid.spiffe_id} serial={leaf.serial_number:x} "
                     f"expires={leaf.not_valid_after_utc:%Y-%m-%dT%H:%M:%SZ} "
                     f"left={int(left.total_seconds())}s")
    return lines


def describe_bundles(bundles: X509Bundles | JwtBundles) -> str:
    if isinstance(bundles, X509Bundles):
        parts = [f"{td} ({len(certs)} CA)" for td, certs in sorted(bundles.bundles.items())]
    else:
        parts = [f"{td} ({len(jwks)} bytes JWKS)" for td, jwks in sorted(bundles.bundles.items())]
    return ", ".join(parts) or "none"


class OwnIdentityFollower:
    """Follows the agent's own SVIDs and the bundles, through an SvidGate.

    ``on_identity(accepted, bundles)`` is called whenever the accepted SVIDs or the X.509
    bundles change (the /metrics endpoint's TLS material in spiffe mode)."""

    def __init__(self, client: DelegatedIdentityClient, pid: int, *,
                 on_trust_domain: Callable[[str], None] | None = None,
                 on_identity: Callable[[X509SvidUpdate, X509Bundles | None], None] | None
                 = None, on_reject: Callable[[str], None] | None = None,
                 trust_domain: Callable[[], str | None] | None = None) -> None:
        self._client = client
        self._pid = pid
        self._on_trust_domain = on_trust_domain
        self._on_identity = on_identity
        # on_reject: own SVIDs refused count in svids_rejected_total like workloads' do.
        self.gate = SvidGate(label="spiffe-delegate's own identity", on_reject=on_reject,
                             trust_domain=trust_domain)
        self.changed = asyncio.Event()
        self._in_use: tuple[bytes, ...] = ()
        self._bundles: X509Bundles | None = None

    def _accepted(self, update: X509SvidUpdate, *, bundles_changed: bool = False) -> None:
        """Logs the SVIDs in use whenever they change."""
        in_use = tuple(svid.cert_chain[0] for svid in update.svids)
        if in_use == self._in_use:
            if bundles_changed and self._on_identity is not None:
                self._on_identity(update, self._bundles)
            return
        self._in_use = in_use
        for line in describe_update(update, datetime.now(UTC)):
            _LOG.info("X.509-SVID in use: %s", line)
        if update.svids and self._on_trust_domain is not None:
            self._on_trust_domain(update.svids[0].trust_domain)
        if self._on_identity is not None:
            self._on_identity(update, self._bundles)
        self.changed.set()

    async def follow_svids(self) -> None:
        empty_reported = False
        async for update in self._client.subscribe_x509_svids(pid=self._pid):
            if not update.svids and not empty_reported:
                _LOG.warning("SPIRE has no X.509-SVID for spiffe-delegate itself (pid %d): "
                             "register an entry matching this process", self._pid)
            empty_reported = not update.svids
            self._accepted(self.gate.update_svids(update))

    async def follow_bundles(self) -> None:
        async for bundles in self._client.subscribe_x509_bundles():
            _LOG.info("X.509 bundles: %s", describe_bundles(bundles))
            self._bundles = bundles
            self._accepted(self.gate.update_bundles(bundles), bundles_changed=True)

    async def follow_jwt_bundles(self) -> None:
        async for bundles in self._client.subscribe_jwt_bundles():
            _LOG.info("JWT bundles: %s", describe_bundles(bundles))


async def _keep_following(name: str, follow: Callable[[], Awaitable[None]],
                          retry_after: float) -> None:
    """Runs ``follow``; a refusal from SPIRE is logged once per episode and retried slowly.

    The client already retries transient failures; what reaches here is final for that
    attempt (PERMISSION_DENIED, say), which an operator may still fix without restarting us.
    """
    last_message = ""
    while True:
        try:
            await follow()
            return
        except SpireError as exc:
            message = str(exc)
            if message != last_message:
                level = logging.ERROR if isinstance(exc, SpirePermissionDenied) else logging.WARNING
                _LOG.log(level, "%s: %s; retrying every %ss", name, message, retry_after)
                last_message = message
            await asyncio.sleep(retry_after)


async def _first_of(stop: asyncio.Event, tasks: list[asyncio.Task[None]]) -> None:
    stopper = asyncio.create_task(stop.wait())
    try:
        done, _ = await asyncio.wait([stopper, *tasks], return_when=asyncio.FIRST_COMPLETED)
        for task in done:
            if task is not stopper and not task.cancelled() and task.exception():
                raise task.exception()  # type: ignore[misc]
    finally:
        for task in [stopper, *tasks]:
            task.cancel()
        await asyncio.gather(stopper, *tasks, return_exceptions=True)


class Agent:
    """The running agent, in-process: ``async with Agent(settings) as agent`` starts the SDS
    server (SocketInUse if another agent serves the socket) and everything behind it.

    ``agent.sds``, ``agent.cache`` and ``agent.client`` are the parts; ``run(stop)`` follows
    the agent's own identity until ``stop`` is set; ``close()`` drains within
    ``settings.shutdown_grace`` seconds. ``agent.endpoints`` serves /healthz, /readyz and
    /metrics once started (``agent.health_address``/``metrics_address``: where they bound),
    and /status (``agent.status()``) beside /healthz.
    """

    endpoints: Endpoints | None = None

    def __init__(self, settings: AgentSettings, *, reader: ProcReader | None = None,
                 clock: Clock | None = None, follow_own_identity: bool = True,
                 heap_trimmer: HeapTrimmer | None = None,
                 sds_listener: socket.socket | None = None) -> None:
        self.settings = settings
        # ``run`` passes one (the process is the agent's own); in-process tests need none.
        self._heap_trimmer = heap_trimmer
        self._trim_task: asyncio.Task[None] | None = None
        self._reader = reader if reader is not None else ProcReader()
        self._clock: Clock = clock if clock is not None else SystemClock()
        self._follow_own = follow_own_identity
        policy = BackoffPolicy(initial=settings.reconnect.initial,
                               maximum=settings.reconnect.maximum,
                               reset_after=settings.reconnect.reset_after)
        spire_rpc, sds_acks = SpireRpcMetrics(), SdsAckMetrics()  # hooks for self.metrics
        self.client = DelegatedIdentityClient(
            str(settings.spire_admin_socket), backoff=policy,
            max_receive_message_bytes=settings.spire_max_message_bytes, observer=spire_rpc,
            first_message_warning=settings.spire_slow_answer_warning)
        self.source = SpireSource(self.client, self._reader, clock=self._clock)
        self.cache = SvidCache(self.source, clock=self._clock, settings=CacheSettings(
            key_mode=KeyMode(settings.cache_key), trust_domain=settings.trust_domain))
        self.sds = SdsServer(SdsSettings(
            socket_path=settings.sds_socket, socket_mode=settings.sds_socket_mode,
            socket_group=settings.sds_socket_group,
            view=ViewSettings(names=settings.sds_names, trust_domain=settings.trust_domain,
                              trusted_proxies=frozenset(settings.trusted_proxies)),
            limits=settings.sds_limits),
            self.cache, reader=self._reader, observer=sds_acks, listener=sds_listener)
        # Every metric of this agent registers here (never prometheus_client's global
        # REGISTRY): agent/metrics fills it, the metrics endpoint serves it.
        self.metrics_registry = CollectorRegistry(auto_describe=True)
        self.metrics = AgentMetrics(self.metrics_registry, client=self.client,
                                    source=self.source, cache=self.cache, sds=self.sds,
                                    clock=self._clock, spire_rpc=spire_rpc, sds_acks=sds_acks)
        self._tasks: list[asyncio.Task[None]] = []
        self._closed = False
        self._hurry = asyncio.Event()
        # The agent's warnings and errors while it runs, for /status.
        self.recent_errors = RecentErrors()
        self._log_root = logging.getLogger("spiffe_delegate")

    async def start(self) -> None:
        self._log_root.addHandler(self.recent_errors)
        try:
            await self._start()
        except BaseException:
            self._log_root.removeHandler(self.recent_errors)
            raise

    async def _start(self) -> None:
        names = self.settings.sds_names
        if names.all_bundles_name is None:
            _LOG.warning("the SDS bundle name and all-bundles name are both %r; the "
                         "all-bundles name is ignored (as SPIRE does)", names.default_bundle_name)
        _LOG.info("connecting to the SPIRE agent admin socket %s as a delegate (pid %d)",
                  self.settings.spire_admin_socket, os.getpid())
        try:
            endpoints = Endpoints(self.settings, client=self.client, sds=self.sds,
                                  registry=self.metrics_registry,
                                  status=self.status)  # ConfigError before binding
            await self.sds.start()
        except BaseException:
            await self.client.close()
            raise
        try:
            await endpoints.start(follows_own_identity=self._follow_own)
        except BaseException:
            await self.close()
            raise
        self.endpoints = endpoints
        await self.cache.start()
        if self._follow_own:
            follower = OwnIdentityFollower(self.client, os.getpid(),
                                           on_trust_domain=self.cache.learn_trust_domain,
                                           on_identity=endpoints.own_identity_changed,
                                           on_reject=self.cache.count_rejection,
                                           trust_domain=lambda: self.cache.local_trust_domain)
            retry = self.settings.reconnect.maximum
            self._tasks = [
                asyncio.create_task(_keep_following("own X.509-SVIDs", follower.follow_svids,
                                                    retry)),
                asyncio.create_task(_keep_following("X.509 bundles", follower.follow_bundles,
                                                    retry)),
                asyncio.create_task(_keep_following("JWT bundles",
                                                    follower.follow_jwt_bundles, retry)),
            ]
        if self._heap_trimmer is not None and self._heap_trimmer.available:
            self._trim_task = asyncio.create_task(self._heap_trimmer.run(), name="heap trim")
        if self.settings.trusted_proxies:
            _LOG.info("trusted proxies (may ask for workload:<pod uid>): %s",
                      ", ".join(self.settings.trusted_proxies))

    @property
    def health_address(self) -> HostPort | None:
        """Where /healthz and /readyz listen (the real port for port 0); None: disabled."""
        return self.endpoints.health_address if self.endpoints is not None else None

    @property
    def metrics_address(self) -> HostPort | None:
        """Where /metrics listens (the real port for port 0); None: disabled."""
        return self.endpoints.metrics_address if self.endpoints is not None else None

    def status(self) -> dict[str, Any]:
        """What the agent holds now (GET /status): see :mod:`agent.admin.status`."""
        return build_status(StatusInputs(
            pid=os.getpid(), settings=self.settings, spire=self.client.status,
            sds_listening=self.sds.listening, sds_connections=self.sds.connections,
            sds_stats=self.sds.stats, calls=self.sds.handler.open_calls(),
            workloads=self.cache.workloads(), groups=self.cache.groups(),
            cached=self.cache.cached_svids(), cache_stats=self.cache.stats,
            verifier_stats=self.source.stats, recent_errors=self.recent_errors.snapshot(),
            local_trust_domain=self.cache.local_trust_domain, now=self._clock.time(),
            monotonic=time.monotonic()))

    async def run(self, stop: asyncio.Event) -> None:
        """Returns when ``stop`` is set, or raises what ended a follower for good."""
        await _first_of(stop, self._tasks)
        self._tasks = []

    def hurry(self) -> None:
        """Ends a drain in progress now (the CLI's second SIGTERM or SIGINT): SDS calls
        still open are cancelled; the socket file is still removed."""
        self._hurry.set()

    async def close(self) -> None:
        """SDS drained first (streams end cleanly, socket removed), then the cache and the
        SPIRE connection; bounded by ``shutdown_grace`` as a whole, or cut short by
        :meth:`hurry`. Logs whether every SDS call ended cleanly or how many were cut."""
        if self._closed:
            return
        self._closed = True
        started = time.monotonic()
        grace = self.settings.shutdown_grace
        deadline = started + grace
        calls = len(self.sds.handler.open_calls())
        _LOG.info("shutting down: draining %d SDS call(s) within %gs", calls, grace)
        tasks = [*self._tasks, *([self._trim_task] if self._trim_task is not None else [])]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self.endpoints is not None:
            await self.endpoints.close()
        # Leave a share of the grace for the cache and the client behind SDS.
        sds_deadline = started + grace * 0.8
        cut = await self._drain_sds(max(sds_deadline - time.monotonic(), 0.0))
        if cut is None:
            _LOG.info("drained: every SDS stream ended cleanly (%d call(s) in %.2fs)",
                      calls, time.monotonic() - started)
        elif self._hurry.is_set():
            _LOG.warning("drain cut short by a second signal: %d SDS call(s) cancelled", cut)
        else:
            _LOG.warning("%d SDS call(s) did not end within the shutdown grace (%gs); "
                         "cancelled them", cut, grace)
        for name, closing in (("cache", self.cache.close), ("SPIRE client", self.client.close)):
            left = max(deadline - time.monotonic(), 0.1)
            try:
                async with asyncio.timeout(0.1 if self._hurry.is_set() else left):
                    await closing()
            except TimeoutError:
                _LOG.warning("the %s did not close within the shutdown grace", name)
        _LOG.info("stopped (%.2fs after the shutdown began)", time.monotonic() - started)
        self._log_root.removeHandler(self.recent_errors)

    async def _drain_sds(self, grace: float) -> int | None:
        """Stops the SDS server within ``grace`` (sooner on :meth:`hurry`). Returns None
        when every call ended by itself, else how many were still open when time ran out
        (or the drain was cut short) and were cancelled."""
        stopping = asyncio.create_task(self.sds.stop(grace=grace))
        idle = asyncio.create_task(self.sds.handler.wait_idle())
        hurry = asyncio.create_task(self._hurry.wait())
        cut: int | None = None
        try:
            await asyncio.wait([idle, hurry, stopping], timeout=grace,
                               return_when=asyncio.FIRST_COMPLETED)
            if not idle.done():  # the grace ran out, or a second signal came
                cut = len(self.sds.handler.open_calls())
            while not stopping.done():
                await asyncio.wait([stopping, hurry], return_when=asyncio.FIRST_COMPLETED)
                if hurry.done() and not stopping.done():
                    if cut is None and not idle.done():
                        cut = len(self.sds.handler.open_calls())
                    stopping.cancel()  # SdsServer.stop still removes the socket file
                    await asyncio.wait([stopping])
        finally:
            for task in (idle, hurry):
                task.cancel()
            if not stopping.done():  # close() itself was cancelled
                stopping.cancel()
            await asyncio.gather(idle, hurry, stopping, return_exceptions=True)
        if not stopping.cancelled() and stopping.exception() is not None:
            raise stopping.exception()  # type: ignore[misc]
        return cut

    async def __aenter__(self) -> Agent:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


async def run_agent(settings: AgentSettings, stop: asyncio.Event,
                    sds_listener: socket.socket | None = None) -> None:
    """The ``run`` command's body. The caller sets ``stop`` on SIGTERM or SIGINT; while
    the agent then drains, this takes those two signals over so that a second one ends the
    drain at once (:meth:`Agent.hurry`), and hands them back to ``stop.set`` after."""
    agent = Agent(settings, heap_trimmer=HeapTrimmer(), sds_listener=sds_listener)
    await agent.start()
    try:
        await agent.run(stop)
    finally:
        with _second_signal_hurries(agent, stop):
            await agent.close()


_SHUTDOWN_SIGNALS = (signal.SIGTERM, signal.SIGINT)


@contextlib.contextmanager
def _second_signal_hurries(agent: Agent, stop: asyncio.Event) -> Iterator[None]:
    loop = asyncio.get_running_loop()

    def second(sig: signal.Signals) -> None:
        _LOG.warning("second signal (%s) during the drain: ending it now", sig.name)
        agent.hurry()

    installed = []
    for sig in _SHUTDOWN_SIGNALS:
        try:
            loop.add_signal_handler(sig, second, sig)
        except (RuntimeError, ValueError):  # not the main thread: no signals to take over
            continue
        installed.append(sig)
    try:
        yield
    finally:
        for sig in installed:
            loop.add_signal_handler(sig, stop.set)
