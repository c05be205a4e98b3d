"""The xDS protocol as spoken by the SDS server, driven request by request over the real
socket (the test process is the caller) with a scripted cache behind the server."""

from __future__ import annotations

import asyncio
import logging
import re
from pathlib import Path

import grpc
import pytest

from agent.cache.keys import WorkloadUid
from agent.sds.resources import SECRET_TYPE_URL, pem_certificates
from tests.sds_server.clients import DeltaClient, SotwClient, fetch, secrets_of
from tests.sds_server.conftest import PROXY_ID, TD, Pki, Scripted, scripted_server
from tests.waiting import eventually

POD = "0f1e2d3c-4b5a-4697-8877-665544332211"
OTHER_ID = f"spiffe://{TD}/ns/zarf/sa/someone-else"


def chain_of(secret: object) -> bytes:
    return secret.tls_certificate.certificate_chain.inline_bytes  # type: ignore[attr-defined,no-any-return]


async def test_first_response_carries_the_state_version_a_nonce_and_the_secret(
        scripted: Scripted, pki: Pki) -> None:
    svid = pki.svid()
    state = scripted.cache.publish([svid], pki.bundles)
    assert state is None  # nobody watches yet: the default state applies to new keys
    client = SotwClient(scripted.socket)
    try:
        # A nonce from a previous agent is accepted before anything was sent.
        await client.request(["default", "ROOTCA"], nonce="0badc0de", version="41")
        response = await client.read()
        key = scripted.cache.watched[0]
        assert response.version_info == str(scripted.cache.publishers[key].latest.version)
        assert re.fullmatch(r"[0-9a-f]{8}", response.nonce)
        assert response.type_url == SECRET_TYPE_URL
        secrets = secrets_of(response)
        assert set(secrets) == {"default", "ROOTCA"}
        assert chain_of(secrets["default"]) == pem_certificates(svid.cert_chain)
        await client.ack(["default", "ROOTCA"])
        await eventually(lambda: scripted.server.stats.acks == 1, what="the ACK")
    finally:
        await client.close()


async def test_every_change_is_pushed_with_a_fresh_nonce_and_stale_nonces_are_ignored(
        scripted: Scripted, pki: Pki) -> None:
    scripted.cache.publish([pki.svid()], pki.bundles)
    client = SotwClient(scripted.socket)
    try:
        await client.request(["default"])
        first = await client.read()
        await client.ack(["default"])
        await eventually(lambda: scripted.server.stats.acks == 1, what="the ACK")

        second_svid = pki.svid()
        scripted.cache.publish([second_svid], pki.bundles)
        second = await client.read()
        assert int(second.version_info) > int(first.version_info)
        assert second.nonce != first.nonce
        assert chain_of(secrets_of(second)["default"]) == pem_certificates(second_svid.cert_chain)

        # An answer to the FIRST response (stale nonce) asking for other names: ignored.
        await client.request(["ROOTCA"], nonce=first.nonce, version=first.version_info)
        await eventually(lambda: scripted.server.stats.stale_nonces == 1, what="stale nonce")
        third_svid = pki.svid()
        scripted.cache.publish([third_svid], pki.bundles)
        third = await client.read()
        assert set(secrets_of(third)) == {"default"}, "the stale request changed the names"
        assert chain_of(secrets_of(third)["default"]) == pem_certificates(third_svid.cert_chain)
        assert scripted.server.stats.acks == 1  # the second response was never ACKed
    finally:
        await client.close()


