"""TLS for /metrics: server contexts from the agent's own SVID (``spiffe``) or from
cert-manager-style files (``files``), rebuilt when the material changes, and the check of
the client's SPIFFE ID.

Python's ``ssl`` loads keys only from files. The private key goes through an anonymous
memory file (``memfd_create``) opened as ``/proc/self/fd/N`` and closed at once, so it never
touches a filesystem.
"""

from __future__ import annotations

import asyncio
import logging
import os
import ssl
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from http import HTTPStatus
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from agent.errors import ConfigError
from agent.http.server import Request, Response
from agent.model import X509Bundles, X509SvidUpdate

__all__ = ["FileTls", "PeerIdAuthorizer", "SpiffeTls", "server_context"]

_LOG = logging.getLogger("spiffe_delegate.http")


def _load_chain_from_memory(context: ssl.SSLContext, pem: bytes) -> None:
    """``load_cert_chain`` from ``pem`` (certificates and key) without writing it to disk."""
    fd = os.memfd_create("spiffe-delegate-tls", os.MFD_CLOEXEC)
    try:
        view = memoryview(pem)
        while view:
            view = view[os.write(fd, view):]
        context.load_cert_chain(f"/proc/self/fd/{fd}")
    finally:
        os.close(fd)


def server_context(chain_pem: bytes, key_pem: bytes, client_cas: bytes | str) -> ssl.SSLContext:
    """A TLS >= 1.2 server context presenting ``chain_pem`` (leaf first) with ``key_pem``
    that requires a client certificate chaining to ``client_cas`` (DER bytes or PEM text).
    Raises ssl.SSLError (e.g. the key does not match the certificate)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.verify_mode = ssl.CERT_REQUIRED
    _load_chain_from_memory(context, key_pem + b"\n" + chain_pem)
    context.load_verify_locations(cadata=client_cas)
    return context


def _pem_chain(ders: Sequence[bytes]) -> bytes:
    return b"".join(x509.load_der_x509_certificate(der).public_bytes(serialization.Encoding.PEM)
                    for der in ders)


class PeerIdAuthorizer:
    """Lets through only clients whose certificate has exactly one URI SAN, listed in
    ``allowed``; others get 403 (each refused ID is logged once)."""

    def __init__(self, allowed: Collection[str], *, flag: str = "--metrics-allowed-id") -> None:
        self._allowed = frozenset(allowed)
        self._flag = flag
        self._reported: set[str] = set()

    def __call__(self, request: Request) -> Response | None:
        uris = request.peer_uris
        if len(uris) == 1 and uris[0] in self._allowed:
            return None
        who = uris[0] if len(uris) == 1 else f"a certificate with {len(uris)} URI SANs"
        if who not in self._reported and len(self._reported) < 1000:
            self._reported.add(who)
            _LOG.warning("/metrics: refused %s from %s: not listed in %s", who,
                         request.peer, self._flag)
        return Response.text(HTTPStatus.FORBIDDEN,
                             f"forbidden: {who} is not allowed to scrape this endpoint")


class SpiffeTls:
    """Server contexts from the agent's own SVID, verifying clients against the bundle of
    the agent's trust domain. Feed it with :meth:`update` (the own-identity follower's
    accepted SVIDs and the bundles); until there is an SVID, connections are refused."""

    def __init__(self) -> None:
        self._context: ssl.SSLContext | None = None
        self._material: tuple[object, ...] | None = None
        self._refusal_reported = False
        self._failed: tuple[object, ...] | None = None
        self.serial: int | None = None  # of the certificate presented now
        self.spiffe_id: str | None = None
        self.contexts_built = 0

    def context(self) -> ssl.SSLContext | None:
        if self._context is None and not self._refusal_reported:
            self._refusal_reported = True
            _LOG.warning("/metrics (--metrics-tls-mode spiffe): the agent has no X.509-SVID "
                         "of its own yet; refusing connections until SPIRE issues one")
        return self._context

    def update(self, update: X509SvidUpdate, bundles: X509Bundles | None) -> None:
        if not update.svids:
            if self._context is not None:
                _LOG.warning("/metrics (--metrics-tls-mode spiffe): the agent's own "
                             "X.509-SVID is gone; refusing new connections until a new one")
            self._context, self._material, self.serial = None, None, None
            self._refusal_reported = True
            return
        svid = update.svids[0]
        bundle = bundles.for_trust_domain(svid.trust_domain) if bundles is not None else None
        if not bundle:
            return  # the gate passes no SVID without its bundle; the bundle update follows
        material = (svid.cert_chain, svid.private_key, bundle)
        if material == self._material or material == self._failed:
            return
        try:
            key = serialization.load_der_private_key(svid.private_key, None)
            key_pem = key.private_bytes(serialization.Encoding.PEM,
                                        serialization.PrivateFormat.PKCS8,
                                        serialization.NoEncryption())
            context = server_context(_pem_chain(svid.cert_chain), key_pem, b"".join(bundle))
        except (ValueError, TypeError, ssl.SSLError) as exc:
            self._failed = material
            _LOG.error("/metrics (--metrics-tls-mode spiffe): cannot use the X.509-SVID for "
                       "%s (%s); keeping the previous one", svid.spiffe_id, exc)
            return
        leaf = x509.load_der_x509_certificate(svid.cert_chain[0])
        first = self._context is None
        same_svid = self._material is not None and self._material[:2] == material[:2]
        self._context, self._material, self._failed = context, material, None
        self.serial, self.spiffe_id = leaf.serial_number, svid.spiffe_id
        self.contexts_built += 1
        self._refusal_reported = False
        if same_svid:
            _LOG.info("/metrics TLS: the bundle of %s changed (%d CA certificates); new "
                      "connections verify clients against it", svid.trust_domain, len(bundle))
            return
        _LOG.info("/metrics TLS: %s X.509-SVID %s serial=%x; client certificates must chain "
                  "to the bundle of %s", "presenting" if first else "now presenting",
                  svid.spiffe_id, leaf.serial_number, svid.trust_domain)


FileStamp = tuple[tuple[int, int, int, int] | None, ...]


@dataclass(frozen=True)
class _TlsFiles:
    cert: Path
    key: Path
    client_ca: Path


def _read(flag: str, path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"{flag} {path}: cannot read it: {exc.strerror or exc}",
                          "check the path and that the Secret is mounted") from None


def load_file_context(files: _TlsFiles) -> tuple[ssl.SSLContext, x509.Certificate]:
    """Reads and checks the three files; ConfigError naming the flag of the bad one."""
    cert_pem = _read("--metrics-cert-file", files.cert)
    key_pem = _read("--metrics-key-file", files.key)
    ca_pem = _read("--metrics-client-ca-file", files.client_ca)
    try:
        chain = x509.load_pem_x509_certificates(cert_pem)
    except ValueError:
        raise ConfigError(f"--metrics-cert-file {files.cert}: no PEM certificate in it",
                          "point it at the certificate (tls.crt of a cert-manager Secret)"
                          ) from None
    try:
        key = serialization.load_pem_private_key(key_pem, None)
    except (ValueError, TypeError):
        raise ConfigError(f"--metrics-key-file {files.key}: not an unencrypted PEM private "
                          "key", "point it at the key (tls.key of a cert-manager Secret)"
                          ) from None
    spki = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    if chain[0].public_key().public_bytes(*spki) != key.public_key().public_bytes(*spki):
        raise ConfigError(f"--metrics-key-file {files.key} does not match the certificate in "
                          f"--metrics-cert-file {files.cert}",
                          "give the key and certificate of the same Secret") from None
    try:
        x509.load_pem_x509_certificates(ca_pem)
    except ValueError:
        raise ConfigError(f"--metrics-client-ca-file {files.client_ca}: no PEM certificate "
                          "in it", "point it at the CA that signs the scrapers' client "
                          "certificates (ca.crt of a cert-manager Secret)") from None
    try:
        context = server_context(cert_pem, key_pem, ca_pem.decode("ascii", "replace"))
    except ssl.SSLError as exc:
        raise ConfigError(f"--metrics-cert-file/--metrics-key-file/--metrics-client-ca-file: "
                          f"TLS cannot use them: {exc.reason or exc}",
                          "check the three files belong together") from None
    return context, chain[0]


class FileTls:
    """Server contexts from ``cert``, ``key`` and ``client_ca`` files, re-read when any of
    them changes (inode, mtime or size, symlinks followed: cert-manager's ``..data`` swap
    changes every inode). A replacement that does not load keeps the previous context and
    is logged once."""

    def __init__(self, cert: Path, key: Path, client_ca: Path, *,
                 reload_interval: float = 10.0) -> None:
        self._files = _TlsFiles(cert, key, client_ca)
        self._interval = reload_interval
        self._context: ssl.SSLContext | None = None
        self._stamp: FileStamp | None = None
        self._failed_stamp: FileStamp | None = None
        self.serial: int | None = None
        self.reloads = 0

    def context(self) -> ssl.SSLContext | None:
        return self._context

    def _stamp_now(self) -> FileStamp:
        stamps: list[tuple[int, int, int, int] | None] = []
        for path in (self._files.cert, self._files.key, self._files.client_ca):
            try:
                st = os.stat(path)
            except OSError:
                stamps.append(None)
            else:
                stamps.append((st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size))
        return tuple(stamps)

    def load(self) -> None:
        """The first load: ConfigError naming the flag when the files are unusable."""
        stamp = self._stamp_now()
        context, leaf = load_file_context(self._files)
        self._context, self._stamp, self.serial = context, stamp, leaf.serial_number
        _LOG.info("/metrics TLS: certificate %s serial=%x from %s; client certificates must "
                  "chain to %s; re-read on change (checked every %gs)",
                  leaf.subject.rfc4514_string() or "(no subject)", leaf.serial_number,
                  self._files.cert, self._files.client_ca, self._interval)

    def poll(self) -> bool:
        """Re-reads the files if they changed; True when a new context is in use."""
        stamp = self._stamp_now()
        if stamp == self._stamp or stamp == self._failed_stamp:
            return False
        try:
            context, leaf = load_file_context(self._files)
        except ConfigError as exc:
            self._failed_stamp = stamp
            _LOG.error("/metrics TLS: keeping the previous certificate: %s", exc)
            return False
        self._context, self._stamp, self._failed_stamp = context, stamp, None
        self.serial = leaf.serial_number
        self.reloads += 1
        _LOG.info("/metrics TLS: reloaded certificate %s serial=%x from %s",
                  leaf.subject.rfc4514_string() or "(no subject)", leaf.serial_number,
                  self._files.cert)
        return True

    async def watch(self) -> None:
        """Polls every ``reload_interval`` seconds until cancelled."""
        while True:
            await asyncio.sleep(self._interval)
            try:
                self.poll()
            except Exception:  # a surprise must not end reloading for good
                _LOG.exception("/metrics TLS: checking the certificate files failed")
