"""Exponential back-off with full jitter for reconnecting to the SPIRE agent."""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class BackoffPolicy:
    """How long to wait between attempts to reach SPIRE.

    The n-th consecutive failure waits a uniformly random time in
    ``[0, min(maximum, initial * multiplier**n))`` ("full jitter"), so that many
    delegates restarting with one SPIRE agent do not reconnect in lock-step.
    A stream that stayed healthy for ``reset_after`` seconds starts again from
    ``initial``. ``max_attempts`` bounds consecutive failures (``None``: retry forever).
    """

    initial: float = 0.1
    maximum: float = 30.0
    multiplier: float = 2.0
    reset_after: float = 30.0
    max_attempts: int | None = None

    def __post_init__(self) -> None:
        if self.initial <= 0:
            raise ValueError(f"backoff initial delay must be > 0, got {self.initial}")
        if self.maximum < self.initial:
            raise ValueError(
                f"backoff maximum ({self.maximum}) must be >= initial ({self.initial})"
            )
        if self.multiplier < 1:
            raise ValueError(f"backoff multiplier must be >= 1, got {self.multiplier}")
        if self.reset_after < 0:
            raise ValueError(f"backoff reset_after must be >= 0, got {self.reset_after}")
        if self.max_attempts is not None and self.max_attempts < 1:
            raise ValueError(f"backoff max_attempts must be >= 1 or None, got {self.max_attempts}")


class Backoff:
    """The back-off state of one retry loop (one subscription or one unary call)."""

    def __init__(
        self,
        policy: BackoffPolicy,
        *,
        rng: random.Random | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._policy = policy
        self._rng = rng if rng is not None else random.Random()
        self._clock = clock
        self._failures = 0
        self._ceiling = policy.initial
        self._healthy_since: float | None = None

    @property
    def policy(self) -> BackoffPolicy:
        return self._policy

    @property
    def failures(self) -> int:
        """Consecutive failures since the last reset."""
        return self._failures

    @property
    def exhausted(self) -> bool:
        """True when ``max_attempts`` consecutive failures have happened."""
        limit = self._policy.max_attempts
        return limit is not None and self._failures >= limit

    def healthy(self) -> None:
        """Marks the start of a healthy period (e.g. the first message on a stream)."""
        if self._healthy_since is None:
            self._healthy_since = self._clock()

    def failed(self) -> float:
        """Records a failure and returns how long to wait before the next attempt.

        If the connection had been healthy for at least ``reset_after`` seconds the
        sequence restarts, so a long-lived stream that breaks reconnects quickly.
        """
        if (
            self._healthy_since is not None
            and self._clock() - self._healthy_since >= self._policy.reset_after
        ):
            self.reset()
        self._healthy_since = None
        self._failures += 1
        delay = self._rng.uniform(0.0, self._ceiling)
        # Grow the ceiling iteratively: initial * multiplier**n overflows a float
        # after ~1000 failures, and the cap is reached long before that anyway.
        self._ceiling = min(self._policy.maximum, self._ceiling * self._policy.multiplier)
        return delay

    def reset(self) -> None:
        self._failures = 0
        self._ceiling = self._policy.initial
        self._healthy_since = None
