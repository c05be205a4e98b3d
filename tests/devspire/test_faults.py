"""Fault injection: each mode in-process, and flipped live through a faults file."""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from agent._proto.spire.api.agent.delegatedidentity.v1 import delegatedidentity_pb2 as pb
from agent.devspire.faults import Faults
from agent.errors import ConfigError

from .conftest import (
    TD,
    Harness,
    MakeHarness,
    entry,
    eventually,
    read,
    read_error,
    sel,
    split_der,
    uri_sans,
    write_json,
)

pytestmark = pytest.mark.skipif(os.getuid() != 0, reason="the entries name the caller by uid 0")

WEB = f"spiffe://{TD}/web"
FOUR_MB = 4 * 1024 * 1024


@pytest.fixture
async def web(harness: Harness) -> Harness:
    await harness.set_entries([entry(WEB, "k8s:ns:web")])
    return harness


async def fetch(h: Harness) -> pb.FetchJWTSVIDsResponse:
    return await h.stub.FetchJWTSVIDs(pb.FetchJWTSVIDsRequest(
        audience=["a"], selectors=[sel("k8s:ns:web")]))


async def test_delay(web: Harness) -> None:
    web.dev.faults.set_delay("FetchJWTSVIDs", 0.3)
    start = time.monotonic()
    await fetch(web)
    assert time.monotonic() - start >= 0.3
    web.dev.faults.set_delay("FetchJWTSVIDs", 0)
    start = time.monotonic()
    await fetch(web)
    assert time.monotonic() - start < 0.3


async def test_drop_after_n_messages(web: Harness) -> None:
    web.dev.faults.drop_after(2, ["SubscribeToX509SVIDs"])
    call = web.x509(selectors=("k8s:ns:web",))
    await read(call)
    await web.dev.rotate_now()
    await read(call)
    err = await read_error(call)
    assert err.code() == grpc.StatusCode.UNAVAILABLE
    bundles = web.x509_bundles()  # other RPCs are unaffected
    await read(bundles)
    bundles.cancel()


async def test_drop_after_set_while_a_stream_waits(web: Harness) -> None:
    call = web.x509(selectors=("k8s:ns:web",))
    await read(call)
    web.dev.faults.drop_after(1)
    assert (await read_error(call)).code() == grpc.StatusCode.UNAVAILABLE


async def test_drop_streams_now(web: Harness) -> None:
    streams = [web.x509(selectors=("k8s:ns:web",)), web.x509_bundles(), web.jwt_bundles()]
    for stream in streams:
        await read(stream)
    web.dev.faults.drop_streams_now()
    for stream in streams:
        assert (await read_error(stream)).code() == grpc.StatusCode.UNAVAILABLE
    fresh = web.x509(selectors=("k8s:ns:web",))  # new streams work
    await read(fresh)
    fresh.cancel()


async def test_inject_status_for_the_next_calls(web: Harness) -> None:
    web.dev.faults.inject_status(grpc.StatusCode.RESOURCE_EXHAUSTED, count=2,
                                 rpcs=["FetchJWTSVIDs", "SubscribeToX509SVIDs"])
    for _ in range(2):
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await fetch(web)
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    await fetch(web)
    web.dev.faults.inject_status(grpc.StatusCode.UNAVAILABLE, rpcs=["SubscribeToX509SVIDs"])
    assert (await read_error(web.x509(selectors=("k8s:ns:web",)))).code() == \
        grpc.StatusCode.UNAVAILABLE
    call = web.x509(selectors=("k8s:ns:web",))
    await read(call)
    call.cancel()


def _check_broken(mode: str, item: pb.X509SVIDWithKey, local_roots: list[x509.Certificate]
                  ) -> None:
    now = time.time()
    id_field = f"spiffe://{item.x509_svid.id.trust_domain}{item.x509_svid.id.path}"
    if mode == "malformed":
        with pytest.raises(ValueError):
            x509.load_der_x509_certificate(item.x509_svid.cert_chain[0])
        return
    cert = x509.load_der_x509_certificate(item.x509_svid.cert_chain[0])
    key = serialization.load_der_private_key(item.x509_svid_key, None)
    key_matches = key.public_key() == cert.public_key()
    signed_locally = any(_issued_by(cert, root) for root in local_roots)
    broken = {
        "expired": cert.not_valid_after_utc.timestamp() < now,
        "not_yet_valid": cert.not_valid_before_utc.timestamp() > now,
        "wrong_trust_domain": (not signed_locally and item.x509_svid.id.trust_domain != TD
                               and uri_sans(cert) == [id_field]),
        "key_mismatch": not key_matches,
        "wrong_san": uri_sans(cert) != [id_field],
    }
    assert {k for k, v in broken.items() if v} == {mode}
    if mode != "wrong_trust_domain":
        assert signed_locally


