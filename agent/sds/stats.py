"""Counters of the SDS server, for metrics, status pages and tests, and its one event hook."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Protocol

__all__ = ["NACK_NAMES_KEPT", "OTHER_NAMES", "NoopSdsObserver", "SdsObserver", "SdsStats"]

NACK_NAMES_KEPT = 256
"""How many distinct names ``nacks_by_name`` keeps; NACKs of any further name are counted
under ``OTHER_NAMES`` (names come from clients: ``workload:<pod uid>`` alone is unbounded)."""
OTHER_NAMES = "(other names)"


class SdsObserver(Protocol):
    """Events that counters cannot carry (metrics); every method must be cheap and must
    not raise."""

    def on_ack(self, seconds: float) -> None:
        """A client ACKed a response ``seconds`` after it was built and sent."""


class NoopSdsObserver:
    """The default observer: does nothing."""

    def on_ack(self, seconds: float) -> None:
        pass


@dataclass
class SdsStats:
    """``streams_active`` is a gauge; everything else counts up.

    ``nacks_by_name`` counts NACKs per resource name, for at most ``NACK_NAMES_KEPT`` names
    (then under ``OTHER_NAMES``; use :meth:`count_nacks`); ``over_limits`` counts requests
    refused by :class:`~agent.sds.limits.SdsLimits`; ``refused`` counts calls ended with an
    error, by gRPC status code name; ``last_nack_detail`` is the newest NACK's
    ``error_detail.message`` (what Envoy said was wrong). ``pushes_by_kind``,
    ``acks_by_kind`` and ``nacks_by_kind`` count resources pushed on streams (a delta
    removal included), ACKed and NACKed, by :func:`agent.sds.names.resource_kind` (a
    bounded label: never a SPIFFE ID or pod UID).
    """

    streams_opened: int = 0
    streams_active: int = 0
    delta_streams_opened: int = 0
    fetches: int = 0
    responses: int = 0
    resources_sent: int = 0
    acks: int = 0
    nacks: int = 0
    nacks_by_name: Counter[str] = field(default_factory=Counter)
    last_nack_detail: str = ""
    stale_nonces: int = 0
    repushes_avoided: int = 0
    caller_failures: int = 0
    callers_exited: int = 0
    refused: Counter[str] = field(default_factory=Counter)
    pushes_by_kind: Counter[str] = field(default_factory=Counter)
    acks_by_kind: Counter[str] = field(default_factory=Counter)
    nacks_by_kind: Counter[str] = field(default_factory=Counter)
    over_limits: int = 0

    def count_nacks(self, names: Iterable[str]) -> None:
        """Books one NACK of each of ``names`` in ``nacks_by_name``, within its bound."""
        for name in names:
            if name in self.nacks_by_name or len(self.nacks_by_name) < NACK_NAMES_KEPT:
                self.nacks_by_name[name] += 1
            else:
                self.nacks_by_name[OTHER_NAMES] += 1
