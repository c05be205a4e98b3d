"""dev-spire's lifecycle: settings, start/stop, file reloads, rotation loop, and the CLI entry."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

import grpc

from agent._proto.spire.api.agent.delegatedidentity.v1 import delegatedidentity_pb2_grpc as pb_grpc
from agent.devspire.attestor import Attestor
from agent.devspire.ca import KEY_TYPES, Clock, TrustDomainCA
from agent.devspire.cache import IdentityCache
from agent.devspire.entries import load_entries, validate_spiffe_id, validate_trust_domain
from agent.devspire.faults import Faults
from agent.devspire.keystore import KeyStore, open_local_ca
from agent.devspire.pods import PodList, load_pods
from agent.devspire.service import DelegatedIdentityService
from agent.devspire.stats import Stats
from agent.errors import ConfigError
from agent.uds.relay import PeerCredentialRelay

_LOG = logging.getLogger("spiffe_delegate.devspire")
# The longest the rotation loop sleeps, so that a clock that jumps is noticed soon.
_MAX_TICK = 1.0


@dataclass(frozen=True)
class DevSpireSettings:
    """Everything dev-spire needs; durations are seconds."""

    socket_path: str
    trust_domain: str
    entries_path: str
    pods_path: str | None = None
    authorized_delegates: tuple[str, ...] = ()
    svid_ttl: float = 3600.0
    ca_ttl: float = 86400.0
    jwt_svid_ttl: float = 300.0
    proc_root: str = "/proc"
    reload_interval: float = 1.0
    faults_path: str | None = None
    socket_mode: int = 0o770
    key_type: str = "ec-p256"
    max_message_bytes: int = 64 * 1024 * 1024
    shutdown_grace: float = 1.0
    data_dir: str | None = None  # where the local CA's keys outlive a restart; None: memory

    def validate(self) -> None:
        """Raises ConfigError naming the first setting that cannot work."""
        try:
            validate_trust_domain(self.trust_domain)
        except ValueError as exc:
            raise ConfigError(f"trust domain: {exc}", "e.g. --trust-domain example.org") from None
        for delegate in self.authorized_delegates:
            try:
                validate_spiffe_id(delegate, trust_domain=self.trust_domain)
            except ValueError as exc:
                raise ConfigError(f"error validating authorized delegate: {exc}",
                                  "authorized delegates are SPIFFE IDs in the trust domain"
                                  ) from None
        for name in ("svid_ttl", "ca_ttl", "jwt_svid_ttl", "reload_interval"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)}")
        if self.svid_ttl > self.ca_ttl:
            _LOG.warning("svid_ttl %ss exceeds ca_ttl %ss; SVIDs are cut short at CA expiry",
                         self.svid_ttl, self.ca_ttl)
        if self.key_type not in KEY_TYPES:
            raise ConfigError(f"key type {self.key_type!r} is not one of {', '.join(KEY_TYPES)}")
        if self.data_dir is not None and os.path.exists(self.data_dir) and \
                not os.path.isdir(self.data_dir):
            raise ConfigError(f"data dir {self.data_dir} is not a directory",
                              "point --data-dir at a directory, or at a path to create")


class _WatchedFile:
    """Notices when a file changes (mtime, size or inode) between polls."""

    def __init__(self, path: str) -> None:
        self.path = Path(path)
        self._seen: tuple[int, int, int] | None = self._stamp()

    def _stamp(self) -> tuple[int, int, int] | None:
        try:
            st = self.path.stat()
        except OSError:
            return None
        return st.st_mtime_ns, st.st_size, st.st_ino

    def changed(self) -> bool:
        stamp = self._stamp()
        if stamp == self._seen:
            return False
        self._seen = stamp
        return stamp is not None


class DevSpire:
    """A SPIRE-agent-compatible Delegated Identity API server for development and tests."""

    def __init__(self, settings: DevSpireSettings, *, clock: Clock = time.time,
                 faults: Faults | None = None) -> None:
        self.settings = settings
        self.stats = Stats()
        self.faults = faults or Faults()
        self._clock = clock
        self._cache: IdentityCache | None = None
        self._service: DelegatedIdentityService | None = None
        self._relay: PeerCredentialRelay | None = None
        self._server: grpc.aio.Server | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._watched: list[tuple[_WatchedFile, Callable[[], None]]] = []
        self._reload_now = asyncio.Event()

    # --- lifecycle -------------------------------------------------------------------------
    async def start(self) -> None:
        s = self.settings
        s.validate()
        entries = load_entries(s.entries_path, s.trust_domain)  # a bad file fails start-up
        pods = load_pods(s.pods_path) if s.pods_path else PodList()
        if s.faults_path:
            self._load_faults_file(s.faults_path)
        local: TrustDomainCA | None = None
        if s.data_dir is not None:
            local = open_local_ca(KeyStore(s.data_dir), s.trust_domain, ca_ttl=s.ca_ttl,
                                  clock=self._clock, key_type=s.key_type)
        self._cache = IdentityCache(s.trust_domain, svid_ttl=s.svid_ttl,
                                    jwt_svid_ttl=s.jwt_svid_ttl, ca_ttl=s.ca_ttl,
                                    clock=self._clock, stats=self.stats, key_type=s.key_type,
                                    local=local)
        self._cache.set_entries(entries)
        self._relay = PeerCredentialRelay(s.socket_path, mode=s.socket_mode)
        self._service = DelegatedIdentityService(
            cache=self._cache, attestor=Attestor(s.proc_root, pods), peers=self._relay.lookup,
            authorized_delegates=s.authorized_delegates, faults=self.faults, stats=self.stats,
            clock=self._clock)
        self._server = grpc.aio.server(options=[
            ("grpc.max_receive_message_length", s.max_message_bytes),
            ("grpc.max_send_message_length", s.max_message_bytes),
        ])
        pb_grpc.add_DelegatedIdentityServicer_to_server(self._service, self._server)
        self._server.add_insecure_port(self._relay.inner_target)
        await self._server.start()
        try:
            await self._relay.start()
        except BaseException:
            await self._server.stop(None)
            raise
        self._watched = [(_WatchedFile(s.entries_path), self._reload_entries)]
        if s.pods_path:
            self._watched.append((_WatchedFile(s.pods_path), self._reload_pods))
        if s.faults_path:
            self._watched.append((_WatchedFile(s.faults_path), self._reload_faults))
        self._tasks = [asyncio.create_task(self._rotation_loop(), name="devspire-rotation"),
                       asyncio.create_task(self._reload_loop(), name="devspire-reload")]
        _LOG.info("dev-spire serving trust domain %s on %s (%d entries, delegates %s)",
                  s.trust_domain, s.socket_path, len(entries), list(s.authorized_delegates))

    async def stop(self, grace: float | None = None) -> None:
        """Stops serving: open streams get ``grace`` seconds, then the socket file goes."""
        grace = self.settings.shutdown_grace if grace is None else grace
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []
        if self._server is not None:
            await self._server.stop(grace)
            self._server = None
        if self._relay is not None:
            await self._relay.close()
            self._relay = None
        _LOG.info("dev-spire stopped")

    async def __aenter__(self) -> DevSpire:
        await self.start()
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        await self.stop()

    # --- for tests -------------------------------------------------------------------------
    @property
    def cache(self) -> IdentityCache:
        if self._cache is None:
            raise RuntimeError("dev-spire is not started")
        return self._cache

    @property
    def socket_path(self) -> str:
        return self.settings.socket_path

    def bundle_der(self, trust_domain: str | None = None) -> bytes:
        """The current X.509 bundle of the local (or a federated) trust domain."""
        if trust_domain is None:
            return self.cache.local.bundle_der()
        return self.cache.federated_ca(trust_domain).bundle_der()

    async def rotate_now(self, spiffe_id: str | None = None) -> int:
        """Re-mints cached SVIDs (all, or one SPIFFE ID's) and pushes them; returns how many."""
        return self.cache.rotate_svids(spiffe_id)

    async def rotate_ca_now(self, trust_domain: str | None = None) -> None:
        """Publishes and activates a new CA; the old one stays in the bundle until it expires."""
        self.cache.rotate_ca(trust_domain)

    async def tick(self) -> None:
        """Runs whatever the (possibly fake) clock says is due, at once."""
        self.cache.tick()

    def reload(self) -> None:
        """Reloads every file now (what SIGHUP does), whether or not it changed."""
        for watched, reload_fn in self._watched:
            watched.changed()
            reload_fn()

    def request_reload(self) -> None:
        """Asks the reload loop to reload every file soon (signal-handler safe)."""
        self._reload_now.set()

    # --- internals ---------------------------------------------------------------------------
    def _reload_entries(self) -> None:
        try:
            entries = load_entries(self.settings.entries_path, self.settings.trust_domain)
        except ConfigError as exc:
            self.stats.reload_errors += 1
            _LOG.error("keeping the previous entries: %s", exc)
            return
        self.cache.set_entries(entries)
        self.stats.entries_reloads += 1
        _LOG.info("entries reloaded: %d entries", len(entries))

    def _reload_pods(self) -> None:
        assert self.settings.pods_path and self._service is not None
        try:
            pods = load_pods(self.settings.pods_path)
        except ConfigError as exc:
            self.stats.reload_errors += 1
            _LOG.error("keeping the previous pods: %s", exc)
            return
        self._service.attestor = Attestor(self.settings.proc_root, pods)
        self.stats.pods_reloads += 1
        _LOG.info("pods reloaded: %d pods", len(pods.pods))

    def _reload_faults(self) -> None:
        assert self.settings.faults_path
        path = self.settings.faults_path
        try:
            self._load_faults_file(path)
        except ConfigError as exc:
            self.stats.reload_errors += 1
            _LOG.error("keeping the previous faults: %s", exc)
            return
        self.stats.faults_reloads += 1
        _LOG.info("faults reloaded from %s", path)

    def _load_faults_file(self, path: str) -> None:
        """A missing faults file means no faults."""
        if os.path.exists(path):
            self.faults.load_file(path)
        else:
            self.faults.clear()

    async def _reload_loop(self) -> None:
        while True:
            await _wait(self._reload_now, self.settings.reload_interval)
            if self._reload_now.is_set():
                self._reload_now.clear()
                self.reload()
                continue
            for watched, reload_fn in self._watched:
                if watched.changed():
                    reload_fn()

    async def _rotation_loop(self) -> None:
        cache = self.cache
        while True:
            try:
                cache.tick()
            except Exception:  # keep rotating later SVIDs even if one mint fails
                _LOG.exception("rotation tick failed")
            delay = min(max(cache.next_due() - self._clock(), 0.005), _MAX_TICK)
            cache.wakeup.clear()
            await _wait(cache.wakeup, delay)


async def _wait(event: asyncio.Event, seconds: float) -> None:
    """Waits until ``event`` is set or ``seconds`` pass. Not ``asyncio.wait_for``: on
    Python 3.11 it swallows a cancellation that arrives as the event is set, and ``stop()``
    then waits for the loop forever (a CA rotation just before a stop did that)."""
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(seconds):
            await event.wait()


async def serve_dev_spire(settings: DevSpireSettings, stop: asyncio.Event) -> None:
    """Runs dev-spire until ``stop`` is set; SIGHUP reloads the entries, pods and faults files."""
    loop = asyncio.get_running_loop()
    async with DevSpire(settings) as dev:
        hup_installed = False
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
            loop.add_signal_handler(signal.SIGHUP, dev.request_reload)
            hup_installed = True
        try:
            await stop.wait()
        finally:
            if hup_installed:
                loop.remove_signal_handler(signal.SIGHUP)