async def test_a_nacked_secret_is_never_pushed_again_and_the_next_good_one_is(
        scripted: Scripted, pki: Pki, caplog: pytest.LogCaptureFixture) -> None:
    good = pki.svid()
    scripted.cache.publish([good], pki.bundles)
    client = SotwClient(scripted.socket)
    try:
        await client.request(["default"])
        accepted = await client.read()
        await client.ack(["default"])
        await eventually(lambda: scripted.server.stats.acks == 1, what="the ACK")

        bad = pki.svid(key=pki.other.key)  # key does not match the certificate
        scripted.cache.publish([bad], pki.bundles)
        rejected = await client.read()
        assert chain_of(secrets_of(rejected)["default"]) == pem_certificates(bad.cert_chain)
        with caplog.at_level(logging.ERROR, logger="spiffe_delegate.sds"):
            await client.nack(["default"], accepted.version_info, "KEY_VALUES_MISMATCH")
            await eventually(lambda: scripted.server.stats.nacks == 1, what="the NACK")
        stats = scripted.server.stats
        assert stats.nacks_by_name["default"] == 1
        assert stats.last_nack_detail == "KEY_VALUES_MISMATCH"
        assert "KEY_VALUES_MISMATCH" in caplog.text

        # Same bad SVID, new state (another bundle): the client already holds the last
        # ACKed secret, so nothing is sent.
        avoided = stats.repushes_avoided
        scripted.cache.publish([bad], {**pki.bundles, pki.other.key_name: (pki.other.der,)})
        await eventually(lambda: stats.repushes_avoided > avoided, what="no re-push")

        fixed = pki.svid()
        scripted.cache.publish([fixed], pki.bundles)
        response = await client.read()
        assert chain_of(secrets_of(response)["default"]) == pem_certificates(fixed.cert_chain)
    finally:
        await client.close()


async def test_an_unknown_type_url_is_invalid_argument(scripted: Scripted, pki: Pki) -> None:
    scripted.cache.publish([pki.svid()], pki.bundles)
    client = SotwClient(scripted.socket)
    try:
        await client.request(["default"],
                             type_url="type.googleapis.com/envoy.config.cluster.v3.Cluster")
        code, details = await client.status()
        assert code is grpc.StatusCode.INVALID_ARGUMENT
        assert "type_url" in details
    finally:
        await client.close()


@pytest.mark.parametrize(("name", "why"), [
    ("bogus", "expected 'default'"),
    (OTHER_ID, "no SVID with this SPIFFE ID"),
    ("spiffe://nowhere.test", "no bundle for trust domain"),
])
async def test_names_that_cannot_be_met_end_the_stream_as_spire_does(
        scripted: Scripted, pki: Pki, name: str, why: str) -> None:
    scripted.cache.publish([pki.svid()], pki.bundles)
    client = SotwClient(scripted.socket)
    try:
        await client.request(["default", name])
        code, details = await client.status()
        assert code is grpc.StatusCode.INVALID_ARGUMENT
        assert details.startswith(
            f'workload is not authorized for the requested identities ["{name}"]'), details
        assert why in details
    finally:
        await client.close()


async def test_a_caller_without_identity_waits_and_is_logged_once(
        scripted: Scripted, pki: Pki, caplog: pytest.LogCaptureFixture) -> None:
    scripted.cache.publish([], pki.bundles)  # SPIRE matched no entry
    clients = [SotwClient(scripted.socket), SotwClient(scripted.socket)]
    try:
        with caplog.at_level(logging.WARNING, logger="spiffe_delegate.sds"):
            for client in clients:
                await client.request(["default"])
            key = await _watched_key(scripted)
            await eventually(lambda: scripted.server.stats.streams_active == 2)
        assert caplog.text.count("has no identity from SPIRE") == 1, caplog.text

        svid = pki.svid()
        state = scripted.cache.publish([svid], pki.bundles, key=key)
        assert state is not None
        for client in clients:
            response = await client.read()
            # The first thing each stream gets is the state that has an identity.
            assert response.version_info == str(state.version)
            assert chain_of(secrets_of(response)["default"]) == pem_certificates(svid.cert_chain)
    finally:
        for client in clients:
            await client.close()


