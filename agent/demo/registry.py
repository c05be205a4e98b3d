"""Running Distribution (docker-registry) for the demo: its binary, config file and TLS identity."""

from __future__ import annotations

import datetime as dt
import ipaddress
import json
import os
import secrets
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from agent.demo.errors import DemoDependencyMissing

REGISTRY_PROGRAM = "docker-registry"
# The registry only lives as long as a demo; a day leaves room for a slow one.
CERTIFICATE_LIFETIME = dt.timedelta(days=1)
BACKDATE = dt.timedelta(minutes=5)
DEFAULT_SERVER_NAMES = ("127.0.0.1", "::1", "localhost")


@dataclass(frozen=True)
class RegistryTls:
    """The registry's TLS identity; with ``client_cas`` it demands client certificates."""

    certificate: Path
    key: Path
    client_cas: tuple[Path, ...] = ()


def registry_binary() -> Path:
    """Where Distribution's ``docker-registry`` program is, from PATH."""
    found = shutil.which(REGISTRY_PROGRAM)
    if found is None:
        raise DemoDependencyMissing(
            f"the container registry program {REGISTRY_PROGRAM!r} is not on PATH",
            "install Distribution with `apt-get install docker-registry`")
    return Path(found)


def registry_argv(config: Path) -> list[str]:
    """The command line that serves a registry configured by ``config``."""
    return [str(registry_binary()), "serve", str(config)]


def listen_address(host: str, port: int) -> str:
    """``host:port`` with an IPv6 literal in brackets, as Go's net package wants it."""
    bare = host.removeprefix("[").removesuffix("]")
    return f"[{bare}]:{port}" if ":" in bare else f"{bare}:{port}"


def write_registry_config(path: Path, *, storage: Path, host: str, port: int,
                          tls: RegistryTls | None = None) -> None:
    """Writes Distribution's config.yml: filesystem storage, no auth, plain HTTP or TLS.

    The file is JSON, which Distribution's YAML parser reads as flow-style YAML.
    """
    if not 0 < port < 65536:
        raise ValueError(f"port {port} is not a TCP port (1-65535)")
    http: dict[str, Any] = {
        "addr": listen_address(host, port),
        # Only signs upload state between requests to this one instance; set so that
        # Distribution does not warn at start-up that it generated one itself.
        "secret": secrets.token_hex(16),
        "headers": {"X-Content-Type-Options": ["nosniff"]},
        # Upload Location headers relative to the request: behind the registry-side Envoy
        # (which sets X-Forwarded-Proto: https) an absolute URL would send clients of a
        # plain-HTTP node proxy to https://, which that proxy does not speak.
        "relativeurls": True,
    }
    if tls is not None:
        http["tls"] = {"certificate": str(tls.certificate), "key": str(tls.key)}
        if tls.client_cas:
            http["tls"]["clientcas"] = [str(ca) for ca in tls.client_cas]
    config = {
        "version": "0.1",
        "log": {"level": "warn", "fields": {"service": "registry"}},
        "storage": {
            "filesystem": {"rootdirectory": str(storage)},
            "delete": {"enabled": True},
        },
        "http": http,
    }
    path.write_text(json.dumps(config, indent=2) + "\n")


def issue_server_certificate(directory: Path, hosts: Sequence[str]) -> tuple[Path, Path, Path]:
    """Mints a throwaway CA and a registry server certificate for 127.0.0.1, ::1, localhost
    and ``hosts``; writes ca.pem, server.pem and server-key.pem (mode 0600) into ``directory``
    and returns their paths in that order. Not a SPIFFE identity: the demo registry's own.
    """
    now = dt.datetime.now(dt.UTC).replace(microsecond=0)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, "spiffe-delegate demo"),
        x509.NameAttribute(NameOID.COMMON_NAME, "spiffe-delegate demo registry CA"),
    ])
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - BACKDATE)
        .not_valid_after(now + CERTIFICATE_LIFETIME)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(cert_sign=True), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()),
                       critical=False)
        .sign(ca_key, hashes.SHA256())
    )

    server_key = ec.generate_private_key(ec.SECP256R1())
    names = _subject_alt_names([*DEFAULT_SERVER_NAMES, *hosts])
    server_cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "spiffe-delegate demo"),
            x509.NameAttribute(NameOID.COMMON_NAME, "demo registry"),
        ]))
        .issuer_name(ca_name)
        .public_key(server_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - BACKDATE)
        .not_valid_after(now + CERTIFICATE_LIFETIME)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(cert_sign=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                       critical=False)
        .sign(ca_key, hashes.SHA256())
    )

    directory.mkdir(parents=True, exist_ok=True)
    ca_path, cert_path, key_path = (directory / "ca.pem", directory / "server.pem",
                                    directory / "server-key.pem")
    ca_path.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    cert_path.write_bytes(server_cert.public_bytes(serialization.Encoding.PEM))
    key_pem = server_key.private_bytes(serialization.Encoding.PEM,
                                       serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption())
    _write_private(key_path, key_pem)
    return ca_path, cert_path, key_path


def _subject_alt_names(hosts: Sequence[str]) -> list[x509.GeneralName]:
    names: list[x509.GeneralName] = []
    for host in hosts:
        bare = host.removeprefix("[").removesuffix("]")
        if not bare:
            raise ValueError("an empty host name cannot go into a certificate")
        name: x509.GeneralName
        try:
            name = x509.IPAddress(ipaddress.ip_address(bare))
        except ValueError:
            name = x509.DNSName(bare.lower())
        if name not in names:
            names.append(name)
    return names


def _key_usage(*, cert_sign: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=True, content_commitment=False, key_encipherment=False,
        data_encipherment=False, key_agreement=False, key_cert_sign=cert_sign,
        crl_sign=cert_sign, encipher_only=False, decipher_only=False)


def _write_private(path: Path, data: bytes) -> None:
    # Created 0600 from the start, and tightened if it already existed with looser bits.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as file:
        os.fchmod(file.fileno(), 0o600)
        file.write(data)