def _issued_by(cert: x509.Certificate, root: x509.Certificate) -> bool:
    try:
        cert.verify_directly_issued_by(root)
    except Exception:
        return False
    return True


@pytest.mark.parametrize("mode", ["malformed", "expired", "not_yet_valid",
                                  "wrong_trust_domain", "key_mismatch", "wrong_san"])
async def test_corrupt_x509(web: Harness, mode: str) -> None:
    roots = split_der(web.dev.bundle_der())
    web.dev.faults.corrupt_x509(mode, count=1)
    call = web.x509(selectors=("k8s:ns:web",))
    (bad,) = (await read(call)).x509_svids
    _check_broken(mode, bad, roots)
    await web.dev.rotate_now()
    (good,) = (await read(call)).x509_svids
    cert = x509.load_der_x509_certificate(good.x509_svid.cert_chain[0])
    cert.verify_directly_issued_by(roots[0])
    assert uri_sans(cert) == [WEB]
    call.cancel()


async def test_corruption_skips_empty_responses(web: Harness) -> None:
    web.dev.faults.corrupt_x509("malformed", count=1)
    empty = web.x509(selectors=("k8s:ns:none",))
    assert not (await read(empty)).x509_svids
    call = web.x509(selectors=("k8s:ns:web",))
    with pytest.raises(ValueError):
        x509.load_der_x509_certificate((await read(call)).x509_svids[0].x509_svid.cert_chain[0])
    empty.cancel()
    call.cancel()


async def test_oversize_responses(web: Harness) -> None:
    web.dev.faults.oversize(count=1, rpcs=["SubscribeToX509SVIDs"])
    call = web.x509(selectors=("k8s:ns:web",))
    big = await read(call)
    assert big.ByteSize() > FOUR_MB
    assert {s.x509_svid.id.path for s in big.x509_svids} == {"/web"}
    await web.dev.rotate_now()
    assert (await read(call)).ByteSize() < 10_000
    web.dev.faults.oversize(count=1, rpcs=["SubscribeToX509Bundles", "SubscribeToJWTBundles"])
    bundles = await read(web.x509_bundles())
    assert bundles.ByteSize() > FOUR_MB and f"spiffe://{TD}" in bundles.ca_certificates
    jwt_bundles = await read(web.jwt_bundles())
    assert jwt_bundles.ByteSize() < 10_000  # the count was used up by the X.509 bundles
    web.dev.faults.oversize(count=1, rpcs=["SubscribeToJWTBundles"])
    assert (await read(web.jwt_bundles())).ByteSize() > FOUR_MB
    call.cancel()


async def test_oversize_empty_svid_response_pads_federates_with(web: Harness) -> None:
    web.dev.faults.oversize(count=1, rpcs=["SubscribeToX509SVIDs"])
    call = web.x509(selectors=("k8s:ns:none",))
    big = await read(call)
    assert big.ByteSize() > FOUR_MB and not big.x509_svids
    call.cancel()


async def test_faults_file_is_reloaded_live(make_harness: MakeHarness, work_dir: Path) -> None:
    faults_path = work_dir / "faults.json"
    h = await make_harness([entry(WEB, "k8s:ns:web")], faults_path=str(faults_path))
    await fetch(h)  # no file: no faults
    reloads = h.dev.stats.faults_reloads
    write_json(faults_path, {"inject": [{"code": "unavailable", "count": -1,
                                         "rpcs": ["FetchJWTSVIDs"]}],
                             "corrupt_x509": {"mode": "expired", "count": 1}})
    await eventually(lambda: h.dev.stats.faults_reloads > reloads)
    for _ in range(3):
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await fetch(h)
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    call = h.x509(selectors=("k8s:ns:web",))
    cert = x509.load_der_x509_certificate((await read(call)).x509_svids[0].x509_svid.cert_chain[0])
    assert cert.not_valid_after_utc.timestamp() < time.time()
    reloads = h.dev.stats.faults_reloads
    write_json(faults_path, {"drop_now": True})
    await eventually(lambda: h.dev.stats.faults_reloads > reloads)
    assert (await read_error(call)).code() == grpc.StatusCode.UNAVAILABLE
    await fetch(h)  # the new file replaced the injected status
    errors = h.dev.stats.reload_errors
    faults_path.write_text('{"inject": [{"code": "NOPE"}]}')
    await eventually(lambda: h.dev.stats.reload_errors > errors)
    await fetch(h)


