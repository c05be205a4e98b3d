"""Builds the deliberately broken SVIDs and padded responses that the faults ask for."""

from __future__ import annotations

import json
import secrets

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from agent._proto.spire.api.agent.delegatedidentity.v1 import delegatedidentity_pb2 as pb
from agent._proto.spire.api.types import spiffeid_pb2, x509svid_pb2
from agent.devspire.ca import TrustDomainCA, build_svid_certificate, pkcs8_der

FOREIGN_TRUST_DOMAIN = "foreign.invalid"
_HOUR = 3600.0


def _split_id(spiffe_id: str) -> tuple[str, str]:
    td, _, path = spiffe_id.removeprefix("spiffe://").partition("/")
    return td, "/" + path


# DER framing (a SEQUENCE of three bytes) around something that is not a certificate.
MALFORMED_BUNDLE = b"\x30\x03\x02\x01\x00"


def corrupt_svid(item: pb.X509SVIDWithKey, mode: str, local: TrustDomainCA,
                 foreign: TrustDomainCA, now: float,
                 valid_in: float | None = None) -> pb.X509SVIDWithKey:
    """A copy of ``item`` broken in the way ``mode`` names (see faults.CORRUPT_MODES);
    ``valid_in``: seconds until a not_yet_valid certificate becomes valid (default 1 h)."""
    svid = item.x509_svid
    spiffe_id = f"spiffe://{svid.id.trust_domain}{svid.id.path}"
    key = serialization.load_der_private_key(item.x509_svid_key, password=None)
    assert isinstance(key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey)
    public = key.public_key()
    chain: list[bytes] = list(svid.cert_chain)
    key_der = item.x509_svid_key
    out_id = svid.id
    expires_at = svid.expires_at

    def leaf(authority_ca: TrustDomainCA, sid: str, not_before: float, not_after: float) -> bytes:
        cert = build_svid_certificate(authority_ca.active, sid, public, not_before, not_after)
        return cert.public_bytes(serialization.Encoding.DER)

    if mode == "malformed":
        chain = [b"\x30\x82\x01\x00" + secrets.token_bytes(64)]
    elif mode == "expired":
        chain = [leaf(local, spiffe_id, now - 2 * _HOUR, now - _HOUR)]
        expires_at = int(now - _HOUR)
    elif mode == "not_yet_valid":
        starts = now + (valid_in if valid_in is not None else _HOUR)
        chain = [leaf(local, spiffe_id, starts, starts + _HOUR)]
        expires_at = int(starts + _HOUR)
    elif mode == "wrong_trust_domain":
        _, path = _split_id(spiffe_id)
        chain = [leaf(foreign, f"spiffe://{foreign.trust_domain}{path}", now - 10, now + _HOUR)]
        out_id = spiffeid_pb2.SPIFFEID(trust_domain=foreign.trust_domain, path=path)
        expires_at = int(now + _HOUR)
    elif mode == "key_mismatch":
        key_der = pkcs8_der(local.new_key())
    elif mode == "wrong_san":
        td, path = _split_id(spiffe_id)
        chain = [leaf(local, f"spiffe://{td}/wrong-san{path}", now - 10, now + _HOUR)]
        expires_at = int(now + _HOUR)
    else:
        raise ValueError(f"unknown corruption mode {mode!r}")
    return pb.X509SVIDWithKey(
        x509_svid=x509svid_pb2.X509SVID(cert_chain=chain, id=out_id, expires_at=expires_at,
                                        hint=svid.hint),
        x509_svid_key=key_der,
    )


def pad_svid_response(resp: pb.SubscribeToX509SVIDsResponse, size: int) -> None:
    """Grows ``resp`` past ``size`` bytes with copies of its SVIDs (or padding trust domains)."""
    originals = list(resp.x509_svids)
    if originals:
        per_round = sum(s.ByteSize() for s in originals) + 4 * len(originals)
        rounds = size // max(per_round, 1) + 1
        for _ in range(rounds):
            resp.x509_svids.extend(originals)
        return
    names = [f"spiffe://padding-{i:07d}.invalid" for i in range(size // 30 + 1)]
    resp.federates_with.extend(names)


def padding_bundles(template: bytes, size: int) -> dict[str, bytes]:
    """Extra ``spiffe://padding-N.invalid`` bundles of about 1 MiB each, ``size`` in total."""
    chunk_size = 1024 * 1024
    template = template or b"\x00"
    # Whole copies only: a clipped certificate would make the padding itself malformed.
    chunk = template * max(1, chunk_size // len(template))
    count = size // chunk_size + 1
    return {f"spiffe://padding-{i}.invalid": chunk for i in range(count)}


def padding_jwks(jwk_document: bytes, size: int) -> dict[str, bytes]:
    """Like :func:`padding_bundles` but each value is a valid JWKS with repeated keys."""
    keys = json.loads(jwk_document).get("keys") or []
    key_json = json.dumps(keys[0] if keys else {"kty": "oct", "k": "AA"}, separators=(",", ":"))
    per_doc = 1024 * 1024 // (len(key_json) + 1)
    doc = ('{"keys":[' + ",".join([key_json] * per_doc) + "]}").encode()
    count = size // len(doc) + 1
    return {f"spiffe://padding-{i}.invalid": doc for i in range(count)}
