"""Counters that tests read to see what dev-spire did (streams, SVIDs minted, reloads)."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field


@dataclass
class Stats:
    """Plain counters; RPC-keyed ones use the short method name, e.g. "SubscribeToX509SVIDs"."""

    open_streams: Counter[str] = field(default_factory=Counter)
    streams_opened: Counter[str] = field(default_factory=Counter)
    responses_sent: Counter[str] = field(default_factory=Counter)
    errors_returned: Counter[str] = field(default_factory=Counter)
    svids_minted: int = 0
    jwt_svids_minted: int = 0
    entries_loaded: int = 0
    entries_reloads: int = 0
    reload_errors: int = 0
    pods_reloads: int = 0
    faults_reloads: int = 0
    ca_rotations: int = 0