def test_faults_document_validation() -> None:
    faults = Faults()
    faults.set_delay("*", 1.0)
    for bad in ({"delays": {"Nope": 1}}, {"corrupt_x509": {"mode": "bent"}}, {"typo": 1},
                {"inject": [{"code": "OK"}]}, {"drop_after": {"SubscribeToX509SVIDs": -1}}):
        with pytest.raises(ConfigError):
            faults.apply_document(bad)
        assert faults.delay_for("FetchJWTSVIDs") == 1.0  # a bad document changes nothing
    faults.apply_document({"delays": {"SubscribeToJWTBundles": 2}})
    assert faults.delay_for("FetchJWTSVIDs") == 0
    assert faults.delay_for("SubscribeToJWTBundles") == 2


async def test_injected_fault_does_not_block_the_loop(web: Harness) -> None:
    web.dev.faults.set_delay("SubscribeToX509Bundles", 1.0)
    slow = asyncio.ensure_future(read(web.x509_bundles()))
    await fetch(web)  # other calls are served meanwhile
    assert not slow.done()
    await slow


async def test_a_corrupt_svid_is_resent_byte_for_byte(web: Harness) -> None:
    web.dev.faults.corrupt_x509("expired", count=-1)
    first = (await read(web.x509(selectors=("k8s:ns:web",)))).x509_svids[0]
    again = (await read(web.x509(selectors=("k8s:ns:web",)))).x509_svids[0]
    assert first == again  # as SPIRE re-sends the same bytes
    await web.dev.rotate_now()
    fresh = (await read(web.x509(selectors=("k8s:ns:web",)))).x509_svids[0]
    assert fresh.x509_svid.cert_chain != first.x509_svid.cert_chain


async def test_not_yet_valid_with_valid_in(web: Harness) -> None:
    web.dev.faults.corrupt_x509("not_yet_valid", valid_in=30)
    (svid,) = (await read(web.x509(selectors=("k8s:ns:web",)))).x509_svids
    cert = x509.load_der_x509_certificate(svid.x509_svid.cert_chain[0])
    assert 25 < cert.not_valid_before_utc.timestamp() - time.time() <= 31
    with pytest.raises(ValueError, match="valid_in"):
        web.dev.faults.corrupt_x509("expired", valid_in=3)


async def test_drop_ca_from_bundle(web: Harness) -> None:
    call = web.x509_bundles()
    (first,) = split_der((await read(call)).ca_certificates[f"spiffe://{TD}"])
    await web.dev.rotate_ca_now()
    assert len(split_der((await read(call)).ca_certificates[f"spiffe://{TD}"])) == 2
    web.dev.faults.drop_ca_from_bundle([1])  # open streams re-send at once
    assert split_der((await read(call)).ca_certificates[f"spiffe://{TD}"]) == [
        web.dev.cache.local.active.cert]
    web.dev.faults.drop_ca_from_bundle("active")
    assert split_der((await read(call)).ca_certificates[f"spiffe://{TD}"]) == [first]
    web.dev.faults.drop_ca_from_bundle(None)
    assert len(split_der((await read(call)).ca_certificates[f"spiffe://{TD}"])) == 2
    call.cancel()


async def test_malformed_bundle_for_one_trust_domain(web: Harness) -> None:
    call = web.x509_bundles()
    await read(call)
    web.dev.faults.malformed_bundle("partner.test")
    sent = (await read(call)).ca_certificates
    assert split_der(sent[f"spiffe://{TD}"])
    with pytest.raises(ValueError):
        x509.load_der_x509_certificate(sent["spiffe://partner.test"])
    call.cancel()


def test_bundle_faults_in_documents() -> None:
    faults = Faults()
    faults.apply_document({"drop_ca_from_bundle": [1, 2], "malformed_bundle": "td.test",
                           "corrupt_x509": {"mode": "not_yet_valid", "valid_in": 5}})
    assert faults.dropped_cas == frozenset({1, 2})
    assert faults.malformed_bundle_domain == "td.test"
    assert faults.valid_in == 5
    for bad in ({"drop_ca_from_bundle": "newest"}, {"drop_ca_from_bundle": [0]},
                {"malformed_bundle": 3}):
        with pytest.raises(ConfigError):
            faults.apply_document(bad)
    faults.apply_document({})
    assert faults.dropped_cas is None and faults.malformed_bundle_domain is None
