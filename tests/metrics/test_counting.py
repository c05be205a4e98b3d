"""The counters behind the metrics, counted where things happen: rotations and cached SVIDs
in the cache, attestation results in the verifier, SDS pushes/ACKs/NACKs by resource kind
and push-to-ACK latency in the handler. No Envoy, no root."""

from __future__ import annotations

import asyncio
import dataclasses
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from envoy.extensions.transport_sockets.tls.v3 import secret_pb2
from envoy.service.discovery.v3 import discovery_pb2
from prometheus_client import CollectorRegistry

from agent.attest import ProcessGone, ProcReader
from agent.attest.procfs import ProcessIdentity, ProcessPlacement
from agent.attest.verifier import ProcessTarget, VerifierSettings, VerifierStats, X509Verifier
from agent.cache import CacheSettings, Identity, KeyMode, SvidCache, WorkloadUid
from agent.clock import ManualClock
from agent.errors import SpirePermissionDenied
from agent.metrics import AgentMetrics, SdsAckMetrics
from agent.model import X509SvidUpdate
from agent.sds.delta import DeltaProtocol
from agent.sds.names import SdsNames, resource_kind
from agent.sds.resources import SECRET_TYPE_URL
from agent.sds.server import SdsServer, SdsSettings
from agent.sds.sotw import SotwProtocol
from agent.sds.view import ViewSettings
from tests.cache.conftest import FakeSource
from tests.metrics.fakes import FakeCache, FakeClient, FakeSds, FakeVerifier
from tests.metrics.labels import scrape, suspicious_labels
from tests.sds_server.clients import DeltaClient, SotwClient
from tests.sds_server.conftest import PROXY_ID, TD, Pki
from tests.sds_server.conftest import FakeCache as ScriptedCache
from tests.spire.pki import NOW, Ca
from tests.verifier.conftest import kill
from tests.verifier.test_verifier import ScriptedClient
from tests.waiting import eventually

POD_A = "aaaaaaaa-0000-4000-8000-000000000001"
POD_B = "bbbbbbbb-0000-4000-8000-000000000002"
WEB = "spiffe://example.org/web"
EMPTY = X509SvidUpdate(svids=())


# --- the cache: rotations, cached SVIDs by entry ----------------------------------------

@pytest.fixture
def ca() -> Ca:
    return Ca.root()


def scripted_source(ca: Ca) -> FakeSource:
    source = FakeSource()
    source.bundle_queue.put_nowait(ca.bundles())
    return source


async def test_a_new_certificate_for_the_same_id_is_a_rotation_a_resend_is_not(
        ca: Ca) -> None:
    source = scripted_source(ca)
    async with SvidCache(source, clock=ManualClock(NOW)) as cache:
        await cache.wait_for_bundles()
        key = WorkloadUid(POD_A)
        watch = cache.watch(key)
        await eventually(lambda: bool(source.streams[key]))
        stream = source.last(key)
        first = ca.svid("/web")
        stream.push(first)
        state = await asyncio.wait_for(watch.next(), 5)
        assert cache.stats.rotations == 0, "the first SVID is no rotation"
        assert dict(cache.cached_svids()[key]).keys() == {WEB}

        stream.push(first)  # SPIRE re-sends unchanged SVIDs on any bundle change
        stream.push(first, ca.svid("/other"))  # a second ID appears: no rotation either
        await eventually(lambda: len(cache.cached_svids()[key]) == 2)
        assert cache.stats.rotations == 0

        rotated = ca.svid("/web")
        stream.push(rotated, ca.svid("/other"))
        await eventually(lambda: cache.stats.rotations == 2, what="two rotations")
        served = cache.cached_svids()[key]
        assert served[WEB].svid == rotated
        assert (await asyncio.wait_for(watch.next(state.version), 5)).svids[0] == rotated

        # A rejected certificate is not served, so it is not a rotation.
        stream.push(ca.svid("/web", wrong_key=True), ca.svid("/other"))
        await eventually(lambda: cache.stats.svids_rejected["key_mismatch"] == 1)
        assert cache.cached_svids()[key][WEB].svid == rotated
        assert cache.stats.rotations == 3  # only /other rotated
        watch.close()


