"""What one SDS client may ask of the server: name sizes, names per request, connections,
streams, and how long a connection may stay silent. Bounded error text for hostile names.

The defaults leave every real Envoy far inside them (a SPIFFE ID is at most 2048 bytes,
Envoy asks for one name per SotW stream, a node runs a few hundred pods at most) while
keeping what a hostile local client can make the agent hold to a known size.
"""

from __future__ import annotations

import json
from collections.abc import Collection, Iterable
from dataclasses import dataclass

from agent.errors import ConfigError

__all__ = ["SdsLimits", "quote_name", "quote_names"]

_SHOWN_NAMES = 8
_SHOWN_CHARS = 120


def quote_name(name: str) -> str:
    """``name`` as a JSON string with every unprintable character escaped (a name can
    never forge a log line or hide behind bidi controls), cut to a readable length."""
    shown = _escaped(name[:_SHOWN_CHARS])
    if len(name) > _SHOWN_CHARS:
        return shown + f"... ({len(name.encode('utf-8', 'surrogatepass'))} bytes)"
    return shown


def _escaped(text: str) -> str:
    quoted = json.dumps(text, ensure_ascii=False)
    return "".join(c if c.isprintable() else f"\\u{ord(c):04x}" for c in quoted)


def quote_names(names: Iterable[str], *, sep: str = ", ") -> str:
    """Up to a handful of names, quoted as :func:`quote_name`, then how many more."""
    listed = list(names)
    shown = sep.join(quote_name(name) for name in listed[:_SHOWN_NAMES])
    more = len(listed) - _SHOWN_NAMES
    return shown + (f"{sep}and {more} more" if more > 0 else "")


@dataclass(frozen=True)
class SdsLimits:
    """``max_name_bytes``: the longest resource name (UTF-8 bytes); ``max_names``: names in
    one request (and, for a delta stream, names subscribed at once);
    ``max_connections``: open connections on the socket; ``max_streams_per_connection``:
    concurrent calls on one connection (HTTP/2 SETTINGS, so a client queues more rather
    than failing); ``handshake_timeout``: seconds a new connection has to send the HTTP/2
    preface; ``idle_timeout``: seconds a connection with no call open is kept."""

    max_name_bytes: int = 2048
    max_names: int = 1024
    max_connections: int = 4096
    max_streams_per_connection: int = 1024
    handshake_timeout: float = 10.0
    idle_timeout: float = 300.0

    def __post_init__(self) -> None:
        for flag, value in (("--sds-max-name-bytes", self.max_name_bytes),
                            ("--sds-max-names", self.max_names),
                            ("--sds-max-connections", self.max_connections),
                            ("--sds-max-streams-per-connection",
                             self.max_streams_per_connection)):
            if value < 1:
                raise ConfigError(f"{flag} must be at least 1 (it is {value})")
        if self.max_name_bytes < 256:
            raise ConfigError(f"--sds-max-name-bytes {self.max_name_bytes} is too small for "
                              "SDS names (trust domains alone may be 255 bytes)",
                              "give at least 256; the default, 2048, fits any SPIFFE ID")
        for flag, seconds in (("--sds-handshake-timeout", self.handshake_timeout),
                              ("--sds-idle-timeout", self.idle_timeout)):
            if seconds <= 0:
                raise ConfigError(f"{flag} must be greater than zero")

    def check_names(self, names: Collection[str], *, what: str = "in one request") -> str | None:
        """None if ``names`` are within the limits, else an INVALID_ARGUMENT message that
        says which limit was passed and what to do."""
        if len(names) > self.max_names:
            return (f"{len(names)} resource names {what}; at most {self.max_names} are "
                    "accepted (--sds-max-names): ask for fewer names per stream (Envoy "
                    "opens one stream per secret name)")
        for name in names:
            size = len(name.encode("utf-8", "surrogatepass"))
            if size > self.max_name_bytes:
                return (f"resource name {quote_name(name)} is too long: {size} bytes, at "
                        f"most {self.max_name_bytes} are accepted (--sds-max-name-bytes): SDS "
                        "names are 'default', 'ROOTCA', 'ALL', spiffe://<trust domain>, a "
                        "SPIFFE ID (at most 2048 bytes) or workload:<pod uid>")
        return None
