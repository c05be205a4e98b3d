"""The agent's settings: one frozen object built from flags and SPIFFE_DELEGATE_* variables."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from pathlib import Path

from agent.durations import parse_duration
from agent.errors import ConfigError
from agent.sds.limits import SdsLimits
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


def listen_address(text: str) -> HostPort | None:
    """:func:`parse_host_port`, or None (the endpoint is disabled) for ``off`` or nothing.
    Port 0 binds a free port."""
    if text.strip().lower() in ("", "off"):
        return None
    return parse_host_port(text)


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


METRICS_TLS_MODES = ("none", "spiffe", "files")


@dataclass(frozen=True)
class MetricsTlsSettings:
    """How /metrics is protected. ``none``: plain HTTP. ``spiffe``: the agent's own SVID,
    client SVIDs from its trust domain, only ``allowed_ids``. ``files``: certificate, key
    and client CA from files (as cert-manager writes them), reloaded when they change;
    ``allowed_ids``, if any, must then name the client certificate's URI SAN."""

    mode: str = "none"
    allowed_ids: tuple[str, ...] = ()
    cert_file: Path | None = None
    key_file: Path | None = None
    client_ca_file: Path | None = None
    reload_interval: float = 10.0

    def validate(self, trust_domain: str | None = None) -> None:
        """Raises ConfigError naming the flag when the combination cannot work."""
        if self.mode not in METRICS_TLS_MODES:
            raise ConfigError(f"--metrics-tls-mode {self.mode!r} is not one of "
                              f"{', '.join(METRICS_TLS_MODES)}")
        files = {"--metrics-cert-file": self.cert_file, "--metrics-key-file": self.key_file,
                 "--metrics-client-ca-file": self.client_ca_file}
        if self.mode == "files":
            missing = [flag for flag, path in files.items() if path is None]
            if missing:
                raise ConfigError(
                    f"--metrics-tls-mode files needs {', '.join(missing)}",
                    "give the certificate, key and client CA files, e.g. tls.crt, tls.key "
                    "and ca.crt of a cert-manager Secret")
        elif any(path is not None for path in files.values()):
            given = ", ".join(flag for flag, path in files.items() if path is not None)
            raise ConfigError(f"{given} only apply with --metrics-tls-mode files "
                              f"(it is {self.mode})",
                              "set --metrics-tls-mode files, or drop them")
        if self.mode == "spiffe" and not self.allowed_ids:
            raise ConfigError(
                "--metrics-tls-mode spiffe needs at least one --metrics-allowed-id",
                "list the SPIFFE IDs of the scrapers, e.g. "
                "--metrics-allowed-id spiffe://example.org/ns/monitoring/sa/prometheus")
        if self.mode == "none" and self.allowed_ids:
            raise ConfigError("--metrics-allowed-id only applies with --metrics-tls-mode "
                              "spiffe or files (it is none: /metrics is plain HTTP)",
                              "set --metrics-tls-mode, or drop --metrics-allowed-id")
        if self.mode == "spiffe" and trust_domain is not None:
            prefix = f"spiffe://{trust_domain}/"
            foreign = [sid for sid in self.allowed_ids if not sid.startswith(prefix)]
            if foreign:
                raise ConfigError(
                    f"--metrics-allowed-id {foreign[0]} is outside the trust domain "
                    f"{trust_domain}: with --metrics-tls-mode spiffe only client SVIDs of "
                    "the agent's own trust domain are accepted",
                    f"use a SPIFFE ID under spiffe://{trust_domain}/")
        if self.reload_interval <= 0:
            raise ConfigError("--metrics-tls-reload-interval must be greater than zero")


@dataclass(frozen=True)
class AgentSettings:
    """``sds_names``: SPIRE's ``sds { ... }`` settings. ``cache_key``: "workload" (one
    SPIRE subscription per pod) or "identity" (pods with the same SPIFFE IDs share one).
    ``trusted_proxies``: SPIFFE IDs whose holders may ask for ``workload:<pod uid>``.
    ``shutdown_grace``: seconds SIGTERM may take. ``health_address``/``metrics_address``:
    where /healthz + /readyz and /metrics listen (None: not served; port 0: a free port).
    ``ready_spire_timeout``: how long SPIRE may be unreachable before /readyz says 503."""

    spire_admin_socket: Path = Path(DEFAULT_SPIRE_ADMIN_SOCKET)
    sds_socket: Path = Path(DEFAULT_SDS_SOCKET)
    sds_socket_mode: int = 0o666
    sds_socket_group: int | None = None
    sds_names: SdsNames = field(default_factory=SdsNames)
    sds_limits: SdsLimits = field(default_factory=SdsLimits)
    cache_key: str = "workload"
    trusted_proxies: tuple[str, ...] = ()
    shutdown_grace: float = 5.0
    health_address: HostPort | None = field(
        default_factory=lambda: HostPort("127.0.0.1", 8086))
    metrics_address: HostPort | None = field(
        default_factory=lambda: HostPort("127.0.0.1", 9086))
    ready_spire_timeout: float = 60.0
    metrics_tls: MetricsTlsSettings = field(default_factory=MetricsTlsSettings)
    trust_domain: str | None = None
    log_format: str = "text"
    log_level: str = "info"
    reconnect: ReconnectSettings = field(default_factory=ReconnectSettings)
    spire_max_message_bytes: int = 64 * 1024 * 1024
    # A SPIRE stream silent this long is warned about (SPIRE waits for minted SVIDs).
    spire_slow_answer_warning: float = 30.0