async def test_cached_svids_are_per_entry_kind_in_identity_mode(ca: Ca) -> None:
    source = scripted_source(ca)
    settings = CacheSettings(key_mode=KeyMode.IDENTITY)
    async with SvidCache(source, clock=ManualClock(NOW), settings=settings) as cache:
        await cache.wait_for_bundles()
        pods = [WorkloadUid(POD_A), WorkloadUid(POD_B)]
        source.live.update(pods)
        watches = [cache.watch(key) for key in pods]
        await eventually(lambda: all(source.streams[key] for key in pods))
        shared = ca.svid("/web")
        for key in pods:
            source.last(key).push(shared)
        for watch in watches:
            await asyncio.wait_for(watch.next(), 5)
        cached = cache.cached_svids()
        # One shared certificate, counted once, under its Identity; the pods hold none.
        assert {k: len(v) for k, v in cached.items()} == {
            pods[0]: 0, pods[1]: 0, Identity.of(WEB): 1}

        registry = CollectorRegistry()
        AgentMetrics(registry, client=FakeClient(), source=FakeVerifier(), cache=cache,
                     sds=FakeSds(), clock=ManualClock(NOW), process=False)
        result = scrape(registry)
        assert result.by_label("spiffe_delegate_svids_cached", "kind") == {
            "workload": 0, "identity": 1, "process": 0}
        assert result.value("spiffe_delegate_svid_expiry_seconds", spiffe_id=WEB) == 3600
        for watch in watches:
            watch.close()


# --- the verifier: attestations by result -----------------------------------------------

@pytest.fixture
def sleeper() -> Iterator[subprocess.Popen[Any]]:
    proc = subprocess.Popen(["sleep", "60"])
    yield proc
    kill(proc)


async def test_verified_answers_count_as_ok_or_unmatched(
        sleeper: subprocess.Popen[Any], ca: Ca) -> None:
    shared = VerifierStats()
    client = ScriptedClient(X509SvidUpdate((ca.svid("/web"),)))
    verifier = X509Verifier(client, ProcReader(), ProcessTarget(sleeper.pid), stats=shared)
    await asyncio.wait_for(anext(verifier), 5)
    assert shared.attestations == {"ok": 1}
    client.subscriptions[0].queue.put_nowait(EMPTY)  # the entry was deleted
    assert (await asyncio.wait_for(anext(verifier), 5)).update == EMPTY
    assert shared.attestations == {"ok": 1, "unmatched": 1}
    assert verifier.stats.attestations == shared.attestations  # its own copy, too
    await verifier.aclose()


async def test_a_process_gone_before_delivery_counts_as_process_gone(
        sleeper: subprocess.Popen[Any]) -> None:
    shared = VerifierStats()
    client = ScriptedClient(EMPTY)
    verifier = X509Verifier(client, ProcReader(), ProcessTarget(sleeper.pid), stats=shared,
                            settings=VerifierSettings(use_pidfd=False))
    verifier._start()
    await eventually(lambda: bool(client.subscriptions) and client.subscriptions[0].sent == 1,
                     5, "SPIRE's answer to be read")
    kill(sleeper)
    with pytest.raises(ProcessGone):
        await asyncio.wait_for(anext(verifier), 5)
    # The answer was discarded at delivery; then the process could not be pinned again.
    assert shared.attestations == {"process_gone": 2}
    assert shared.pid_reuse_detected == 0
    await verifier.aclose()


class ReusedAfter(ProcReader):
    """A /proc reader whose ``pid`` names another process (a later start time) once
    ``reuse`` is set, as after the kernel handed the PID to someone else."""

    def __init__(self, pid: int) -> None:
        super().__init__()
        self.pid = pid
        self.reuse = False

    def identity(self, pid: int, pidfd: int | None = None) -> ProcessIdentity:
        found = super().identity(pid, pidfd)
        if self.reuse and pid == self.pid:
            return ProcessIdentity(pid=found.pid, start_time=found.start_time + 1,
                                   uid=found.uid, pod_uid=found.pod_uid,
                                   container_id=found.container_id)
        return found

    def placement(self, pid: int, pidfd: int | None = None) -> ProcessPlacement:
        found = super().placement(pid, pidfd)  # what re-checks read
        if self.reuse and pid == self.pid:
            return dataclasses.replace(found, start_time=found.start_time + 1)
        return found


