"""Exception hierarchy whose messages tell an operator what went wrong and what to do."""

from __future__ import annotations


class SpiffeDelegateError(Exception):
    """Base of every error this package raises on purpose.

    ``hint`` says what the operator should do; it is part of ``str(error)``.
    """

    def __init__(self, message: str, hint: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return f"{self.message} ({self.hint})" if self.hint else self.message


class ConfigError(SpiffeDelegateError):
    """A flag, environment variable or file has a value we cannot use."""


class SpireError(SpiffeDelegateError):
    """The SPIRE agent answered with an error status."""

    code_name: str = "UNKNOWN"
    retryable: bool = False


class SpirePermissionDenied(SpireError):
    code_name = "PERMISSION_DENIED"


class SpireUnavailable(SpireError):
    code_name = "UNAVAILABLE"
    retryable = True


class SpireInvalidArgument(SpireError):
    code_name = "INVALID_ARGUMENT"


class SpireCallFailed(SpireError):
    """Any other status; ``code_name`` is set per instance."""

    def __init__(self, message: str, hint: str = "", code_name: str = "UNKNOWN",
                 retryable: bool = False) -> None:
        super().__init__(message, hint)
        self.code_name = code_name
        self.retryable = retryable


class SvidRejected(SpiffeDelegateError):
    """An SVID from SPIRE failed validation; ``reason`` is a short metric-friendly label."""

    def __init__(self, message: str, reason: str, hint: str = "") -> None:
        super().__init__(message, hint)
        self.reason = reason


class SvidPending(SpiffeDelegateError):
    """An SVID is valid so far but cannot be verified yet (its trust domain has no bundle)."""


class AttestationError(SpiffeDelegateError):
    """A process could not be attested, or changed while it was being attested."""


class SocketInUse(SpiffeDelegateError):
    """A Unix socket path is held by a live server."""
