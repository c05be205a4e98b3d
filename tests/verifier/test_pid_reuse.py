"""Forced PID reuse with real processes in real pod cgroups: a pod never gets another's SVID."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

import pytest

from agent.attest import ProcReader
from agent.attest.verifier import VerifierSettings, VerifierStats
from agent.cache import CacheSettings, SpireSource, SvidCache, WorkloadUid
from agent.clock import SystemClock
from tests.devspire.conftest import TD, entry
from tests.podcgroups import fake_pod
from tests.waiting import eventually

from .conftest import Recorder, Spire, kill, spawn, spawn_with_pid

pytestmark = pytest.mark.root

A_ID = f"spiffe://{TD}/pod-a"
B_ID = f"spiffe://{TD}/pod-b"


@contextlib.asynccontextmanager
async def svid_cache(spire: Spire, *, use_pidfd: bool) -> AsyncIterator[
        tuple[SvidCache, VerifierStats]]:
    stats = VerifierStats()
    source = SpireSource(spire.client, ProcReader(), clock=SystemClock(), stats=stats,
                         settings=VerifierSettings(rescan_interval=0.1, use_pidfd=use_pidfd))
    async with SvidCache(source, settings=CacheSettings(grace_period=0.1)) as cache:
        yield cache, stats


@pytest.mark.parametrize("use_pidfd", [True, False], ids=["pidfd", "proc-recheck-only"])
async def test_reused_pid_never_carries_an_svid_across_pods(spire: Spire,
                                                           use_pidfd: bool) -> None:
    with fake_pod() as pod_a, fake_pod() as pod_b:
        await spire.set_entries([entry(A_ID, f"k8s:pod-uid:{pod_a.pod_uid}"),
                                 entry(B_ID, f"k8s:pod-uid:{pod_b.pod_uid}")])
        proc_a = spawn(pod_a)
        pid = proc_a.pid
        async with svid_cache(spire, use_pidfd=use_pidfd) as (cache, stats):
            key_a, key_b = WorkloadUid(pod_a.pod_uid), WorkloadUid(pod_b.pod_uid)
            seen_a = Recorder(cache.watch(key_a))
            await eventually(lambda: A_ID in seen_a.ids(), 10, "pod A's SVID")
            attested = cache.workloads()[key_a].attested
            assert attested is not None and attested.pid == pid
            assert attested.pod_uid == pod_a.pod_uid

            # Pod A's only process exits after its subscription started; a process of pod
            # B is given the very same PID.
            kill(proc_a)
            if use_pidfd:
                # The pidfd says so at once: A's subscription is closed before the reuse.
                await eventually(lambda: stats.process_exits == 1, 5, "the exit")
                await eventually(lambda: spire.open_x509_streams() == 0, 5,
                                 "A's subscription to close")
            proc_b = spawn_with_pid(pod_b, pid)
            try:
                if not use_pidfd:
                    # Without a pidfd nothing noticed the exit, so A's subscription still
                    # names PID `pid`. Make SPIRE re-attest it: the stream breaks, the
                    # client reconnects with the same PID, and SPIRE now sees pod B.
                    sent = spire.dev.stats.responses_sent["SubscribeToX509SVIDs"]
                    spire.dev.faults.drop_streams_now()
                    await eventually(
                        lambda: spire.dev.stats.responses_sent["SubscribeToX509SVIDs"] > sent,
                        10, "SPIRE to answer the re-attested PID")
                    await eventually(lambda: stats.pid_reuse_detected > 0
                                     or B_ID in seen_a.ids(), 5, "the answer to be handled")
                    assert B_ID not in seen_a.ids(), "pod B's SVID was served as pod A's"
                    assert stats.pid_reuse_detected == 1
                    assert stats.answers_discarded >= 1

                seen_b = Recorder(cache.watch(key_b))
                await eventually(lambda: B_ID in seen_b.ids(), 10, "pod B's SVID")
                assert cache.workloads()[key_b].attested.pid == pid  # type: ignore[union-attr]
                # Whatever SPIRE said about PID `pid` after the reuse is pod B's alone.
                await eventually(lambda: spire.open_x509_streams() == 1, 5,
                                 "only pod B's subscription")
                assert B_ID not in seen_a.ids(), "pod B's SVID was served as pod A's"
                assert A_ID not in seen_b.ids(), "pod A's SVID was served as pod B's"
                assert all(s.source == key_b for s in seen_b.states)
                assert cache.workloads()[key_a].attested.pid == pid  # type: ignore[union-attr]
                assert cache.workloads()[key_a].attested.pod_uid == pod_a.pod_uid  # type: ignore[union-attr]
                await seen_a.stop()
                await seen_b.stop()
            finally:
                kill(proc_b)
