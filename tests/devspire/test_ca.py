"""The CA: X509-SVID shape per the SPIFFE spec, CA rotation overlap, JWT-SVIDs and JWKS."""

from __future__ import annotations

import json
import time

import jwt
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID

from agent.devspire.ca import BACKDATE, TrustDomainCA

from .conftest import FakeClock, split_der, uri_sans


@pytest.mark.parametrize("key_type", ["ec-p256", "ec-p384", "rsa-2048"])
def test_x509_svid_follows_the_spiffe_spec(key_type: str) -> None:
    clock = FakeClock(time.time())
    ca = TrustDomainCA("example.org", ca_ttl=86400, clock=clock, key_type=key_type)
    svid = ca.mint_x509("spiffe://example.org/web", 3600, dns_names=["web.local"])
    (leaf_der,) = svid.cert_chain
    leaf = x509.load_der_x509_certificate(leaf_der)
    assert uri_sans(leaf) == ["spiffe://example.org/web"]
    assert leaf.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False
    ku = leaf.extensions.get_extension_for_class(x509.KeyUsage)
    assert ku.critical and ku.value.digital_signature and not ku.value.key_cert_sign
    eku = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert set(eku) == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
    assert leaf.not_valid_before_utc.timestamp() == int(clock.now - BACKDATE)
    assert svid.expires_at == int(leaf.not_valid_after_utc.timestamp())
    assert svid.serial == leaf.serial_number > 0
    (root,) = split_der(ca.bundle_der())
    leaf.verify_directly_issued_by(root)
    assert uri_sans(root) == ["spiffe://example.org"]
    key = serialization.load_der_private_key(svid.key_der, None)
    assert key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    ) == leaf.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    if key_type == "ec-p256":
        assert isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name == "secp256r1"


def test_serials_are_random() -> None:
    ca = TrustDomainCA("example.org", ca_ttl=3600, clock=time.time)
    serials = {ca.mint_x509("spiffe://example.org/a", 60).serial for _ in range(5)}
    assert len(serials) == 5


def test_svids_never_outlive_their_ca() -> None:
    clock = FakeClock(time.time())
    ca = TrustDomainCA("example.org", ca_ttl=100, clock=clock)
    assert ca.mint_x509("spiffe://example.org/a", 3600).not_after <= clock.now + 100


def test_ca_rotation_schedule_overlaps() -> None:
    clock = FakeClock(time.time())
    ca = TrustDomainCA("example.org", ca_ttl=600, clock=clock)
    first = ca.active
    assert not ca.advance(clock.now)
    clock.advance(299)
    assert not ca.advance(clock.now)
    clock.advance(2)  # past half: the successor is published, the first one still signs
    assert ca.advance(clock.now)
    assert ca.active is first and ca.next is not None
    assert len(split_der(ca.bundle_der())) == 2
    signed_by_first = ca.mint_x509("spiffe://example.org/a", 3600)
    assert signed_by_first.authority_serial == first.serial
    clock.advance(200)  # past 5/6: the successor signs, the first stays in the bundle
    assert not ca.advance(clock.now)
    assert ca.active is not first and len(split_der(ca.bundle_der())) == 2
    assert ca.mint_x509("spiffe://example.org/a", 60).authority_serial == ca.active.serial
    clock.advance(100)  # the first CA has expired, and so has everything it signed
    assert signed_by_first.not_after <= clock.now
    assert ca.advance(clock.now)
    assert split_der(ca.bundle_der())[0].serial_number != first.cert.serial_number


def test_rotate_now_keeps_the_old_ca_published() -> None:
    ca = TrustDomainCA("example.org", ca_ttl=600, clock=time.time)
    old = ca.active
    version = ca.version
    ca.rotate_now()
    assert ca.active is not old and ca.version > version
    assert [c.serial_number for c in split_der(ca.bundle_der())] == [
        old.cert.serial_number, ca.active.cert.serial_number]


def test_jwt_svid_verifies_against_jwks() -> None:
    ca = TrustDomainCA("example.org", ca_ttl=600, clock=time.time)
    token = ca.sign_jwt("spiffe://example.org/web", ["aud1"], 300)
    header = jwt.get_unverified_header(token.token)
    assert header["alg"] == "ES256" and header["kid"] == ca.active.jwt_kid
    jwks = json.loads(ca.jwks())
    (key,) = jwks["keys"]
    assert set(key) == {"kty", "kid", "crv", "x", "y"}  # no "use", as in StandardJWKS
    signing_key = jwt.PyJWKSet.from_dict(jwks)[header["kid"]]
    claims = jwt.decode(token.token, signing_key.key, algorithms=["ES256"], audience="aud1")
    assert claims["sub"] == "spiffe://example.org/web"
    assert claims["aud"] == "aud1"
    assert claims["exp"] - claims["iat"] == 300 == token.expires_at - token.issued_at


def test_jwt_multiple_audiences_are_a_list() -> None:
    ca = TrustDomainCA("example.org", ca_ttl=600, clock=time.time)
    token = ca.sign_jwt("spiffe://example.org/web", ["a", "b"], 300)
    assert jwt.decode(token.token, options={"verify_signature": False})["aud"] == ["a", "b"]
