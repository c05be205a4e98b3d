"""Test-time PKI: mints SPIFFE CAs and X.509-SVIDs with cryptography (nothing checked in)."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from agent.model import X509Bundles, X509Svid

NOW = dt.datetime(2026, 6, 1, 12, 0, 0, tzinfo=dt.UTC)
HOUR = dt.timedelta(hours=1)


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def pkcs8(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.DER,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


@dataclass
class Ca:
    trust_domain: str
    key: ec.EllipticCurvePrivateKey
    cert: x509.Certificate
    # Certificates between this CA and its root (this CA first), for chains.
    chain: tuple[x509.Certificate, ...]

    @property
    def der(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.DER)

    @classmethod
    def root(cls, trust_domain: str = "example.org", *, name: str = "root",
             not_before: dt.datetime = NOW - 24 * HOUR,
             not_after: dt.datetime = NOW + 24 * HOUR) -> Ca:
        key = ec.generate_private_key(ec.SECP256R1())
        cert = (
            x509.CertificateBuilder()
            .subject_name(_name(f"{name} {trust_domain}"))
            .issuer_name(_name(f"{name} {trust_domain}"))
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(not_before)
            .not_valid_after(not_after)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(_ca_usage(), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                           critical=False)
            .add_extension(x509.SubjectAlternativeName(
                [x509.UniformResourceIdentifier(f"spiffe://{trust_domain}")]), critical=False)
            .sign(key, hashes.SHA256())
        )
        return cls(trust_domain, key, cert, ())

    def intermediate(self, *, name: str = "intermediate", ca: bool = True,
                     not_before: dt.datetime = NOW - 12 * HOUR,
                     not_after: dt.datetime = NOW + 12 * HOUR) -> Ca:
        key = ec.generate_private_key(ec.SECP256R1())
        builder = (
            x509.CertificateBuilder()
            .subject_name(_name(f"{name} {self.trust_domain}"))
            .issuer_name(self.cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(not_before)
            .not_valid_after(not_after)
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
            .add_extension(_ca_usage(), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                           critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                self.key.public_key()), critical=False)
        )
        cert = builder.sign(self.key, hashes.SHA256())
        return Ca(self.trust_domain, key, cert, (cert, *self.chain))

    def bundles(self, *others: Ca) -> X509Bundles:
        """This CA (and others) as SPIRE's bundle message would carry them."""
        grouped: dict[str, list[bytes]] = {}
        for ca in (self, *others):
            grouped.setdefault(f"spiffe://{ca.trust_domain}", []).append(ca.der)
        return X509Bundles({k: tuple(v) for k, v in grouped.items()})

    def svid(self, path: str = "/workload", *, spiffe_id: str | None = None,
             uris: list[str] | None = None, is_ca: bool = False,
             not_before: dt.datetime = NOW - HOUR, not_after: dt.datetime = NOW + HOUR,
             key: ec.EllipticCurvePrivateKey | None = None,
             wrong_key: bool = False, include_chain: bool = True) -> X509Svid:
        """An X.509-SVID signed by this CA, shaped like SPIRE's; options break one thing."""
        spiffe_id = spiffe_id or f"spiffe://{self.trust_domain}{path}"
        key = key or ec.generate_private_key(ec.SECP256R1())
        san = [x509.UniformResourceIdentifier(u) for u in (uris if uris is not None
                                                           else [spiffe_id])]
        builder = (
            x509.CertificateBuilder()
            .subject_name(_name("workload"))
            .issuer_name(self.cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(not_before)
            .not_valid_after(not_after)
            .add_extension(x509.BasicConstraints(ca=is_ca, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(
                digital_signature=True, content_commitment=False, key_encipherment=True,
                data_encipherment=False, key_agreement=True, key_cert_sign=False,
                crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
                critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                self.key.public_key()), critical=False)
        )
        if san:
            builder = builder.add_extension(x509.SubjectAlternativeName(san), critical=False)
        leaf = builder.sign(self.key, hashes.SHA256())
        chain = (leaf, *(self.chain if include_chain else ()))
        served_key = ec.generate_private_key(ec.SECP256R1()) if wrong_key else key
        return X509Svid(
            spiffe_id=spiffe_id,
            cert_chain=tuple(c.public_bytes(serialization.Encoding.DER) for c in chain),
            private_key=pkcs8(served_key),
            expires_at=int(not_after.timestamp()),
        )


def _ca_usage() -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=False, content_commitment=False, key_encipherment=False,
        data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
        encipher_only=False, decipher_only=False)