async def test_a_caller_without_identity_gets_bundles_it_names_and_nothing_else(
        scripted: Scripted, pki: Pki) -> None:
    """As SPIRE's SDS server: ROOTCA (the agent's trust domain, here --trust-domain), ALL
    and spiffe://<td> are public CA certificates and are served; a stream that also asks
    for an SVID waits, and so does an empty (everything) request."""
    scripted.cache.publish([], pki.bundles)
    for names in (["ROOTCA"], ["ALL"], [f"spiffe://{TD}"]):
        response = await fetch(scripted.socket, names)
        assert set(secrets_of(response)) == set(names)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await fetch(scripted.socket, ["default"])
    assert caught.value.code() is grpc.StatusCode.PERMISSION_DENIED

    bundle_only, mixed = SotwClient(scripted.socket), SotwClient(scripted.socket)
    try:
        await bundle_only.request(["ROOTCA"])
        response = await bundle_only.read()
        assert [r.name for r in secrets_of(response).values()] == ["ROOTCA"]
        await mixed.request(["default", "ROOTCA"])
        await eventually(lambda: scripted.server.stats.streams_active == 2)
        reading = asyncio.ensure_future(mixed.read())
        done, _ = await asyncio.wait([reading], timeout=0.3)
        assert not done, "a stream asking for an SVID was answered without one"
        reading.cancel()
    finally:
        await bundle_only.close()
        await mixed.close()


async def test_rootca_without_identity_follows_the_trust_domain_the_cache_learned(
        work_dir: Path, pki: Pki) -> None:
    """No --trust-domain: ROOTCA waits until the cache knows the local trust domain (the
    agent's own SVID's), then names that bundle."""
    harness = await scripted_server(work_dir, trust_domain=None)
    client = SotwClient(harness.socket)
    try:
        harness.cache.publish([], pki.bundles)
        await client.request(["ROOTCA"])
        key = await _watched_key(harness)
        reading = asyncio.ensure_future(client.read())
        done, _ = await asyncio.wait([reading], timeout=0.3)
        assert not done, "ROOTCA was served without a known trust domain"
        harness.cache.publish([], pki.bundles, key=key, trust_domain=TD)
        response = await reading
        assert list(secrets_of(response)) == ["ROOTCA"]
    finally:
        await client.close()
        harness.cache.close()
        await harness.server.stop(grace=1)


async def _watched_key(scripted: Scripted) -> object:
    await eventually(lambda: bool(scripted.cache.watched), what="a watch")
    return scripted.cache.watched[0]


async def test_fetch_secrets(scripted: Scripted, pki: Pki) -> None:
    svid = pki.svid()
    scripted.cache.publish([svid], pki.bundles)
    response = await fetch(scripted.socket, ["default", "ROOTCA"])
    assert set(secrets_of(response)) == {"default", "ROOTCA"}
    assert chain_of(secrets_of(response)["default"]) == pem_certificates(svid.cert_chain)
    key = scripted.cache.watched[-1]
    assert response.version_info == str(scripted.cache.publishers[key].latest.version)
    assert response.nonce == ""

    everything = await fetch(scripted.socket, [])
    assert set(secrets_of(everything)) == {f"spiffe://{TD}", PROXY_ID}

    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await fetch(scripted.socket, ["default", "nonsense"])
    assert caught.value.code() is grpc.StatusCode.INVALID_ARGUMENT

    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await fetch(scripted.socket, ["default"], type_url="type.googleapis.com/x.Y")
    assert caught.value.code() is grpc.StatusCode.INVALID_ARGUMENT

    scripted.cache.publish([], pki.bundles)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await fetch(scripted.socket, ["default"])
    assert caught.value.code() is grpc.StatusCode.PERMISSION_DENIED
    assert "no identity issued" in (caught.value.details() or "")
    # All the calls above released their watches.
    await eventually(lambda: not scripted.cache.open_watches, what="watches released")


async def test_fetch_waits_for_attestation_then_gives_up(work_dir: Path, pki: Pki) -> None:
    harness = await scripted_server(work_dir, fetch_timeout=0.3)
    try:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await fetch(harness.socket, ["default"])  # no state ever arrives
        assert caught.value.code() is grpc.StatusCode.UNAVAILABLE
        assert "being attested" in (caught.value.details() or "")

        pending = asyncio.ensure_future(fetch(harness.socket, ["default"]))
        await eventually(lambda: len(harness.cache.watched) == 2, what="the second fetch")
        harness.cache.publish([pki.svid()], pki.bundles)
        response = await pending
        assert set(secrets_of(response)) == {"default"}
    finally:
        harness.cache.close()
        await harness.server.stop(grace=1)


