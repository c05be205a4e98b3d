"""A trust domain's signing authorities: X.509 CA and JWT keys, rotation, SVID minting, bundles."""

from __future__ import annotations

import base64
import datetime as dt
import json
import logging
import math
import secrets
import string
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import jwt
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

_LOG = logging.getLogger("spiffe_delegate.devspire")

PrivateKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey
Clock = Callable[[], float]

KEY_TYPES = ("ec-p256", "ec-p384", "rsa-2048")
# SPIRE backdates NotBefore so that slightly skewed clocks accept a fresh certificate.
BACKDATE = 10.0
# Fraction of a CA's lifetime after which its successor is prepared (and published), and after
# which the successor takes over signing. The old one stays in the bundle until it expires,
# and SVIDs are never valid beyond their CA, so nothing it signed outlives its publication.
PREPARE_AT = 1 / 2
ACTIVATE_AT = 5 / 6


def generate_key(key_type: str = "ec-p256") -> PrivateKey:
    if key_type == "ec-p256":
        return ec.generate_private_key(ec.SECP256R1())
    if key_type == "ec-p384":
        return ec.generate_private_key(ec.SECP384R1())
    if key_type == "rsa-2048":
        return rsa.generate_private_key(public_exponent=65537, key_size=2048)
    raise ValueError(f"unknown key type {key_type!r}; use one of {', '.join(KEY_TYPES)}")


def key_type_of(key: PrivateKey) -> str:
    """The KEY_TYPES name of a key, or a description of one dev-spire does not make."""
    if isinstance(key, rsa.RSAPrivateKey):
        return f"rsa-{key.key_size}"
    return {"secp256r1": "ec-p256", "secp384r1": "ec-p384"}.get(key.curve.name, key.curve.name)


def _signature_hash(key: PrivateKey) -> hashes.SHA256 | hashes.SHA384:
    if isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.key_size > 256:
        return hashes.SHA384()
    return hashes.SHA256()


def jwt_algorithm(key: PrivateKey) -> str:
    if isinstance(key, rsa.RSAPrivateKey):
        return "RS256"
    return "ES384" if key.curve.key_size > 256 else "ES256"


