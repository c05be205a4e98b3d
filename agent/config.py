"""The agent's settings: one frozen object built from flags and SPIFFE_DELEGATE_* variables."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from pathlib import Path

from agent.durations import parse_duration
from agent.sds.names import SdsNames

DEFAULT_SPIRE_ADMIN_SOCKET = "/run/spire/admin/admin.sock"
DEFAULT_SDS_SOCKET = "/run/spiffe-delegate/sds.sock"


@dataclass(frozen=True)
class HostPort:
    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def parse_host_port(text: str) -> HostPort:
    """``127.0.0.1:9090``, ``[::1]:9090`` or ``localhost:9090``."""
    if text.startswith("["):
        host, sep, port = text[1:].partition("]:")
        if not sep:
            raise ValueError(f"{text!r} is not HOST:PORT; write IPv6 as [::1]:9090")
        ipaddress.IPv6Address(host)
    else:
        host, sep, port = text.rpartition(":")
        if not sep or not host or ":" in host:
            raise ValueError(f"{text!r} is not HOST:PORT, e.g. 127.0.0.1:9090 or [::1]:9090")
    if not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"{text!r}: port must be a number from 0 to 65535")
    return HostPort(host, int(port))


def positive_duration(text: str) -> float:
    seconds = parse_duration(text)
    if seconds <= 0:
        raise ValueError(f"{text!r}: the duration must be greater than zero")
    return seconds


def byte_size(text: str) -> int:
    """``64MiB``, ``4MB``, ``1048576``."""
    units = {"kib": 1024, "mib": 1024**2, "gib": 1024**3, "kb": 1000, "mb": 1000**2,
             "gb": 1000**3, "b": 1}
    lowered = text.strip().lower()
    for unit, factor in units.items():
        if lowered.endswith(unit) and lowered[: -len(unit)].strip().isdigit():
            return int(lowered[: -len(unit)]) * factor
    if lowered.isdigit():
        return int(lowered)
    raise ValueError(f"{text!r} is not a size; use e.g. 64MiB or 4194304")


@dataclass(frozen=True)
class ReconnectSettings:
    initial: float = 0.1
    maximum: float = 30.0
    reset_after: float = 30.0


@dataclass(frozen=True)
class AgentSettings:
    """``sds_names``: SPIRE's ``sds { ... }`` settings. ``cache_key``: "workload" (one
    SPIRE subscription per pod) or "identity" (pods with the same SPIFFE IDs share one).
    ``trusted_proxies``: SPIFFE IDs whose holders may ask for ``workload:<pod uid>``.
    ``shutdown_grace``: seconds SIGTERM may take."""

    spire_admin_socket: Path = Path(DEFAULT_SPIRE_ADMIN_SOCKET)
    sds_socket: Path = Path(DEFAULT_SDS_SOCKET)
    sds_socket_mode: int = 0o666
    sds_socket_group: int | None = None
    sds_names: SdsNames = field(default_factory=SdsNames)
    cache_key: str = "workload"
    trusted_proxies: tuple[str, ...] = ()
    shutdown_grace: float = 5.0
    health_address: HostPort = field(default_factory=lambda: HostPort("127.0.0.1", 8086))
    metrics_address: HostPort = field(default_factory=lambda: HostPort("127.0.0.1", 9086))
    trust_domain: str | None = None
    log_format: str = "text"
    log_level: str = "info"
    reconnect: ReconnectSettings = field(default_factory=ReconnectSettings)
    spire_max_message_bytes: int = 64 * 1024 * 1024
