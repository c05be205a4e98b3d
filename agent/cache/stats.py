"""Counters the cache keeps for metrics and status (read them, never write them)."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

__all__ = ["CacheStats"]


@dataclass
class CacheStats:
    """``svids_rejected``: SVIDs the gates refused, by reason; ``expiry_warnings``: SVIDs
    that passed 80% of their life unrotated; ``unmatched``: times a workload was reported
    as matching no registration entry; ``carrier_handovers``: shared subscriptions moved
    to another pod (identity mode); ``attestations``: workloads attested (identity mode);
    ``rotations``: times an entry's SVID for a SPIFFE ID was replaced by another
    certificate (a rotation, as seen by the cache)."""

    svids_rejected: Counter[str] = field(default_factory=Counter)
    expiry_warnings: int = 0
    unmatched: int = 0
    carrier_handovers: int = 0
    attestations: int = 0
    entries_opened: int = 0
    entries_closed: int = 0
    rotations: int = 0
