"""Errors of the demo tooling: missing programs, failed pushes and failed pulls."""

from __future__ import annotations

from agent.errors import SpiffeDelegateError


class DemoDependencyMissing(SpiffeDelegateError):
    """A program the demo runs (docker-registry, skopeo) is not installed."""


class PushFailed(SpiffeDelegateError):
    """skopeo could not push an image.

    ``denied`` is true when the registry or a proxy in front of it refused the request
    (HTTP 401/403, ``denied``, ``unauthorized``), as opposed to it being unreachable or broken.
    ``status`` is the HTTP status skopeo reported, when it reported one.
    """

    def __init__(self, message: str, hint: str = "", *, denied: bool = False,
                 status: int | None = None, stderr: str = "") -> None:
        super().__init__(message, hint)
        self.denied = denied
        self.status = status
        self.stderr = stderr


class PullFailed(SpiffeDelegateError):
    """A registry pull failed: a non-2xx answer, a digest mismatch or no connection.

    ``status`` is the HTTP status of the failing answer (None when there was no answer),
    ``what`` says what was being fetched ("manifest", "blob sha256:..."), ``url`` where from.
    """

    def __init__(self, status: int | None, what: str, *, url: str, detail: str = "",
                 hint: str = "") -> None:
        answered = f"HTTP {status}" if status is not None else "no answer"
        message = f"pulling {what} from {url}: {answered}"
        if detail:
            message += f": {detail}"
        super().__init__(message, hint)
        self.status = status
        self.what = what
        self.url = url
        self.detail = detail


class BadHttpResponse(SpiffeDelegateError):
    """A server's answer is not well-formed HTTP/1.1."""