async def test_a_reused_pid_counts_as_failed_and_as_pid_reuse(
        sleeper: subprocess.Popen[Any]) -> None:
    shared = VerifierStats()
    reader = ReusedAfter(sleeper.pid)
    client = ScriptedClient(EMPTY)
    verifier = X509Verifier(client, reader, ProcessTarget(sleeper.pid), stats=shared,
                            settings=VerifierSettings(use_pidfd=False))
    await asyncio.wait_for(anext(verifier), 5)
    reader.reuse = True
    client.subscriptions[0].queue.put_nowait(EMPTY)
    with pytest.raises(ProcessGone):
        await asyncio.wait_for(anext(verifier), 5)
    assert shared.pid_reuse_detected == 1
    assert shared.attestations["failed"] == 1
    assert shared.attestations["unmatched"] == 1
    await verifier.aclose()


async def test_a_refusal_from_spire_counts_as_spire_error(
        sleeper: subprocess.Popen[Any]) -> None:
    shared = VerifierStats()
    clock = ManualClock()
    client = ScriptedClient(SpirePermissionDenied("no identity issued"))
    verifier = X509Verifier(client, ProcReader(), ProcessTarget(sleeper.pid), clock=clock,
                            stats=shared)
    pending = asyncio.ensure_future(anext(verifier))
    await eventually(lambda: clock.sleepers == 1, 5, "the retry wait")
    assert shared.attestations == {"spire_error": 1}
    client.first = (EMPTY,)
    clock.advance(5)
    await asyncio.wait_for(pending, 5)
    assert shared.attestations == {"spire_error": 1, "unmatched": 1}
    await verifier.aclose()


# --- SDS: pushes, ACKs, NACKs by kind; push-to-ACK latency --------------------------------

def test_resource_kinds_are_bounded() -> None:
    names = SdsNames()
    assert [resource_kind(n, names) for n in (
        "default", "ROOTCA", "ALL", f"spiffe://{TD}", f"spiffe://{TD}/web",
        f"workload:{POD_A}", "nonsense")] == [
        "default", "ROOTCA", "ALL", "trust_domain", "spiffe_id", "workload", "invalid"]
    renamed = SdsNames(default_svid_name="svid", default_bundle_name="ca",
                       default_all_bundles_name="everything")
    assert [resource_kind(n, renamed) for n in ("svid", "ca", "everything", "default")] == [
        "default", "ROOTCA", "ALL", "invalid"]


