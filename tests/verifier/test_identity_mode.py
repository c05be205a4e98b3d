"""Identity mode with 20 real pods: one long-lived subscription, handed over without a gap."""

from __future__ import annotations

import contextlib
import time

import pytest

from agent.attest import ProcReader
from agent.attest.verifier import VerifierSettings, VerifierStats
from agent.cache import (
    CacheSettings,
    Identity,
    KeyMode,
    SpireSource,
    SvidCache,
    WorkloadUid,
)
from agent.clock import SystemClock
from tests.devspire.conftest import TD, entry
from tests.podcgroups import fake_pod
from tests.waiting import eventually

from .conftest import Recorder, Spire, kill, spawn

pytestmark = pytest.mark.root

SHARED = f"spiffe://{TD}/ns/shared/sa/web"
PODS = 20


async def test_twenty_pods_share_one_subscription_and_survive_their_carrier(
        spire: Spire) -> None:
    with contextlib.ExitStack() as stack:
        pods = [stack.enter_context(fake_pod()) for _ in range(PODS)]
        # Each pod is its own pod (own UID, own cgroups, own process); the kubelet's pod
        # list gives them all the same namespace and service account.
        await spire.set_pods([{"uid": pod.pod_uid, "namespace": "shared",
                               "service_account": "web", "name": f"web-{i}"}
                              for i, pod in enumerate(pods)])
        await spire.set_entries([entry(SHARED, "k8s:ns:shared", "k8s:sa:web")])
        procs = {pod.pod_uid: spawn(pod) for pod in pods}
        keys = [WorkloadUid(pod.pod_uid) for pod in pods]
        identity = Identity.of(SHARED)

        source = SpireSource(spire.client, ProcReader(), clock=SystemClock(),
                             settings=VerifierSettings(rescan_interval=0.1),
                             stats=VerifierStats())
        settings = CacheSettings(key_mode=KeyMode.IDENTITY, grace_period=0.1,
                                 rescan_interval=0.1)
        async with SvidCache(source, settings=settings) as cache:
            recorders = [Recorder(cache.watch(key)) for key in keys]
            await eventually(lambda: all(r.states and r.states[-1].spiffe_ids == (SHARED,)
                                         for r in recorders), 20, "every pod's SVID")
            await eventually(lambda: spire.open_x509_streams() == 1, 10,
                             "one long-lived X.509 subscription at steady state")
            assert spire.dev.stats.open_streams["SubscribeToX509Bundles"] == 1

            # Every pod was attested on its own, through one of its own processes.
            assert spire.dev.stats.streams_opened["SubscribeToX509SVIDs"] >= PODS
            assert cache.stats.attestations >= PODS
            for key in keys:
                status = cache.workloads()[key]
                assert status.attested is not None
                assert status.attested.pod_uid == key.pod_uid
                assert status.attested.pid == procs[key.pod_uid].pid
                assert status.source == identity
            group = cache.groups()[identity]
            assert set(group.members) == set(keys)
            carrier = group.carrier
            assert isinstance(carrier, WorkloadUid)
            certs = {r.states[-1].svids[0].cert_chain[0] for r in recorders}
            assert len(certs) == 1, "one certificate for the shared identity"

            # The carrier pod goes away.
            kill(procs[carrier.pod_uid])
            await eventually(lambda: cache.groups()[identity].carrier not in (None, carrier),
                             10, "the subscription to move to another pod")
            new_carrier = cache.groups()[identity].carrier
            assert new_carrier != carrier
            assert cache.stats.carrier_handovers == 1
            await eventually(lambda: spire.open_x509_streams() == 1, 10,
                             "one subscription again after the handover")

            # The new carrier's subscription is live: a rotation reaches every pod.
            await spire.dev.rotate_now(SHARED)
            await eventually(lambda: all(r.states[-1].svids
                                         and r.states[-1].svids[0].cert_chain[0] not in certs
                                         for r in recorders), 10, "the rotated SVID")
            assert spire.open_x509_streams() == 1
            for recorder in recorders:
                await recorder.stop()

        # No interval without a valid SVID: from its first SVID on, every state each pod
        # was handed held one, valid when it arrived.
        for recorder in recorders:
            received = recorder.received
            first = next(i for i, (_, state) in enumerate(received) if not state.empty)
            for arrived, state in received[first:]:
                assert not state.empty, f"{recorder.watch.key} was left without an SVID"
                assert all(svid.expires_at > arrived for svid in state.svids)
                assert state.spiffe_ids == (SHARED,)
        assert time.time() < min(r.states[-1].svids[0].expires_at for r in recorders)
