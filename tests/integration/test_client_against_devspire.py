"""The Delegated Identity client against dev-spire over a real Unix socket."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from typing import TypeVar

import grpc
import pytest
from cryptography import x509

from agent._proto.spire.api.agent.delegatedidentity.v1 import delegatedidentity_pb2 as pb
from agent._proto.spire.api.agent.delegatedidentity.v1 import delegatedidentity_pb2_grpc as pbg
from agent._proto.spire.api.types import selector_pb2
from agent.errors import SpireInvalidArgument, SpirePermissionDenied
from agent.model import Selector, X509SvidUpdate
from agent.spire.client import DelegatedIdentityClient
from agent.spire.validation import SvidGate
from tests.integration.conftest import DELEGATE, FAST_RETRY, TD, Spire, selector_entry

T = TypeVar("T")
WORKLOAD = f"spiffe://{TD}/ns/zarf/sa/registry-proxy"


async def next_of(stream: AsyncIterator[T], within: float = 10.0) -> T:
    return await asyncio.wait_for(anext(stream), within)


def serial(update: X509SvidUpdate, spiffe_id: str) -> int:
    [svid] = [s for s in update.svids if s.spiffe_id == spiffe_id]
    return x509.load_der_x509_certificate(svid.cert_chain[0]).serial_number


async def test_own_pid_gets_entries_matching_real_uid(spire: Spire,
                                                      client: DelegatedIdentityClient) -> None:
    await spire.set_entries(selector_entry(WORKLOAD, f"unix:uid:{os.getuid()}"),
                            selector_entry(f"spiffe://{TD}/other", "unix:uid:4242"))
    update = await next_of(client.subscribe_x509_svids(pid=os.getpid()))
    ids = sorted(s.spiffe_id for s in update.svids)
    assert ids == sorted([DELEGATE, WORKLOAD]), "uid 4242's entry must not match this process"
    for svid in update.svids:
        leaf = x509.load_der_x509_certificate(svid.cert_chain[0])
        san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        assert san.get_values_for_type(x509.UniformResourceIdentifier) == [svid.spiffe_id]


async def test_selector_subscription(spire: Spire, client: DelegatedIdentityClient) -> None:
    await spire.set_entries(selector_entry(WORKLOAD, "k8s:ns:zarf", "k8s:sa:registry-proxy"))
    superset = [Selector("k8s", "ns:zarf"), Selector("k8s", "sa:registry-proxy"),
                Selector("k8s", "pod-name:proxy-1")]
    update = await next_of(client.subscribe_x509_svids(selectors=superset))
    assert [s.spiffe_id for s in update.svids] == [WORKLOAD]
    partial = await next_of(client.subscribe_x509_svids(selectors=superset[:1]))
    assert partial.svids == (), "an entry matches only when all its selectors are given"


async def test_rotation_arrives(spire: Spire, client: DelegatedIdentityClient) -> None:
    await spire.set_entries(selector_entry(WORKLOAD, "k8s:ns:zarf"))
    stream = client.subscribe_x509_svids(selectors=[Selector("k8s", "ns:zarf")])
    first = serial(await next_of(stream), WORKLOAD)
    await spire.dev.rotate_now(WORKLOAD)
    second = serial(await next_of(stream), WORKLOAD)
    assert second != first


async def test_removing_entry_sends_empty_update(spire: Spire,
                                                 client: DelegatedIdentityClient) -> None:
    await spire.set_entries(selector_entry(WORKLOAD, "k8s:ns:zarf"))
    stream = client.subscribe_x509_svids(selectors=[Selector("k8s", "ns:zarf")])
    assert len((await next_of(stream)).svids) == 1
    await spire.set_entries()
    assert (await next_of(stream)).svids == ()


async def test_unauthorized_caller_is_told_what_to_configure(spire: Spire) -> None:
    spire.settings = spire.settings.__class__(**{**spire.settings.__dict__,
                                                 "authorized_delegates": (f"spiffe://{TD}/x",)})
    await spire.restart()
    async with DelegatedIdentityClient(spire.settings.socket_path, backoff=FAST_RETRY) as c:
        with pytest.raises(SpirePermissionDenied) as info:
            await next_of(c.subscribe_x509_svids(pid=os.getpid()))
    text = str(info.value)
    assert "caller not configured as an authorized delegate" in text
    assert "authorized_delegates" in text and "admin_socket_path" in text


async def test_pid_and_selectors_is_invalid_argument(spire: Spire) -> None:
    """On the wire (the client refuses to send it at all, so use a raw stub)."""
    async with grpc.aio.insecure_channel("unix:" + spire.settings.socket_path) as channel:
        stub = pbg.DelegatedIdentityStub(channel)
        call = stub.SubscribeToX509SVIDs(pb.SubscribeToX509SVIDsRequest(
            pid=os.getpid(), selectors=[selector_pb2.Selector(type="k8s", value="ns:a")]))
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await call.read()
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert info.value.details() == "must provide either selectors or non-zero PID, but not both"


async def test_client_reports_invalid_argument_as_a_bug(spire: Spire,
                                                        client: DelegatedIdentityClient) -> None:
    spire.dev.faults.inject_status(grpc.StatusCode.INVALID_ARGUMENT, count=1)
    with pytest.raises(SpireInvalidArgument, match="bug"):
        await next_of(client.subscribe_x509_svids(pid=os.getpid()))
    with pytest.raises(ValueError, match="pid"):
        client.subscribe_x509_svids(pid=os.getpid(), selectors=[Selector("k8s", "ns:a")])


async def test_client_resumes_after_spire_restart(spire: Spire,
                                                  client: DelegatedIdentityClient) -> None:
    await spire.set_entries(selector_entry(WORKLOAD, "k8s:ns:zarf"))
    svids = client.subscribe_x509_svids(selectors=[Selector("k8s", "ns:zarf")])
    bundles = client.subscribe_x509_bundles()
    before = serial(await next_of(svids), WORKLOAD)
    ca_before = (await next_of(bundles)).bundles[f"spiffe://{TD}"]
    await spire.restart()  # a new process-equivalent: new CA, SVIDs minted afresh
    after = serial(await next_of(svids, within=15), WORKLOAD)
    ca_after = (await next_of(bundles, within=15)).bundles[f"spiffe://{TD}"]
    assert after != before, "the resumed stream carries the restarted server's SVID"
    assert ca_after != ca_before
    assert client.status.reconnects >= 1


@pytest.mark.parametrize("mode", ["malformed", "expired", "not_yet_valid",
                                  "wrong_trust_domain", "key_mismatch", "wrong_san"])
async def test_injected_bad_svid_rejected_previous_kept(spire: Spire,
                                                        client: DelegatedIdentityClient,
                                                        mode: str) -> None:
    await spire.set_entries(selector_entry(WORKLOAD, "k8s:ns:zarf"))
    gate = SvidGate(label="test")
    bundles = client.subscribe_x509_bundles()
    gate.update_bundles(await next_of(bundles))
    svids = client.subscribe_x509_svids(selectors=[Selector("k8s", "ns:zarf")])
    good = gate.update_svids(await next_of(svids))
    good_serial = serial(good, WORKLOAD)

    spire.dev.faults.corrupt_x509(mode, count=1)
    await spire.dev.rotate_now(WORKLOAD)
    bad = await next_of(svids)
    accepted = gate.update_svids(bad)
    if mode == "wrong_trust_domain":
        # The SVID names a trust domain nobody gave a bundle for: held back, never served.
        [foreign] = bad.svids
        assert not foreign.spiffe_id.startswith(f"spiffe://{TD}/")
        assert foreign.spiffe_id in gate.pending
        assert all(s.spiffe_id != foreign.spiffe_id for s in accepted.svids)
        return
    assert sum(gate.rejections.values()) == 1, gate.rejections
    assert serial(accepted, WORKLOAD) == good_serial, "the previous good SVID stays in use"
    assert accepted.svids[0].private_key == good.svids[0].private_key

    await spire.dev.rotate_now(WORKLOAD)  # the next, healthy rotation is taken again
    healed = gate.update_svids(await next_of(svids))
    assert serial(healed, WORKLOAD) not in (good_serial,)


async def test_jwt_svid_verifies_against_jwt_bundle(spire: Spire,
                                                    client: DelegatedIdentityClient) -> None:
    import json

    import jwt

    await spire.set_entries(selector_entry(WORKLOAD, f"unix:uid:{os.getuid()}"))
    svids = await client.fetch_jwt_svids(["registry"], pid=os.getpid())
    [svid] = [s for s in svids if s.spiffe_id == WORKLOAD]
    bundles = await next_of(client.subscribe_jwt_bundles())
    jwks = json.loads(bundles.bundles[f"spiffe://{TD}"])
    kid = jwt.get_unverified_header(svid.token)["kid"]
    [key] = [k for k in jwks["keys"] if k["kid"] == kid]
    claims = jwt.decode(svid.token, jwt.PyJWK(key).key, algorithms=["ES256"],
                        audience="registry")
    assert claims["sub"] == WORKLOAD
    assert claims["exp"] == svid.expires_at
    with pytest.raises(SpirePermissionDenied, match="no identity issued"):
        await client.fetch_jwt_svids(["registry"], selectors=[Selector("k8s", "ns:none")])


async def test_bundle_response_larger_than_4mb_is_received(spire: Spire,
                                                           client: DelegatedIdentityClient) -> None:
    """spire#3965: a state-of-the-world answer past gRPC's default 4 MB limit still arrives."""
    spire.dev.faults.oversize(count=1, size=5 * 1024 * 1024,
                              rpcs=["SubscribeToX509Bundles"])
    bundles = await next_of(client.subscribe_x509_bundles())
    assert f"spiffe://{TD}" in bundles.bundles
    assert sum(len(der) for certs in bundles.bundles.values() for der in certs) > 4 * 1024**2 \
        or len(bundles.bundles) > 100
