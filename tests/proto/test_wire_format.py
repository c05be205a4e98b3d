"""Pins the SPIRE Delegated Identity API wire format against the spec tables."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from google.protobuf.descriptor import FieldDescriptor

from agent._proto.spire.api.agent.delegatedidentity.v1 import delegatedidentity_pb2 as di
from agent._proto.spire.api.types import jwtsvid_pb2, selector_pb2, spiffeid_pb2, x509svid_pb2

ROOT = Path(__file__).resolve().parents[2]
T = FieldDescriptor
# (message, field) -> (number, proto type or message full name, repeated?)
SPEC: dict[tuple[object, str], tuple[int, object, bool]] = {
    (di.X509SVIDWithKey, "x509_svid"): (1, "spire.api.types.X509SVID", False),
    (di.X509SVIDWithKey, "x509_svid_key"): (2, T.TYPE_BYTES, False),
    (di.SubscribeToX509SVIDsRequest, "selectors"): (1, "spire.api.types.Selector", True),
    (di.SubscribeToX509SVIDsRequest, "pid"): (2, T.TYPE_INT32, False),
    (di.SubscribeToX509SVIDsResponse, "x509_svids"):
        (1, "spire.api.agent.delegatedidentity.v1.X509SVIDWithKey", True),
    (di.SubscribeToX509SVIDsResponse, "federates_with"): (2, T.TYPE_STRING, True),
    (di.FetchJWTSVIDsRequest, "audience"): (1, T.TYPE_STRING, True),
    (di.FetchJWTSVIDsRequest, "selectors"): (2, "spire.api.types.Selector", True),
    (di.FetchJWTSVIDsRequest, "pid"): (3, T.TYPE_INT32, False),
    (di.FetchJWTSVIDsResponse, "svids"): (1, "spire.api.types.JWTSVID", True),
    (selector_pb2.Selector, "type"): (1, T.TYPE_STRING, False),
    (selector_pb2.Selector, "value"): (2, T.TYPE_STRING, False),
    (selector_pb2.SelectorMatch, "selectors"): (1, "spire.api.types.Selector", True),
    (selector_pb2.SelectorMatch, "match"): (2, T.TYPE_ENUM, False),
    (x509svid_pb2.X509SVID, "cert_chain"): (1, T.TYPE_BYTES, True),
    (x509svid_pb2.X509SVID, "id"): (2, "spire.api.types.SPIFFEID", False),
    (x509svid_pb2.X509SVID, "expires_at"): (3, T.TYPE_INT64, False),
    (x509svid_pb2.X509SVID, "hint"): (4, T.TYPE_STRING, False),
    (spiffeid_pb2.SPIFFEID, "trust_domain"): (1, T.TYPE_STRING, False),
    (spiffeid_pb2.SPIFFEID, "path"): (2, T.TYPE_STRING, False),
    (jwtsvid_pb2.JWTSVID, "token"): (1, T.TYPE_STRING, False),
    (jwtsvid_pb2.JWTSVID, "id"): (2, "spire.api.types.SPIFFEID", False),
    (jwtsvid_pb2.JWTSVID, "expires_at"): (3, T.TYPE_INT64, False),
    (jwtsvid_pb2.JWTSVID, "issued_at"): (4, T.TYPE_INT64, False),
    (jwtsvid_pb2.JWTSVID, "hint"): (5, T.TYPE_STRING, False),
}
MAPS = {
    (di.SubscribeToX509BundlesResponse, "ca_certificates"): (1, T.TYPE_BYTES),
    (di.SubscribeToJWTBundlesResponse, "bundles"): (1, T.TYPE_BYTES),
}
EMPTY = [di.SubscribeToX509BundlesRequest, di.SubscribeToJWTBundlesRequest]


def _fields(message: object) -> dict[str, FieldDescriptor]:
    return dict(message.DESCRIPTOR.fields_by_name)  # type: ignore[attr-defined]


@pytest.mark.parametrize(("key", "expected"), SPEC.items(),
                         ids=[f"{m.__name__}.{f}" for m, f in SPEC])  # type: ignore[attr-defined]
def test_field_matches_spec(key: tuple[object, str], expected: tuple[int, object, bool]) -> None:
    message, name = key
    number, kind, repeated = expected
    field = _fields(message)[name]
    assert field.number == number
    if isinstance(kind, str):
        assert field.message_type.full_name == kind
    else:
        assert field.type == kind
    assert field.is_repeated == repeated


def test_every_field_is_in_the_spec() -> None:
    messages = {m for m, _ in SPEC} | {m for m, _ in MAPS}
    for message in messages:
        specified = {f for m, f in [*SPEC, *MAPS] if m is message}
        assert set(_fields(message)) == specified, message
    for message in EMPTY:
        assert _fields(message) == {}


@pytest.mark.parametrize(("key", "expected"), MAPS.items())
def test_bundle_maps_are_string_to_bytes(key: tuple[object, str],
                                         expected: tuple[int, int]) -> None:
    message, name = key
    field = _fields(message)[name]
    assert field.number == expected[0]
    entry = field.message_type
    assert entry.GetOptions().map_entry
    assert entry.fields_by_name["key"].type == T.TYPE_STRING
    assert entry.fields_by_name["value"].type == expected[1]


def test_match_behavior_enum() -> None:
    enum = selector_pb2.SelectorMatch.MatchBehavior
    assert dict(enum.items()) == {"MATCH_EXACT": 0, "MATCH_SUBSET": 1, "MATCH_SUPERSET": 2,
                                  "MATCH_ANY": 3}


def test_service_and_method_names() -> None:
    service = di.DESCRIPTOR.services_by_name["DelegatedIdentity"]
    assert service.full_name == "spire.api.agent.delegatedidentity.v1.DelegatedIdentity"
    assert di.DESCRIPTOR.package == "spire.api.agent.delegatedidentity.v1"
    shapes = {m.name: (m.input_type.name, m.output_type.name, m.client_streaming,
                       m.server_streaming) for m in service.methods}
    assert shapes == {
        "SubscribeToX509SVIDs": ("SubscribeToX509SVIDsRequest", "SubscribeToX509SVIDsResponse",
                                 False, True),
        "SubscribeToX509Bundles": ("SubscribeToX509BundlesRequest",
                                   "SubscribeToX509BundlesResponse", False, True),
        "FetchJWTSVIDs": ("FetchJWTSVIDsRequest", "FetchJWTSVIDsResponse", False, False),
        "SubscribeToJWTBundles": ("SubscribeToJWTBundlesRequest",
                                  "SubscribeToJWTBundlesResponse", False, True),
    }
    assert x509svid_pb2.DESCRIPTOR.package == "spire.api.types"
    assert x509svid_pb2.DESCRIPTOR.name == "spire/api/types/x509svid.proto"


def test_round_trip_bytes_are_stable() -> None:
    """Hand-encoded bytes (field numbers and wire types from the spec) decode as expected."""
    # SubscribeToX509SVIDsRequest{pid: 42}: field 2, varint -> tag 0x10.
    assert di.SubscribeToX509SVIDsRequest(pid=42).SerializeToString() == b"\x10\x2a"
    # FetchJWTSVIDsRequest{audience:["a"], pid: 7}: tag 0x0a len 1 'a', tag 0x18 7.
    req = di.FetchJWTSVIDsRequest(audience=["a"], pid=7)
    assert req.SerializeToString() == b"\x0a\x01a\x18\x07"
    svid = x509svid_pb2.X509SVID(cert_chain=[b"\x01"], expires_at=5, hint="h",
                                 id=spiffeid_pb2.SPIFFEID(trust_domain="td", path="/p"))
    again = x509svid_pb2.X509SVID.FromString(svid.SerializeToString())
    assert again == svid
    # X509SVID.expires_at is field 3 varint -> tag 0x18.
    assert b"\x18\x05" in svid.SerializeToString()


def test_generated_code_is_fresh() -> None:
    """Fails when protos/ changed but agent/_proto was not regenerated."""
    result = subprocess.run([sys.executable, "-m", "agent.protogen", "--check"], cwd=ROOT,
                            capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr
