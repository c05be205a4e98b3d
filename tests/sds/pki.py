"""Test PKI minted at test time: per-trust-domain CAs and X.509-SVIDs (ECDSA P-256)."""

from __future__ import annotations

import datetime
import itertools
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from agent.model import X509Svid

_serials = itertools.count(0x1000)


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC).replace(microsecond=0)


def pkcs8_der(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.DER, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


@dataclass(frozen=True)
class MintedCa:
    trust_domain: str
    key: ec.EllipticCurvePrivateKey
    cert: x509.Certificate

    @property
    def der(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.DER)

    @property
    def key_name(self) -> str:
        return f"spiffe://{self.trust_domain}"


def make_ca(trust_domain: str, *, parent: MintedCa | None = None) -> MintedCa:
    """A CA for ``trust_domain`` (self-signed, or an intermediate signed by ``parent``)."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "test"),
                      x509.NameAttribute(NameOID.COMMON_NAME,
                                         f"{trust_domain} CA {next(_serials)}")])
    issuer_name = parent.cert.subject if parent else name
    issuer_key = parent.key if parent else key
    now = _now()
    cert = (x509.CertificateBuilder()
            .subject_name(name).issuer_name(issuer_name)
            .public_key(key.public_key())
            .serial_number(next(_serials))
            .not_valid_before(now - datetime.timedelta(minutes=1))
            .not_valid_after(now + datetime.timedelta(hours=2))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False,
                                         False), critical=True)
            .add_extension(x509.SubjectAlternativeName(
                [x509.UniformResourceIdentifier(f"spiffe://{trust_domain}")]), critical=False)
            .sign(issuer_key, hashes.SHA256()))
    return MintedCa(trust_domain, key, cert)


def make_svid(ca: MintedCa, spiffe_id: str, *, intermediates: tuple[MintedCa, ...] = (),
              key: ec.EllipticCurvePrivateKey | None = None,
              serial: int | None = None) -> X509Svid:
    """An X.509-SVID for ``spiffe_id`` signed by ``ca`` (``key`` defaults to a fresh one)."""
    leaf_key = ec.generate_private_key(ec.SECP256R1())
    now = _now()
    not_after = now + datetime.timedelta(hours=1)
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "SPIRE")]))
            .issuer_name(ca.cert.subject)
            .public_key(leaf_key.public_key())
            .serial_number(serial if serial is not None else next(_serials))
            .not_valid_before(now - datetime.timedelta(minutes=1))
            .not_valid_after(not_after)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(True, False, True, False, False, False, False, False,
                                         False), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH,
                                                  ExtendedKeyUsageOID.CLIENT_AUTH]),
                           critical=False)
            .add_extension(x509.SubjectAlternativeName(
                [x509.UniformResourceIdentifier(spiffe_id)]), critical=False)
            .sign(ca.key, hashes.SHA256()))
    chain = (cert.public_bytes(serialization.Encoding.DER),
             *(i.der for i in intermediates))
    return X509Svid(spiffe_id=spiffe_id, cert_chain=chain,
                    private_key=pkcs8_der(key or leaf_key),
                    expires_at=int(not_after.timestamp()))


def leaf(svid: X509Svid) -> x509.Certificate:
    return x509.load_der_x509_certificate(svid.cert_chain[0])