def pkcs8_der(key: PrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.DER, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _ts(when: float) -> dt.datetime:
    return dt.datetime.fromtimestamp(int(when), tz=dt.UTC)


def _b64url_uint(value: int, length: int) -> str:
    return base64.urlsafe_b64encode(value.to_bytes(length, "big")).rstrip(b"=").decode()


def public_jwk(key: PrivateKey, kid: str) -> dict[str, str]:
    """The JWK of a public key as go-jose writes it for SPIRE's StandardJWKS (no "use")."""
    public = key.public_key()
    if isinstance(public, rsa.RSAPublicKey):
        numbers = public.public_numbers()
        return {"kty": "RSA", "kid": kid,
                "n": _b64url_uint(numbers.n, (numbers.n.bit_length() + 7) // 8),
                "e": _b64url_uint(numbers.e, (numbers.e.bit_length() + 7) // 8)}
    assert isinstance(public, ec.EllipticCurvePublicKey)
    size = (public.curve.key_size + 7) // 8
    point = public.public_numbers()
    return {"kty": "EC", "kid": kid, "crv": "P-256" if public.curve.key_size == 256 else "P-384",
            "x": _b64url_uint(point.x, size), "y": _b64url_uint(point.y, size)}


def _random_kid() -> str:
    alphabet = string.ascii_letters + string.digits
    return "".join(secrets.choice(alphabet) for _ in range(32))


@dataclass(frozen=True)
class Authority:
    """One generation of a trust domain's signing keys: an X.509 CA and a JWT key."""

    trust_domain: str
    serial: int
    cert: x509.Certificate
    key: PrivateKey = field(repr=False)
    jwt_key: PrivateKey = field(repr=False)
    jwt_kid: str
    issued_at: float
    not_after: float

    @property
    def lifetime(self) -> float:
        return self.not_after - self.issued_at

    @property
    def der(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.DER)


@dataclass(frozen=True)
class CAState:
    """What a restarted dev-spire needs to keep signing with the same keys and to serve the
    same bundle: every authority in the bundle, and the serial counter."""

    trust_domain: str
    serial: int
    active: Authority
    next: Authority | None
    retired: tuple[Authority, ...]

    def authorities(self) -> list[Authority]:
        """Everything in the bundle, oldest first."""
        return [*self.retired, self.active, *([self.next] if self.next else [])]


@dataclass(frozen=True)
class MintedSvid:
    """An X.509-SVID and its key as dev-spire minted it."""

    spiffe_id: str
    cert_chain: tuple[bytes, ...]
    key_der: bytes = field(repr=False)
    serial: int
    issued_at: float
    not_before: float
    not_after: float
    authority_serial: int

    @property
    def expires_at(self) -> int:
        return int(self.not_after)

    @property
    def rotate_at(self) -> float:
        """SPIRE's default: rotate at half of the lifetime."""
        return self.issued_at + (self.not_after - self.issued_at) / 2


@dataclass(frozen=True)
class JwtToken:
    token: str = field(repr=False)
    spiffe_id: str
    issued_at: int
    expires_at: int


def _make_ca(trust_domain: str, serial: int, key: PrivateKey, now: float,
             ttl: float) -> x509.Certificate:
    name = x509.Name([
        x509.NameAttribute(NameOID.COUNTRY_NAME, "US"),
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, "SPIFFE"),
        x509.NameAttribute(NameOID.COMMON_NAME, f"dev-spire {trust_domain} CA {serial}"),
    ])
    public = key.public_key()
    return (
        x509.CertificateBuilder()
        .subject_name(name).issuer_name(name)
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(_ts(now - BACKDATE))
        .not_valid_after(_ts(now + ttl))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(
            digital_signature=True, content_commitment=False, key_encipherment=False,
            data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
            encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectAlternativeName(
            [x509.UniformResourceIdentifier(f"spiffe://{trust_domain}")]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        .sign(key, _signature_hash(key))
    )


def build_svid_certificate(
    authority: Authority, spiffe_id: str, public_key: ec.EllipticCurvePublicKey | rsa.RSAPublicKey,
    not_before: float, not_after: float, dns_names: Sequence[str] = (),
    serial: int | None = None,
) -> x509.Certificate:
    """An X509-SVID leaf: one URI SAN, CA=false, digitalSignature, server+client auth."""
    attrs = [x509.NameAttribute(NameOID.COUNTRY_NAME, "US"),
             x509.NameAttribute(NameOID.ORGANIZATION_NAME, "SPIRE")]
    if dns_names:
        attrs.append(x509.NameAttribute(NameOID.COMMON_NAME, dns_names[0]))
    sans: list[x509.GeneralName] = [x509.UniformResourceIdentifier(spiffe_id)]
    sans += [x509.DNSName(name) for name in dns_names]
    issuer_public = authority.cert.public_key()
    assert isinstance(issuer_public, ec.EllipticCurvePublicKey | rsa.RSAPublicKey)
    return (
        x509.CertificateBuilder()
        .subject_name(x509.Name(attrs))
        .issuer_name(authority.cert.subject)
        .public_key(public_key)
        .serial_number(serial if serial is not None else x509.random_serial_number())
        .not_valid_before(_ts(not_before))
        .not_valid_after(_ts(not_after))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(
            digital_signature=True, content_commitment=False, key_encipherment=True,
            data_encipherment=False, key_agreement=True, key_cert_sign=False, crl_sign=False,
            encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage(
            [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_public),
                       critical=False)
        .sign(authority.key, _signature_hash(authority.key))
    )


class TrustDomainCA:
    """The authorities of one trust domain: active, a prepared successor, and retired ones
    kept in the bundle until they expire. ``version`` goes up whenever the bundle changes.

    ``state`` resumes authorities kept from an earlier run; ``on_change`` is told the new state
    whenever the authorities change (not for the ones made or resumed here)."""

    def __init__(self, trust_domain: str, *, ca_ttl: float, clock: Clock,
                 key_type: str = "ec-p256", state: CAState | None = None,
                 on_change: Callable[[CAState], None] | None = None) -> None:
        if ca_ttl <= 0:
            raise ValueError("ca_ttl must be positive")
        generate_key(key_type)  # validates key_type early
        if state is not None and state.trust_domain != trust_domain:
            raise ValueError(f"authorities of {state.trust_domain}, not of {trust_domain}")
        self.trust_domain = trust_domain
        self.ca_ttl = ca_ttl
        self.key_type = key_type
        self._clock = clock
        self._on_change = on_change
        # Told of every private key made from now on (CA, JWT and SVID keys): tests use it to
        # know every key that exists, to look for them where none may appear.
        self.on_key: Callable[[PrivateKey], None] | None = None
        self.version = 1
        self.next: Authority | None = None
        self.retired: list[Authority] = []
        if state is None:
            self._serial = 0
            self.active = self._new_authority(clock())
        else:
            self._serial = state.serial
            self.active, self.next, self.retired = state.active, state.next, list(state.retired)

    def state(self) -> CAState:
        return CAState(self.trust_domain, self._serial, self.active, self.next,
                       tuple(self.retired))

    def _changed(self) -> None:
        if self._on_change is not None:
            self._on_change(self.state())

    def new_key(self) -> PrivateKey:
        """A fresh key of this CA's key type (``on_key`` is told of it)."""
        key = generate_key(self.key_type)
        if self.on_key is not None:
            self.on_key(key)
        return key

    def _new_authority(self, now: float) -> Authority:
        self._serial += 1
        key = self.new_key()
        cert = _make_ca(self.trust_domain, self._serial, key, now, self.ca_ttl)
        _LOG.info("trust domain %s: new CA %d valid until %s", self.trust_domain, self._serial,
                  _ts(now + self.ca_ttl).isoformat())
        return Authority(self.trust_domain, self._serial, cert, key, self.new_key(),
                         _random_kid(), now, now + self.ca_ttl)

    def authorities(self) -> list[Authority]:
        """Everything in the bundle, oldest first."""
        return [*self.retired, self.active, *([self.next] if self.next else [])]

    def bundle_der(self) -> bytes:
        """The X.509 authorities' DER concatenated, as SPIRE's marshalBundle does."""
        return b"".join(a.der for a in self.authorities())

    def jwks(self) -> bytes:
        """The JWT keys as a standard JWKS document (SPIRE's StandardJWKS, no X.509 keys)."""
        keys = [public_jwk(a.jwt_key, a.jwt_kid) for a in self.authorities()]
        return json.dumps({"keys": keys}, separators=(",", ":")).encode()

    def next_event(self) -> float:
        """When :meth:`advance` next has something to do."""
        active = self.active
        times = [active.issued_at + active.lifetime * (ACTIVATE_AT if self.next else PREPARE_AT)]
        times += [a.not_after for a in self.retired]
        return min(times)

    def advance(self, now: float) -> bool:
        """Prepares, activates and drops authorities as due; True if the bundle changed."""
        changed = activated = False
        active = self.active
        if self.next is None and now >= active.issued_at + active.lifetime * PREPARE_AT:
            self.next = self._new_authority(now)
            changed = True
        if self.next is not None and now >= active.issued_at + active.lifetime * ACTIVATE_AT:
            self._activate_next()  # the same certificates, so the bundle is unchanged
            activated = True
        kept = [a for a in self.retired if a.not_after > now]
        if len(kept) != len(self.retired):
            _LOG.info("trust domain %s: expired CA dropped from the bundle", self.trust_domain)
            self.retired = kept
            changed = True
        if changed:
            self.version += 1
        if changed or activated:
            self._changed()
        return changed

    def _activate_next(self) -> None:
        assert self.next is not None
        _LOG.info("trust domain %s: CA %d takes over signing from CA %d", self.trust_domain,
                  self.next.serial, self.active.serial)
        self.retired.append(self.active)
        self.active, self.next = self.next, None

    def rotate_now(self) -> None:
        """Publishes a successor (if none is prepared) and makes it the signing authority."""
        if self.next is None:
            self.next = self._new_authority(self._clock())
        self._activate_next()
        self.version += 1
        self._changed()

    def mint_x509(self, spiffe_id: str, ttl: float, *, dns_names: Sequence[str] = (),
                  now: float | None = None) -> MintedSvid:
        """A fresh key and X509-SVID; never valid beyond the signing CA."""
        now = self._clock() if now is None else now
        authority = self.active
        key = self.new_key()
        # Whole seconds, rounded up so that even a sub-second TTL ends after ``now``.
        not_after = min(math.ceil(now + ttl), int(authority.not_after))
        public = key.public_key()
        cert = build_svid_certificate(authority, spiffe_id, public, now - BACKDATE, not_after,
                                      dns_names)
        return MintedSvid(
            spiffe_id=spiffe_id,
            cert_chain=(cert.public_bytes(serialization.Encoding.DER),),
            key_der=pkcs8_der(key),
            serial=cert.serial_number,
            issued_at=now,
            not_before=now - BACKDATE,
            not_after=int(not_after),
            authority_serial=authority.serial,
        )

    def sign_jwt(self, spiffe_id: str, audience: Sequence[str], ttl: float,
                 now: float | None = None) -> JwtToken:
        """A JWT-SVID with sub/aud/exp/iat and the signing key's kid in the header."""
        now = self._clock() if now is None else now
        authority = self.active
        iat = int(now)
        exp = int(min(now + ttl, authority.not_after))
        aud: str | list[str] = audience[0] if len(audience) == 1 else list(audience)
        claims = {"aud": aud, "exp": exp, "iat": iat, "sub": spiffe_id}
        token = jwt.encode(claims, authority.jwt_key, algorithm=jwt_algorithm(authority.jwt_key),
                           headers={"kid": authority.jwt_kid, "typ": "JWT"})
        return JwtToken(token, spiffe_id, iat, exp)
