"""The newest warnings and errors an agent logged, kept for its /status page."""

from __future__ import annotations

import collections
import logging
from dataclasses import dataclass

__all__ = ["RecentError", "RecentErrors"]

_MAX_MESSAGE = 500


@dataclass(frozen=True)
class RecentError:
    """One log record: ``time`` is wall-clock seconds since the epoch."""

    time: float
    level: str
    logger: str
    message: str


class RecentErrors(logging.Handler):
    """A logging handler that remembers the last ``capacity`` records at ``level`` or worse.

    The agent attaches it to its ``spiffe_delegate`` logger while it runs (so every module's
    warnings reach it) and detaches it on close. Messages are cut at 500 characters; the
    agent's log lines carry SPIFFE IDs, PIDs and SPIRE's error text, never key material.
    """

    def __init__(self, capacity: int = 20, level: int = logging.WARNING) -> None:
        super().__init__(level)
        self._records: collections.deque[RecentError] = collections.deque(maxlen=capacity)

    def emit(self, record: logging.LogRecord) -> None:
        try:
            message = record.getMessage()
        except Exception:  # a bad format string must not break the agent's logging
            self.handleError(record)
            return
        if len(message) > _MAX_MESSAGE:
            message = message[:_MAX_MESSAGE] + "..."
        self._records.append(RecentError(record.created, record.levelname, record.name,
                                         message))

    def snapshot(self) -> tuple[RecentError, ...]:
        """Oldest first."""
        return tuple(self._records)
