"""Proto <-> model conversions, and splitting SPIRE's concatenated DER bundles."""

from __future__ import annotations

import pytest

from agent._proto.spire.api.agent.delegatedidentity.v1 import delegatedidentity_pb2 as pb
from agent._proto.spire.api.types import spiffeid_pb2
from agent.model import JwtBundles, JwtSvid, Selector, X509Bundles, X509SvidUpdate
from agent.spire import convert

from .pki import Ca


@pytest.fixture(scope="module")
def ca() -> Ca:
    return Ca.root()


def test_x509_svid_update_round_trip(ca: Ca) -> None:
    svid = ca.intermediate().svid("/web")
    update = X509SvidUpdate((svid,), ("spiffe://other.org",))
    message = convert.x509_svid_update_to_proto(update)
    assert message.x509_svids[0].x509_svid.id.trust_domain == "example.org"
    assert message.x509_svids[0].x509_svid.id.path == "/web"
    assert len(message.x509_svids[0].x509_svid.cert_chain) == 2
    wire = pb.SubscribeToX509SVIDsResponse.FromString(message.SerializeToString())
    assert convert.x509_svid_update_from_proto(wire) == update


def test_federates_with_kept_as_given() -> None:
    message = pb.SubscribeToX509SVIDsResponse(federates_with=["spiffe://b.org", "a.org"])
    assert convert.x509_svid_update_from_proto(message).federates_with == (
        "spiffe://b.org", "a.org")


def test_spiffe_id_from_proto() -> None:
    assert convert.spiffe_id_from_proto(
        spiffeid_pb2.SPIFFEID(trust_domain="td", path="/a/b")) == "spiffe://td/a/b"
    assert convert.spiffe_id_from_proto(
        spiffeid_pb2.SPIFFEID(trust_domain="td", path="a")) == "spiffe://td/a"
    assert convert.spiffe_id_to_proto("spiffe://td/a/b") == spiffeid_pb2.SPIFFEID(
        trust_domain="td", path="/a/b")


def test_bundles_split_and_keys_normalised(ca: Ca) -> None:
    other = Ca.root("other.org")
    message = pb.SubscribeToX509BundlesResponse(ca_certificates={
        "spiffe://example.org": ca.der + other.der, "other.org": other.der})
    bundles = convert.x509_bundles_from_proto(message)
    assert bundles.bundles == {"spiffe://example.org": (ca.der, other.der),
                               "spiffe://other.org": (other.der,)}
    assert bundles.for_trust_domain("other.org") == (other.der,)
    assert convert.x509_bundles_from_proto(convert.x509_bundles_to_proto(bundles)) == bundles


def test_split_der_handles_short_and_long_lengths() -> None:
    short = bytes([0x30, 0x03, 1, 2, 3])
    long = bytes([0x30, 0x81, 0x80]) + bytes(0x80)
    longer = bytes([0x30, 0x82, 0x01, 0x00]) + bytes(0x100)
    assert convert.split_der_certificates(short + long + longer) == (short, long, longer)
    assert convert.split_der_certificates(b"") == ()


@pytest.mark.parametrize("data", [
    b"\x31\x00",                      # not a SEQUENCE
    b"\x30",                          # no length
    b"\x30\x05\x01",                  # truncated body
    b"\x30\x80\x00\x00",              # indefinite length (BER, not DER)
    b"\x30\x81\x05\x01\x02\x03\x04\x05",  # non-minimal length
    b"\x30\x82\x01",                  # truncated length
])
def test_split_der_rejects_bad_framing(data: bytes) -> None:
    with pytest.raises(ValueError):
        convert.split_der_certificates(data)


def test_bad_bundle_names_the_trust_domain() -> None:
    message = pb.SubscribeToX509BundlesResponse(ca_certificates={"spiffe://x.org": b"junk"})
    with pytest.raises(ValueError, match=r"x\.org"):
        convert.x509_bundles_from_proto(message)


def test_jwt_round_trips() -> None:
    svid = JwtSvid("a.b.c", "spiffe://td/w", 20, 10, "h")
    assert convert.jwt_svid_from_proto(convert.jwt_svid_to_proto(svid)) == svid
    assert convert.jwt_svids_from_proto(convert.jwt_svids_to_proto([svid])) == [svid]
    bundles = JwtBundles({"spiffe://td": b'{"keys":[]}'})
    assert convert.jwt_bundles_from_proto(convert.jwt_bundles_to_proto(bundles)) == bundles


def test_requests() -> None:
    by_pid = convert.x509_svids_request(pid=77)
    assert by_pid.pid == 77 and not by_pid.selectors
    jwt = convert.jwt_svids_request(["a"], selectors=[Selector("unix", "uid:0")])
    assert jwt.pid == 0 and list(jwt.audience) == ["a"]
    assert (jwt.selectors[0].type, jwt.selectors[0].value) == ("unix", "uid:0")
    with pytest.raises(ValueError, match="not a single string"):
        convert.jwt_svids_request("aud", pid=1)
    with pytest.raises(ValueError, match="32-bit"):
        convert.x509_svids_request(pid=2**31)
    with pytest.raises(ValueError):
        convert.x509_svids_request(pid=True)


def test_empty_bundles_message() -> None:
    assert convert.x509_bundles_from_proto(pb.SubscribeToX509BundlesResponse()) == X509Bundles({})


def test_bundles_by_trust_domain_refuse_only_the_bad_one(ca: Ca) -> None:
    other = Ca.root("other.org")
    message = pb.SubscribeToX509BundlesResponse(ca_certificates={
        "spiffe://example.org": ca.der, "spiffe://other.org": other.der,
        "spiffe://junk.org": b"junk", "spiffe://notcert.org": b"\x30\x03\x02\x01\x00",
        "spiffe://empty.org": b""})
    good, bad = convert.x509_bundles_by_trust_domain(message)
    assert good.bundles == {"spiffe://example.org": (ca.der,),
                            "spiffe://other.org": (other.der,)}
    assert set(bad) == {"spiffe://junk.org", "spiffe://notcert.org", "spiffe://empty.org"}
    assert "does not parse" in bad["spiffe://notcert.org"]
    assert bad["spiffe://empty.org"] == "no certificates"
