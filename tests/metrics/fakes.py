"""Scripted stand-ins for the parts AgentMetrics reads: plain stats objects the test sets."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from agent.attest.verifier import VerifierStats
from agent.cache.keys import CompositeId
from agent.cache.stats import CacheStats
from agent.sds.stats import SdsStats
from agent.spire.client import ClientStatus
from agent.spire.validation import VerifiedSvid


@dataclass
class FakeClient:
    status: ClientStatus = field(default_factory=lambda: ClientStatus(
        socket_path="/run/spire/admin.sock", connected=False, reconnects=0, active_streams=0,
        last_error=None, last_error_code=None))


@dataclass
class FakeVerifier:
    stats: VerifierStats = field(default_factory=VerifierStats)


@dataclass
class FakeCache:
    stats: CacheStats = field(default_factory=CacheStats)
    entries: dict[CompositeId, dict[str, VerifiedSvid]] = field(default_factory=dict)

    def cached_svids(self) -> Mapping[CompositeId, Mapping[str, VerifiedSvid]]:
        return self.entries


@dataclass
class FakeSds:
    stats: SdsStats = field(default_factory=SdsStats)
    rejected_connections: dict[str, int] = field(default_factory=dict)
