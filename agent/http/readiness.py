"""Readiness rules for /readyz: pure functions of the SDS socket's state, SPIRE's status and
a clock, so that every rule is testable without a server."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from agent.spire.client import ClientStatus

__all__ = ["OK", "Readiness", "ReadinessProbe", "assess", "spire_problem"]

OK = "ok"


@dataclass(frozen=True)
class Readiness:
    """``checks``: check name -> ``"ok"`` or why it fails."""

    checks: Mapping[str, str]

    @property
    def ready(self) -> bool:
        return all(outcome == OK for outcome in self.checks.values())

    def to_json(self) -> bytes:
        return json.dumps({"ready": self.ready, "checks": dict(self.checks)}).encode() + b"\n"


def spire_problem(status: ClientStatus, *, now: float, limit: float) -> str | None:
    """Why SPIRE makes the agent unready, or None.

    Ready once SPIRE has answered at least once, and for as long as it has not been
    unreachable for more than ``limit`` seconds (``now`` and ``status.unreachable_since``
    on the client's clock). Meanwhile the agent keeps serving what it has cached.
    """
    why = status.last_error or "no answer from SPIRE yet"
    if not status.reached:
        return f"never reached: {why}"
    if status.unreachable_since is None:
        return None
    down = max(now - status.unreachable_since, 0.0)
    if down <= limit:
        return None
    return (f"unreachable for {down:.0f}s (more than --ready-spire-timeout {limit:g}s; "
            f"serving cached SVIDs meanwhile): {why}")


def assess(*, sds_problem: str | None, spire: ClientStatus, now: float,
           spire_timeout: float) -> Readiness:
    """The readiness verdict: the SDS socket listens, and SPIRE is (recently) reachable."""
    spire_why = spire_problem(spire, now=now, limit=spire_timeout)
    return Readiness({"sds_socket": sds_problem or OK, "spire": spire_why or OK})


class ReadinessProbe:
    """Reads the live parts on each call. ``clock`` must be the SPIRE client's monotonic
    clock (``time.monotonic`` unless the client was given another)."""

    def __init__(self, *, sds_problem: Callable[[], str | None],
                 spire_status: Callable[[], ClientStatus], spire_timeout: float,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._sds_problem = sds_problem
        self._spire_status = spire_status
        self._spire_timeout = spire_timeout
        self._clock = clock

    def check(self) -> Readiness:
        return assess(sds_problem=self._sds_problem(), spire=self._spire_status(),
                      now=self._clock(), spire_timeout=self._spire_timeout)