async def test_workload_names_only_for_trusted_proxies(work_dir: Path, pki: Pki,
                                                       caplog: pytest.LogCaptureFixture) -> None:
    harness = await scripted_server(work_dir, trusted=[PROXY_ID])
    pod_svid = pki.svid(f"spiffe://{TD}/ns/apps/sa/web")
    harness.cache.publish([pod_svid], pki.bundles, key=WorkloadUid(POD))
    name = f"workload:{POD}"
    try:
        harness.cache.publish([pki.svid(OTHER_ID)], pki.bundles)
        client = SotwClient(harness.socket)
        with caplog.at_level(logging.WARNING, logger="spiffe_delegate.sds"):
            await client.request([name])
            code, details = await client.status()
        await client.close()
        assert code is grpc.StatusCode.PERMISSION_DENIED, details
        assert "not a trusted proxy" in caplog.text
        assert WorkloadUid(POD) not in harness.cache.watched, "watched before authorizing"
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await fetch(harness.socket, [name])
        assert caught.value.code() is grpc.StatusCode.PERMISSION_DENIED

        harness.cache.publish([pki.svid(PROXY_ID)], pki.bundles)  # every key, the pod's too
        harness.cache.publish([pod_svid], pki.bundles, key=WorkloadUid(POD))
        client = SotwClient(harness.socket)
        await client.request([name, "default"])
        response = await client.read()
        secrets = secrets_of(response)
        assert chain_of(secrets[name]) == pem_certificates(pod_svid.cert_chain)
        assert WorkloadUid(POD) in harness.cache.watched
        # The pod's rotation reaches the proxy.
        await client.ack([name, "default"])
        rotated = pki.svid(f"spiffe://{TD}/ns/apps/sa/web")
        harness.cache.publish([rotated], pki.bundles, key=WorkloadUid(POD))
        response = await client.read()
        assert chain_of(secrets_of(response)[name]) == pem_certificates(rotated.cert_chain)
        await client.close()
        assert (await fetch(harness.socket, [name])).resources
    finally:
        harness.cache.close()
        await harness.server.stop(grace=1)


# --- delta ------------------------------------------------------------------------------

async def test_delta_subscribe_ack_unsubscribe_and_initial_versions(
        scripted: Scripted, pki: Pki) -> None:
    scripted.cache.publish([pki.svid()], pki.bundles)
    client = DeltaClient(scripted.socket)
    try:
        await client.request(["default", "ROOTCA"], node=True)
        first = await client.read()
        versions = {r.name: r.version for r in first.resources}
        assert set(versions) == {"default", "ROOTCA"}
        assert re.fullmatch(r"[0-9a-f]{8}", first.nonce)
        assert first.type_url == SECRET_TYPE_URL and first.system_version_info
        await client.ack()

        rotated = pki.svid()
        scripted.cache.publish([rotated], pki.bundles)
        second = await client.read()
        assert [r.name for r in second.resources] == ["default"]  # ROOTCA did not change
        assert chain_of(secrets_of(second)["default"]) == pem_certificates(rotated.cert_chain)
        await client.ack()
        held = {**versions, "default": second.resources[0].version}

        await client.request(["ALL"], unsubscribe=["default"])
        third = await client.read()
        assert [r.name for r in third.resources] == ["ALL"]
        await client.ack()
        scripted.cache.publish([pki.svid()], pki.bundles)  # only default changes: no push
        scripted.cache.publish([pki.svid()], {pki.ca.key_name: (pki.ca.der, pki.other.der)})
        fourth = await client.read()
        assert sorted(r.name for r in fourth.resources) == ["ALL", "ROOTCA"]
        await client.ack()
        await eventually(lambda: scripted.server.stats.acks == 4)
    finally:
        await client.close()

    # A reconnecting client that already holds the current secrets gets nothing again...
    current = scripted.cache.default
    assert current is not None
    scripted.cache.publish(current["svids"], pki.bundles)
    again = DeltaClient(scripted.socket)
    try:
        await again.request(["ROOTCA"], initial={"ROOTCA": held["ROOTCA"]}, node=True)
        await again.request(["default"])
        response = await again.read()
        # ...the first response is default alone: ROOTCA was up to date.
        assert [r.name for r in response.resources] == ["default"]
    finally:
        await again.close()


