"""What the demo watches: a pull loop through the node proxy, and the SVIDs each Envoy holds.

:class:`PullLoop` pulls the image (manifest and every blob, digests checked) back to back
and counts successes and failures, keeping each failure's reason. :class:`RotationWatch`
polls each Envoy's admin ``/certs`` and records every serial it has shown, so a rotation is
seen as it happens and tests can check that every minted serial reached its Envoy.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime

from agent.demo.envoy import CertDetails
from agent.demo.errors import PullFailed
from agent.demo.pull import pull_image

__all__ = ["Held", "PullCounts", "PullLoop", "Rotation", "RotationWatch"]


@dataclass
class PullCounts:
    ok: int = 0
    failed: int = 0
    failures: list[str] = field(default_factory=list)

    def record_failure(self, reason: str) -> None:
        self.failed += 1
        if len(self.failures) < 100:
            self.failures.append(f"{time.strftime('%H:%M:%S')} {reason}")


class PullLoop:
    """Pulls ``repository:tag`` from ``base_url`` until cancelled (``pause`` seconds apart)."""

    def __init__(self, base_url: str, repository: str, tag: str, *, pause: float = 0.0,
                 timeout: float = 10.0) -> None:
        self.base_url = base_url
        self.repository = repository
        self.tag = tag
        self.pause = pause
        self.timeout = timeout
        self.counts = PullCounts()

    async def run(self) -> None:
        while True:
            try:
                await pull_image(self.base_url, self.repository, self.tag,
                                 timeout=self.timeout)
                self.counts.ok += 1
            except PullFailed as exc:
                self.counts.record_failure(exc.message)
            except (OSError, TimeoutError) as exc:
                self.counts.record_failure(f"{type(exc).__name__}: {exc}")
            await asyncio.sleep(self.pause)


@dataclass(frozen=True)
class Held:
    """What one Envoy holds now: serial (hex), expiry (seconds since the epoch)."""

    serial: str
    expires_at: float


@dataclass(frozen=True)
class Rotation:
    role: str
    old: str
    new: str
    at: float


def _expiry(cert: CertDetails) -> float:
    try:
        return datetime.fromisoformat(cert.expiration_time.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return 0.0


class RotationWatch:
    """Polls ``sources`` (role -> coroutine giving the SVID it holds) every ``interval``."""

    def __init__(self, sources: Mapping[str, Callable[[], Awaitable[CertDetails | None]]],
                 *, interval: float = 0.2,
                 on_rotation: Callable[[Rotation], None] | None = None) -> None:
        self._sources = sources
        self.interval = interval
        self._on_rotation = on_rotation
        self.held: dict[str, Held] = {}
        self.seen: dict[str, list[int]] = {role: [] for role in sources}
        self.rotations: list[Rotation] = []

    async def poll_once(self) -> None:
        for role, source in self._sources.items():
            cert = await source()
            if cert is None:
                continue
            now = Held(cert.serial_number, _expiry(cert))
            before = self.held.get(role)
            self.held[role] = now
            if cert.serial not in self.seen[role]:
                self.seen[role].append(cert.serial)
            if before is not None and before.serial != now.serial:
                rotation = Rotation(role, before.serial, now.serial, time.time())
                self.rotations.append(rotation)
                if self._on_rotation is not None:
                    self._on_rotation(rotation)

    async def run(self) -> None:
        while True:
            await self.poll_once()
            await asyncio.sleep(self.interval)
