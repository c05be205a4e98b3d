"""Keeps the local trust domain's signing authorities in a data directory across restarts."""

from __future__ import annotations

import base64
import binascii
import contextlib
import datetime as dt
import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from agent.devspire.ca import (
    Authority,
    CAState,
    Clock,
    PrivateKey,
    TrustDomainCA,
    key_type_of,
    pkcs8_der,
)
from agent.errors import ConfigError

_LOG = logging.getLogger("spiffe_delegate.devspire")

KEYS_FILE = "keys.json"
FORMAT_VERSION = 1
_ROLES = ("retired", "active", "next")
_CORRUPT_HINT = ("delete it to start with a new CA (workloads then need the new bundle), "
                 "or point --data-dir elsewhere")


class KeyStore:
    """One JSON file in ``data_dir`` holding every authority in the local bundle, with its
    keys, as SPIRE server's "disk" KeyManager keeps its keys in its data_dir: replaced
    atomically, mode 0600, in a directory made 0700 if missing."""

    def __init__(self, data_dir: str | os.PathLike[str]) -> None:
        self.data_dir = Path(data_dir)
        self.path = self.data_dir / KEYS_FILE

    def load(self) -> CAState | None:
        """The kept authorities, or None if there are none yet; ConfigError if unusable."""
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise ConfigError(f"cannot read {self.path}: {exc.strerror or exc}",
                              _CORRUPT_HINT) from None
        try:
            doc = json.loads(raw)
        except ValueError as exc:  # UTF-8 errors too
            raise ConfigError(f"{self.path} is corrupt, not JSON: {exc}", _CORRUPT_HINT) from None
        try:
            return _decode(doc)
        except (ValueError, TypeError) as exc:
            raise ConfigError(f"{self.path} is corrupt: {exc}", _CORRUPT_HINT) from None

    def save(self, state: CAState) -> None:
        """Replaces the file with ``state``; ConfigError if it cannot be written."""
        data = json.dumps(_encode(state), indent=2).encode() + b"\n"
        try:
            self._make_dir()
            self._replace(data)
        except OSError as exc:
            raise ConfigError(f"cannot write {self.path}: {exc.strerror or exc}",
                              "make --data-dir a directory dev-spire can write") from None

    def keep(self, state: CAState) -> None:
        """``save`` for rotations: a failure is logged, since signing must go on."""
        try:
            self.save(state)
        except ConfigError as exc:
            _LOG.error("CA change not kept, a restart will use older keys: %s", exc)

    def _make_dir(self) -> None:
        try:
            self.data_dir.mkdir(mode=0o700, parents=True)
        except FileExistsError:
            return  # an existing directory's mode is the operator's choice
        os.chmod(self.data_dir, 0o700)  # whatever the umask

    def _replace(self, data: bytes) -> None:
        fd, tmp = tempfile.mkstemp(dir=self.data_dir, prefix=f".{KEYS_FILE}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as out:
                os.fchmod(out.fileno(), 0o600)
                out.write(data)
                out.flush()
                os.fsync(out.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        dir_fd = os.open(self.data_dir, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dir_fd)  # the rename itself survives a crash
        finally:
            os.close(dir_fd)


def open_local_ca(store: KeyStore, trust_domain: str, *, ca_ttl: float, clock: Clock,
                  key_type: str = "ec-p256") -> TrustDomainCA:
    """The kept CA if it can still sign for ``trust_domain``, else a new one that replaces
    it in the store. Either way every later change of the authorities is kept too."""
    state = store.load()
    now = clock()
    reason = "no keys kept yet" if state is None else _unusable(state, trust_domain, key_type,
                                                                 now)
    if state is not None and reason is None:
        kept = tuple(a for a in state.retired if a.not_after > now)
        state = CAState(state.trust_domain, state.serial, state.active, state.next, kept)
        _LOG.info("%s: signing with kept CA %d of %s, valid until %s", store.path,
                  state.active.serial, trust_domain, _iso(state.active.not_after))
        return TrustDomainCA(trust_domain, ca_ttl=ca_ttl, clock=clock, key_type=key_type,
                             state=state, on_change=store.keep)
    log = _LOG.info if state is None else _LOG.warning
    log("%s: %s; minting a new CA", store.path, reason)
    ca = TrustDomainCA(trust_domain, ca_ttl=ca_ttl, clock=clock, key_type=key_type,
                       on_change=store.keep)
    store.save(ca.state())
    return ca


def _unusable(state: CAState, trust_domain: str, key_type: str, now: float) -> str | None:
    """Why the kept authorities cannot go on signing, or None if they can."""
    if state.trust_domain != trust_domain:
        return f"holds trust domain {state.trust_domain}, not {trust_domain}"
    if state.active.not_after <= now:
        return f"CA expired at {_iso(state.active.not_after)}"
    kept_type = key_type_of(state.active.key)
    if kept_type != key_type:
        return f"CA key is {kept_type}, not {key_type}"
    return None


def _iso(when: float) -> str:
    return dt.datetime.fromtimestamp(int(when), tz=dt.UTC).isoformat()


# --- the file format ---------------------------------------------------------------------------
def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _encode(state: CAState) -> dict[str, Any]:
    roles = [("retired", a) for a in state.retired] + [("active", state.active)]
    if state.next is not None:
        roles.append(("next", state.next))
    return {
        "version": FORMAT_VERSION,
        "trust_domain": state.trust_domain,
        "serial": state.serial,
        "authorities": [{
            "role": role,
            "serial": a.serial,
            "issued_at": a.issued_at,
            "not_after": a.not_after,
            "x509_ca": _b64(a.der),
            "x509_key": _b64(pkcs8_der(a.key)),
            "jwt_kid": a.jwt_kid,
            "jwt_key": _b64(pkcs8_der(a.jwt_key)),
        } for role, a in roles],
    }


def _field(doc: dict[str, Any], name: str, kind: type | tuple[type, ...], where: str) -> Any:
    if name not in doc:
        raise ValueError(f"{where}{name}: missing")
    value = doc[name]
    if isinstance(value, bool) or not isinstance(value, kind):
        raise ValueError(f"{where}{name}: unexpected value {value!r}")
    return value


def _der(doc: dict[str, Any], name: str, where: str) -> bytes:
    try:
        return base64.b64decode(_field(doc, name, str, where), validate=True)
    except binascii.Error:
        raise ValueError(f"{where}{name}: not base64") from None


def _private_key(doc: dict[str, Any], name: str, where: str) -> PrivateKey:
    try:
        key = serialization.load_der_private_key(_der(doc, name, where), password=None)
    except ValueError:
        raise ValueError(f"{where}{name}: not a PKCS#8 DER private key") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey):
        raise ValueError(f"{where}{name}: neither an EC nor an RSA key")
    return key


def _same_public_key(cert: x509.Certificate, key: PrivateKey) -> bool:
    der, spki = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    return cert.public_key().public_bytes(der, spki) == key.public_key().public_bytes(der, spki)


def _authority(doc: object, trust_domain: str, where: str) -> tuple[str, Authority]:
    if not isinstance(doc, dict):
        raise ValueError(f"{where.rstrip('.')}: not an object")
    role = _field(doc, "role", str, where)
    if role not in _ROLES:
        raise ValueError(f"{where}role: {role!r} is not one of {', '.join(_ROLES)}")
    cert_der = _der(doc, "x509_ca", where)
    try:
        cert = x509.load_der_x509_certificate(cert_der)
    except ValueError:
        raise ValueError(f"{where}x509_ca: not a DER certificate") from None
    key = _private_key(doc, "x509_key", where)
    if not _same_public_key(cert, key):
        raise ValueError(f"{where}x509_key: does not belong to the certificate")
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        uris = san.get_values_for_type(x509.UniformResourceIdentifier)
    except x509.ExtensionNotFound:
        uris = []
    if uris != [f"spiffe://{trust_domain}"]:
        raise ValueError(f"{where}x509_ca: a CA of {uris}, not of spiffe://{trust_domain}")
    kid = _field(doc, "jwt_kid", str, where)
    if not kid:
        raise ValueError(f"{where}jwt_kid: empty")
    authority = Authority(
        trust_domain=trust_domain,
        serial=_field(doc, "serial", int, where),
        cert=cert,
        key=key,
        jwt_key=_private_key(doc, "jwt_key", where),
        jwt_kid=kid,
        issued_at=float(_field(doc, "issued_at", (int, float), where)),
        not_after=float(_field(doc, "not_after", (int, float), where)),
    )
    return role, authority


def _decode(doc: object) -> CAState:
    if not isinstance(doc, dict):
        raise ValueError("not a JSON object")
    version = _field(doc, "version", int, "")
    if version != FORMAT_VERSION:
        raise ValueError(f"version {version} is not {FORMAT_VERSION}")
    trust_domain = _field(doc, "trust_domain", str, "")
    listed = _field(doc, "authorities", list, "")
    roles = [_authority(a, trust_domain, f"authorities[{i}].") for i, a in enumerate(listed)]
    active = [a for role, a in roles if role == "active"]
    upcoming = [a for role, a in roles if role == "next"]
    if len(active) != 1 or len(upcoming) > 1:
        raise ValueError(f"authorities: {len(active)} active and {len(upcoming)} next "
                         "(one active and at most one next expected)")
    # New CAs are numbered after every kept one, whatever the counter says.
    serial = max([_field(doc, "serial", int, ""), *(a.serial for _, a in roles)])
    return CAState(trust_domain=trust_domain, serial=serial,
                   active=active[0], next=upcoming[0] if upcoming else None,
                   retired=tuple(a for role, a in roles if role == "retired"))