async def test_delta_nack_is_not_repushed_and_lost_names_are_removed(
        scripted: Scripted, pki: Pki) -> None:
    scripted.cache.publish([pki.svid(PROXY_ID)], pki.bundles)
    client = DeltaClient(scripted.socket)
    try:
        await client.request([PROXY_ID, "ROOTCA"])
        await client.read()
        await client.ack()
        await eventually(lambda: scripted.server.stats.acks == 1, what="the ACK")

        bad = pki.svid(PROXY_ID, key=pki.other.key)
        scripted.cache.publish([bad], pki.bundles)
        await client.read()
        await client.request(nonce=client.last.nonce, error="KEY_VALUES_MISMATCH")
        await eventually(lambda: scripted.server.stats.nacks == 1, what="the NACK")
        assert scripted.server.stats.nacks_by_name[PROXY_ID] == 1

        # The rejected content stays rejected: a bundle change sends only the bundle.
        scripted.cache.publish([bad], {pki.ca.key_name: (pki.ca.der, pki.other.der)})
        response = await client.read()
        assert [r.name for r in response.resources] == ["ROOTCA"]
        await client.ack()

        # The caller loses that SPIFFE ID: the client is told it is gone.
        scripted.cache.publish([pki.svid(OTHER_ID)], pki.bundles)
        response = await client.read()
        assert list(response.removed_resources) == [PROXY_ID]
        assert [r.name for r in response.resources] == ["ROOTCA"]
    finally:
        await client.close()


# --- isolation and shutdown -------------------------------------------------------------

async def test_a_client_that_stops_reading_does_not_delay_another(
        scripted: Scripted, pki: Pki) -> None:
    """Each push here is ~1 MB; the stuck client's buffers fill after a few while the
    other client keeps getting every newest state."""
    def padded(i: int) -> dict[str, tuple[bytes, ...]]:
        return {**pki.bundles, f"spiffe://pad-{i}.test": (pki.other.der,) * 1500}

    scripted.cache.publish([pki.svid()], padded(0))
    # No BDP probing: the stuck client's flow-control window stays small.
    stuck = SotwClient(scripted.socket, options=[("grpc.http2.bdp_probe", 0)])
    lively = SotwClient(scripted.socket)
    try:
        await stuck.request(["ALL"])
        await lively.request(["ALL"])
        await stuck.read(timeout=10)  # then never reads again
        await lively.read(timeout=10)
        await lively.ack(["ALL"])
        for i in range(1, 9):
            state = scripted.cache.publish([pki.svid()], padded(i))
            assert state is not None
            response = await lively.read(timeout=10)
            assert response.version_info == str(state.version)
            await lively.ack(["ALL"])
        # The stuck stream really is stuck: its handler blocked writing long before it
        # could have sent every state (9 for the lively stream, at most a few for it).
        assert scripted.server.stats.responses < 9 + 9
    finally:
        await stuck.close()
        await lively.close()


async def test_stop_ends_streams_cleanly_refuses_new_calls_and_removes_the_socket(
        work_dir: Path, pki: Pki) -> None:
    harness = await scripted_server(work_dir)
    harness.cache.publish([pki.svid()], pki.bundles)
    sotw, delta = SotwClient(harness.socket), DeltaClient(harness.socket)
    try:
        await sotw.request(["default"])
        await sotw.read()
        await delta.request(["default"])
        await delta.read()
        await harness.server.stop(grace=2)
        assert await sotw.status() == (grpc.StatusCode.OK, "")
        assert not harness.socket.exists()
        assert harness.server.stats.streams_active == 0
    finally:
        await sotw.close()
        await delta.close()
        harness.cache.close()