async def test_pushes_acks_and_nacks_by_kind_and_push_to_ack_latency(
        work_dir: Path, pki: Pki) -> None:
    """A trusted proxy (the test process) asks for its own SVID, the bundle and a pod's
    SVID by pod UID: the counters say ``workload``, never the UID; every ACK is one
    observation of the push-to-ACK histogram; a NACK is counted by kind and not observed."""
    cache = ScriptedCache()
    acks = SdsAckMetrics()
    server = SdsServer(SdsSettings(work_dir / "sds.sock", view=ViewSettings(
        trust_domain=TD, trusted_proxies=frozenset([PROXY_ID]))), cache, observer=acks)
    await server.start()
    registry = CollectorRegistry()
    AgentMetrics(registry, client=FakeClient(), source=FakeVerifier(), cache=FakeCache(),
                 sds=server, sds_acks=acks, process=False)
    pod_name = f"workload:{POD_A}"
    try:
        cache.publish([pki.svid(PROXY_ID)], pki.bundles)
        cache.publish([pki.svid(WEB)], pki.bundles, key=WorkloadUid(POD_A))
        client = SotwClient(server.socket_path)
        try:
            names = ["default", "ROOTCA", pod_name]
            await client.request(names)
            await client.read()
            await client.ack(names)
            stats = server.stats
            await eventually(lambda: stats.acks == 1, what="the ACK")
            cache.publish([pki.svid(WEB)], pki.bundles, key=WorkloadUid(POD_A))  # rotation
            await client.read()
            await client.nack(names, version="1", error="refused for the test")
            await eventually(lambda: stats.nacks == 1, what="the NACK")
        finally:
            await client.close()

        delta = DeltaClient(server.socket_path)
        try:
            await delta.request(["default"], node=True)
            await delta.read()
            await delta.ack()
            await eventually(lambda: stats.acks == 2, what="the delta ACK")
        finally:
            await delta.close()
        await eventually(lambda: stats.streams_active == 0, what="the streams to close")

        result = scrape(registry)
        pushes = result.by_label("spiffe_delegate_sds_pushes_total", "resource")
        assert (pushes["default"], pushes["ROOTCA"], pushes["workload"]) == (3, 2, 2)
        assert result.value("spiffe_delegate_sds_acks_total", resource="workload") == 1
        assert result.value("spiffe_delegate_sds_acks_total", resource="default") == 2
        assert result.value("spiffe_delegate_sds_nacks_total", resource="workload") == 1
        assert result.value("spiffe_delegate_sds_nacks_total", resource="ROOTCA") == 1
        assert result.by_label("spiffe_delegate_sds_streams_opened_total", "api") == {
            "sotw": 1, "delta": 1}
        assert result.value("spiffe_delegate_sds_streams_open") == 0
        count = result.value("spiffe_delegate_sds_push_ack_seconds_count")
        assert count == 2, "one observation per ACK, none for the NACK"
        assert 0 < result.value("spiffe_delegate_sds_push_ack_seconds_sum") < 5
        assert POD_A not in result.text
        assert suspicious_labels(result.families, known=[POD_A]) == []
    finally:
        cache.close()
        await server.stop(grace=1)


def test_sotw_hands_back_each_responses_stamp_with_its_answer() -> None:
    protocol = SotwProtocol()

    def request(nonce: str = "", version: str = "") -> Any:
        return discovery_pb2.DiscoveryRequest(resource_names=["ROOTCA"], response_nonce=nonce,
                                              version_info=version, type_url=SECRET_TYPE_URL)

    def secret(n: int) -> Any:
        return secret_pb2.Secret(name=f"ROOTCA-{n}")

    assert protocol.on_request(request()).sent_at is None
    first = protocol.build(1, {"ROOTCA": secret(1)}, sent_at=10.0)
    second = protocol.build(2, {"ROOTCA": secret(2)}, sent_at=20.0)
    # Envoy's ACK of the first crosses the second push: a stale request, still timed.
    stale = protocol.on_request(request(first.nonce, first.version_info))
    assert (stale.stale, stale.acked, stale.sent_at) == (True, ("ROOTCA",), 10.0)
    acked = protocol.on_request(request(second.nonce, second.version_info))
    assert (acked.acked, acked.sent_at) == (("ROOTCA",), 20.0)
    unstamped = protocol.build(3, {"ROOTCA": secret(3)})
    assert protocol.on_request(request(unstamped.nonce, "3")).sent_at is None


def test_delta_hands_back_each_responses_stamp_with_its_answer() -> None:
    protocol = DeltaProtocol()
    protocol.on_request(discovery_pb2.DeltaDiscoveryRequest(resource_names_subscribe=["a"]))
    first = protocol.build(1, {"a": secret_pb2.Secret(name="a")}, (), True, sent_at=5.0)
    second = protocol.build(2, {"a": secret_pb2.Secret(name="b")}, (), True, sent_at=7.0)
    out = protocol.on_request(discovery_pb2.DeltaDiscoveryRequest(
        response_nonce=second.nonce))
    assert (out.acked, out.sent_at) == (("a",), 7.0)
    out = protocol.on_request(discovery_pb2.DeltaDiscoveryRequest(response_nonce=first.nonce))
    assert (out.acked, out.sent_at) == (("a",), 5.0)
    out = protocol.on_request(discovery_pb2.DeltaDiscoveryRequest(response_nonce=first.nonce))
    assert (out.unknown_nonce, out.sent_at) == (True, None), "answered already"
