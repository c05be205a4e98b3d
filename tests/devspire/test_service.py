"""The four RPCs over a real Unix socket, with the test process as the delegate (uid 0)."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator

import grpc
import jwt
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from agent._proto.spire.api.agent.delegatedidentity.v1 import delegatedidentity_pb2 as pb

from .conftest import (
    DELEGATE,
    TD,
    FakeClock,
    Harness,
    MakeHarness,
    Stream,
    delegate_entry,
    entry,
    no_message,
    read,
    read_error,
    sel,
    split_der,
    uri_sans,
)

pytestmark = pytest.mark.skipif(os.getuid() != 0, reason="the entries name the caller by uid 0")

WEB = f"spiffe://{TD}/web"
API = f"spiffe://{TD}/api"
NOBODY = 65534


def ids(resp: pb.SubscribeToX509SVIDsResponse) -> list[str]:
    return [f"spiffe://{s.x509_svid.id.trust_domain}{s.x509_svid.id.path}"
            for s in resp.x509_svids]


def leaf(item: pb.X509SVIDWithKey) -> x509.Certificate:
    return x509.load_der_x509_certificate(item.x509_svid.cert_chain[0])


@pytest.fixture
def sleeper() -> Iterator[subprocess.Popen[bytes]]:
    """A process with effective uid/gid 65534 and real uid/gid 4321, to be attested by PID."""

    def drop() -> None:
        os.setresgid(4321, NOBODY, NOBODY)
        os.setresuid(4321, NOBODY, NOBODY)

    proc = subprocess.Popen(["sleep", "60"], preexec_fn=drop)
    yield proc
    proc.kill()
    proc.wait()


async def test_pid_subscription_gets_the_entry_matching_its_uid(
        make_harness: MakeHarness, sleeper: subprocess.Popen[bytes]) -> None:
    # SPIRE's unix plugin uses the effective uid; the real one (4321) matches nothing.
    h = await make_harness([entry(WEB, f"unix:uid:{NOBODY}", hint="web-hint"),
                            entry(API, "unix:uid:4321")])
    call = h.x509(pid=sleeper.pid)
    resp = await read(call)
    assert ids(resp) == [WEB]
    item = resp.x509_svids[0]
    assert item.x509_svid.hint == "web-hint"
    assert item.x509_svid.id.trust_domain == TD and item.x509_svid.id.path == "/web"
    cert = leaf(item)
    assert uri_sans(cert) == [WEB]
    assert item.x509_svid.expires_at == int(cert.not_valid_after_utc.timestamp())
    key = serialization.load_der_private_key(item.x509_svid_key, None)  # PKCS#8 DER
    assert key.public_key() == cert.public_key()
    # Our own PID is root: it matches only the delegate's entry.
    own = await read(h.x509(pid=os.getpid()))
    assert ids(own) == [DELEGATE]
    call.cancel()


async def test_selector_subscription_and_subset_matching(harness: Harness) -> None:
    await harness.set_entries([entry(WEB, "k8s:ns:web", "k8s:sa:web"),
                               entry(API, "k8s:ns:web", "k8s:sa:api")])
    resp = await read(harness.x509(selectors=("k8s:ns:web", "k8s:sa:web", "k8s:pod-uid:1")))
    assert ids(resp) == [WEB]
    resp = await read(harness.x509(selectors=("k8s:ns:web",)))
    assert ids(resp) == []


async def test_admin_and_downstream_entries_are_not_sent(harness: Harness) -> None:
    await harness.set_entries([entry(WEB, "k8s:ns:web"),
                               entry(API, "k8s:ns:web", admin=True),
                               entry(f"spiffe://{TD}/down", "k8s:ns:web", downstream=True)])
    assert ids(await read(harness.x509(selectors=("k8s:ns:web",)))) == [WEB]


async def test_svids_are_shared_between_subscribers(harness: Harness) -> None:
    await harness.set_entries([entry(WEB, "k8s:ns:web")])
    a = await read(harness.x509(selectors=("k8s:ns:web",)))
    b = await read(harness.x509(selectors=("k8s:ns:web", "k8s:sa:x")))
    assert a.x509_svids[0].x509_svid.cert_chain == b.x509_svids[0].x509_svid.cert_chain
    assert harness.dev.stats.svids_minted == 1


@pytest.mark.parametrize(("pid", "selectors"), [(0, ()), (1, ("k8s:ns:web",))])
async def test_pid_and_selectors_are_mutually_exclusive(
        harness: Harness, pid: int, selectors: tuple[str, ...]) -> None:
    err = await read_error(harness.x509(pid=pid, selectors=selectors))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.details() == "must provide either selectors or non-zero PID, but not both"
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await harness.stub.FetchJWTSVIDs(pb.FetchJWTSVIDsRequest(
            audience=["a"], pid=pid, selectors=[sel(s) for s in selectors]))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert info.value.details() == "must provide either selectors or non-zero PID, but not both"


@pytest.mark.parametrize("bad", [("", "x"), ("k8s:ns", "x"), ("k8s", "")])
async def test_bad_selectors(harness: Harness, bad: tuple[str, str]) -> None:
    req = pb.SubscribeToX509SVIDsRequest()
    req.selectors.add(type=bad[0], value=bad[1])
    err = await read_error(Stream(harness.stub.SubscribeToX509SVIDs(req)))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.details() == "could not parse provided selectors"


async def test_caller_not_an_authorized_delegate(make_harness: MakeHarness) -> None:
    h = await make_harness(with_delegate=False,
                           entries=[delegate_entry(spiffe_id=f"spiffe://{TD}/not-delegate")])
    err = await read_error(h.x509(selectors=("k8s:ns:web",)))
    assert err.code() == grpc.StatusCode.PERMISSION_DENIED
    assert err.details() == "caller not configured as an authorized delegate"
    for call in (h.x509_bundles(),
                 h.jwt_bundles()):
        err = await read_error(call)
        assert err.code() == grpc.StatusCode.PERMISSION_DENIED
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await h.stub.FetchJWTSVIDs(pb.FetchJWTSVIDsRequest(audience=["a"], pid=os.getpid()))
    assert info.value.details() == "caller not configured as an authorized delegate"


async def test_caller_without_any_entry(make_harness: MakeHarness) -> None:
    h = await make_harness(with_delegate=False, entries=[entry(WEB, "k8s:ns:web")])
    err = await read_error(h.x509(selectors=("k8s:ns:web",)))
    assert err.code() == grpc.StatusCode.PERMISSION_DENIED
    assert err.details() == "no identity issued"


async def test_no_match_is_an_empty_response_and_the_stream_stays_open(harness: Harness) -> None:
    call = harness.x509(selectors=("k8s:ns:nothing",))
    resp = await read(call)
    assert resp == pb.SubscribeToX509SVIDsResponse()
    await harness.set_entries([entry(WEB, "k8s:ns:nothing")])  # the stream is still live
    assert ids(await read(call)) == [WEB]
    call.cancel()


async def test_dead_pid_gets_an_empty_response(harness: Harness) -> None:
    proc = await asyncio.create_subprocess_exec(sys.executable, "-c", "pass")
    await proc.wait()
    call = harness.x509(pid=proc.pid)
    assert list((await read(call)).x509_svids) == []
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await harness.stub.FetchJWTSVIDs(pb.FetchJWTSVIDsRequest(audience=["a"], pid=proc.pid))
    assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert info.value.details() == "no identity issued"
    call.cancel()


async def test_entries_change_live(harness: Harness) -> None:
    call = harness.x509(selectors=("k8s:ns:web", "k8s:sa:web"))
    assert ids(await read(call)) == []
    await harness.set_entries([entry(WEB, "k8s:ns:web")])
    assert ids(await read(call)) == [WEB]
    await harness.set_entries([entry(WEB, "k8s:ns:web"), entry(API, "k8s:sa:web")])
    assert sorted(ids(await read(call))) == [API, WEB]
    await harness.set_entries([entry(API, "k8s:sa:web")])  # WEB removed
    assert ids(await read(call)) == [API]
    await harness.set_entries([entry(API, "k8s:sa:other")])  # selector change
    assert ids(await read(call)) == []
    # An unrelated change does not push anything.
    await harness.set_entries([entry(API, "k8s:sa:other"), entry(WEB, "k8s:ns:elsewhere")])
    await no_message(call)
    call.cancel()


async def test_bad_entries_file_keeps_the_old_entries(harness: Harness) -> None:
    await harness.set_entries([entry(WEB, "k8s:ns:web")])
    call = harness.x509(selectors=("k8s:ns:web",))
    assert ids(await read(call)) == [WEB]
    errors = harness.dev.stats.reload_errors
    harness.entries_path.write_text('{"entries": [{"spiffe_id": "nope"}]}')
    deadline = time.monotonic() + 5
    while harness.dev.stats.reload_errors == errors:
        assert time.monotonic() < deadline
        await asyncio.sleep(0.01)
    assert [e.spiffe_id for e in harness.dev.cache.entries] == [DELEGATE, WEB]
    call.cancel()


async def test_delegate_losing_its_entry_ends_the_stream(harness: Harness) -> None:
    await harness.set_entries([entry(WEB, "k8s:ns:web")])
    call = harness.x509(selectors=("k8s:ns:web",))
    bundles = harness.x509_bundles()
    await read(call)
    await read(bundles)
    await harness.set_entries([entry(WEB, "k8s:ns:web")], with_delegate=False)
    for stream in (call, bundles):
        err = await read_error(stream)
        assert err.code() == grpc.StatusCode.PERMISSION_DENIED
        assert err.details() == "no identity issued"


async def test_rotation_pushes_a_new_serial(harness: Harness) -> None:
    await harness.set_entries([entry(WEB, "k8s:ns:web"), entry(API, "k8s:ns:api")])
    call = harness.x509(selectors=("k8s:ns:web",))
    first = leaf((await read(call)).x509_svids[0]).serial_number
    await harness.dev.rotate_now(API)  # another identity: nothing for this subscriber
    await no_message(call, 0.2)
    await harness.dev.rotate_now(WEB)
    second = leaf((await read(call)).x509_svids[0]).serial_number
    assert second != first
    call.cancel()


async def test_rotation_at_half_life(make_harness: MakeHarness) -> None:
    h = await make_harness([entry(WEB, "k8s:ns:web", x509_svid_ttl=1)], svid_ttl=3600)
    call = h.x509(selectors=("k8s:ns:web",))
    first = (await read(call)).x509_svids[0]
    second = (await read(call, within=5)).x509_svids[0]
    assert leaf(second).serial_number != leaf(first).serial_number
    assert second.x509_svid.expires_at >= first.x509_svid.expires_at
    call.cancel()


async def test_rapid_updates_are_coalesced(harness: Harness) -> None:
    await harness.set_entries([entry(WEB, "k8s:ns:web")])
    call = harness.x509(selectors=("k8s:ns:web",))
    await read(call)
    sent = harness.dev.stats.responses_sent["SubscribeToX509SVIDs"]
    for _ in range(5):
        await harness.dev.rotate_now(WEB)  # no await point in between: one wake-up
    latest = harness.dev.cache.svid_for(harness.dev.cache.entries[1]).serial
    assert leaf((await read(call)).x509_svids[0]).serial_number == latest
    await no_message(call, 0.2)
    assert harness.dev.stats.responses_sent["SubscribeToX509SVIDs"] == sent + 1
    call.cancel()


async def test_federates_with_and_federated_bundles(harness: Harness) -> None:
    await harness.set_entries([entry(WEB, "k8s:ns:web",
                                     federates_with=["spiffe://b.org", "spiffe://a.org"])])
    call = harness.x509(selectors=("k8s:ns:web",))
    assert list((await read(call)).federates_with) == ["spiffe://a.org", "spiffe://b.org"]
    bundles = harness.x509_bundles()
    got = (await read(bundles)).ca_certificates
    assert set(got) == {f"spiffe://{TD}", "spiffe://a.org", "spiffe://b.org"}
    assert uri_sans(split_der(got["spiffe://a.org"])[0]) == ["spiffe://a.org"]
    await harness.set_entries([entry(WEB, "k8s:ns:web", federates_with=["spiffe://c.org"])])
    assert list((await read(call)).federates_with) == ["spiffe://c.org"]
    got = (await read(bundles)).ca_certificates
    # Like SPIRE, a stream's bundle map only gains keys.
    assert set(got) == {f"spiffe://{TD}", "spiffe://a.org", "spiffe://b.org", "spiffe://c.org"}
    # A federated CA rotating reaches the subscribers that federate with it.
    await harness.dev.rotate_ca_now("c.org")
    assert len(split_der((await read(bundles)).ca_certificates["spiffe://c.org"])) == 2
    assert list((await read(call)).federates_with) == ["spiffe://c.org"]
    call.cancel()
    bundles.cancel()


async def test_x509_bundles_are_concatenated_der_keyed_by_spiffe_id(harness: Harness) -> None:
    await harness.set_entries([entry(WEB, "k8s:ns:web")])
    bundles = harness.x509_bundles()
    first = (await read(bundles)).ca_certificates
    assert list(first) == [f"spiffe://{TD}"]
    (root,) = split_der(first[f"spiffe://{TD}"])
    assert root.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    svid = (await read(harness.x509(selectors=("k8s:ns:web",)))).x509_svids[0]
    leaf(svid).verify_directly_issued_by(root)
    bundles.cancel()


async def test_ca_rotation_overlap(harness: Harness) -> None:
    await harness.set_entries([entry(WEB, "k8s:ns:web")])
    call = harness.x509(selectors=("k8s:ns:web",))
    bundles = harness.x509_bundles()
    old_svid = (await read(call)).x509_svids[0]
    (old_root,) = split_der((await read(bundles)).ca_certificates[f"spiffe://{TD}"])
    await harness.dev.rotate_ca_now()
    roots = split_der((await read(bundles)).ca_certificates[f"spiffe://{TD}"])
    assert roots[0].serial_number == old_root.serial_number and len(roots) == 2
    # notifyAll: the SVID subscriber gets the same SVID again when the local bundle changes.
    again = (await read(call)).x509_svids[0]
    assert again.x509_svid.cert_chain == old_svid.x509_svid.cert_chain
    await harness.dev.rotate_now(WEB)
    new_svid = (await read(call)).x509_svids[0]
    leaf(new_svid).verify_directly_issued_by(roots[1])
    leaf(old_svid).verify_directly_issued_by(roots[0])
    call.cancel()
    bundles.cancel()


async def test_scheduled_ca_rotation_with_a_fake_clock(make_harness: MakeHarness) -> None:
    clock = FakeClock(time.time())
    h = await make_harness([entry(WEB, "k8s:ns:web")], clock=clock, ca_ttl=600, svid_ttl=60)
    bundles = h.x509_bundles()
    call = h.x509(selectors=("k8s:ns:web",))
    nothing = h.x509(selectors=("k8s:ns:nothing",))
    assert len(split_der((await read(bundles)).ca_certificates[f"spiffe://{TD}"])) == 1
    await read(call)
    assert list((await read(nothing)).x509_svids) == []
    clock.advance(301)
    await h.dev.tick()
    assert len(split_der((await read(bundles)).ca_certificates[f"spiffe://{TD}"])) == 2
    # notifyAll: even a subscriber with nothing to receive gets its (empty) response again.
    assert list((await read(nothing)).x509_svids) == []
    # To the first CA's expiry, one second before its successor prepares the next (at 601),
    # so the bundle read does not depend on whether the rotation loop ticks first.
    clock.advance(299)
    await h.dev.tick()
    roots = split_der((await read(bundles)).ca_certificates[f"spiffe://{TD}"])
    assert len(roots) == 1  # the first CA expired and left the bundle
    latest = None
    while latest is None or leaf(latest.x509_svids[0]).issuer != roots[0].subject:
        latest = await read(call)
    leaf(latest.x509_svids[0]).verify_directly_issued_by(roots[0])
    call.cancel()
    bundles.cancel()


async def test_fetch_jwt_svids(harness: Harness) -> None:
    await harness.set_entries([entry(WEB, "k8s:ns:web", hint="h", jwt_svid_ttl=120),
                               entry(API, "k8s:ns:web", admin=True)])
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await harness.stub.FetchJWTSVIDs(pb.FetchJWTSVIDsRequest(selectors=[sel("k8s:ns:web")]))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert info.value.details() == "audience must be specified"
    resp = await harness.stub.FetchJWTSVIDs(pb.FetchJWTSVIDsRequest(
        audience=["spiffe://example.org/registry"], selectors=[sel("k8s:ns:web")]))
    (svid,) = resp.svids  # the admin entry is skipped
    assert (svid.id.trust_domain, svid.id.path, svid.hint) == (TD, "/web", "h")
    assert svid.expires_at - svid.issued_at == 120
    jwt_bundles = harness.jwt_bundles()
    jwks = json.loads((await read(jwt_bundles)).bundles[f"spiffe://{TD}"])
    kid = jwt.get_unverified_header(svid.token)["kid"]
    key = jwt.PyJWKSet.from_dict(jwks)[kid]
    claims = jwt.decode(svid.token, key.key, algorithms=["ES256"],
                        audience="spiffe://example.org/registry")
    assert claims["sub"] == WEB and claims["exp"] == svid.expires_at
    assert all("use" not in k for k in jwks["keys"])
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await harness.stub.FetchJWTSVIDs(pb.FetchJWTSVIDsRequest(
            audience=["a"], selectors=[sel("k8s:ns:none")]))
    assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert info.value.details() == "no identity issued"
    jwt_bundles.cancel()


async def test_jwt_bundles_follow_ca_rotation(harness: Harness) -> None:
    stream = harness.jwt_bundles()
    first = json.loads((await read(stream)).bundles[f"spiffe://{TD}"])
    await harness.dev.rotate_ca_now()
    second = json.loads((await read(stream)).bundles[f"spiffe://{TD}"])
    assert len(first["keys"]) == 1 and len(second["keys"]) == 2
    assert second["keys"][0] == first["keys"][0]
    stream.cancel()


async def test_stats_count_streams(harness: Harness) -> None:
    call = harness.x509(selectors=("k8s:ns:web",))
    await read(call)
    assert harness.dev.stats.open_streams["SubscribeToX509SVIDs"] == 1
    assert harness.dev.stats.streams_opened["SubscribeToX509SVIDs"] == 1
    call.cancel()
    deadline = time.monotonic() + 5
    while harness.dev.stats.open_streams["SubscribeToX509SVIDs"]:
        assert time.monotonic() < deadline
        await asyncio.sleep(0.01)
