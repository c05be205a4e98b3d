"""``spiffe-delegate run``: connects to SPIRE and follows the agent's own identity and bundles.

At this stage the agent subscribes, as an authorized delegate, to its own X.509-SVIDs (by
its own PID), to the X.509 bundles and to the JWT bundles, validates every SVID, and logs
what it holds. Attestation of callers, the cache and SDS are wired in by later issues.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime

from cryptography import x509

from agent.config import AgentSettings
from agent.errors import SpireError, SpirePermissionDenied
from agent.model import JwtBundles, X509Bundles, X509SvidUpdate
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
    """Follows the agent's own SVIDs and the bundles, through an SvidGate."""

    def __init__(self, client: DelegatedIdentityClient, pid: int) -> None:
        self._client = client
        self._pid = pid
        self.gate = SvidGate(label="spiffe-delegate's own identity")
        self.changed = asyncio.Event()
        self._in_use: tuple[bytes, ...] = ()

    def _accepted(self, update: X509SvidUpdate) -> None:
        """Logs the SVIDs in use whenever they change."""
        in_use = tuple(svid.cert_chain[0] for svid in update.svids)
        if in_use == self._in_use:
            return
        self._in_use = in_use
        for line in describe_update(update, datetime.now(UTC)):
            _LOG.info("X.509-SVID in use: %s", line)
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
            self._accepted(self.gate.update_bundles(bundles))

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


async def run_agent(settings: AgentSettings, stop: asyncio.Event) -> None:
    policy = BackoffPolicy(initial=settings.reconnect.initial,
                           maximum=settings.reconnect.maximum,
                           reset_after=settings.reconnect.reset_after)
    _LOG.info("connecting to the SPIRE agent admin socket %s as a delegate (pid %d)",
              settings.spire_admin_socket, os.getpid())
    async with DelegatedIdentityClient(
            str(settings.spire_admin_socket), backoff=policy,
            max_receive_message_bytes=settings.spire_max_message_bytes) as client:
        follower = OwnIdentityFollower(client, os.getpid())
        retry = settings.reconnect.maximum
        tasks = [
            asyncio.create_task(_keep_following("own X.509-SVIDs", follower.follow_svids, retry)),
            asyncio.create_task(_keep_following("X.509 bundles", follower.follow_bundles, retry)),
            asyncio.create_task(_keep_following("JWT bundles", follower.follow_jwt_bundles,
                                                retry)),
        ]
        await _first_of(stop, tasks)
    _LOG.info("stopped")

