"""A pod no registration entry matches: an empty state and one log line, not an error storm."""

from __future__ import annotations

import asyncio
import logging

import pytest

from agent.attest import ProcReader
from agent.attest.verifier import VerifierSettings, VerifierStats
from agent.cache import CacheSettings, KeyMode, SpireSource, SvidCache, WorkloadUid
from agent.clock import SystemClock
from tests.devspire.conftest import TD, entry
from tests.podcgroups import fake_pod
from tests.waiting import eventually

from .conftest import Spire, spawn

pytestmark = pytest.mark.root

WEB = f"spiffe://{TD}/web"
RPC = "SubscribeToX509SVIDs"


@pytest.mark.parametrize("mode", [KeyMode.WORKLOAD, KeyMode.IDENTITY], ids=lambda m: m.value)
async def test_unmatched_pod_waits_on_an_empty_state_with_one_log_line(
        spire: Spire, mode: KeyMode, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    with fake_pod() as pod:
        await spire.set_entries([entry(f"spiffe://{TD}/elsewhere", "k8s:ns:elsewhere")])
        proc = spawn(pod)
        stats = VerifierStats()
        source = SpireSource(spire.client, ProcReader(), clock=SystemClock(), stats=stats,
                             settings=VerifierSettings(rescan_interval=0.1))
        async with SvidCache(source, settings=CacheSettings(key_mode=mode,
                                                            grace_period=0.1)) as cache:
            watch = cache.watch(WorkloadUid(pod.pod_uid))
            state = await asyncio.wait_for(watch.next(), 10)
            assert state.empty, "an unmatched pod gets an empty state, not an error"

            # SPIRE keeps answering (a forced re-send after a CA rotation, then a fresh
            # answer after the stream breaks): the watcher sees no new state and the log
            # gets no new line.
            await spire.dev.rotate_ca_now()
            await eventually(lambda: stats.answers_delivered >= 2, 10, "the re-sent answer")
            spire.dev.faults.drop_streams_now()
            await eventually(lambda: stats.answers_delivered >= 3, 10, "the fresh answer")
            latest = watch.latest()
            assert latest is not None and latest.empty and latest.version == state.version

            ours = [r for r in caplog.records if r.name.startswith("spiffe_delegate.cache")
                    and r.levelno >= logging.WARNING]
            assert len(ours) == 1, [r.getMessage() for r in ours]
            line = ours[0].getMessage()
            assert pod.pod_uid in line and f"PID {proc.pid}" in line
            assert "matched no registration entry" in line
            assert not [r for r in caplog.records if r.name.startswith("spiffe_delegate.attest")
                        and r.levelno >= logging.WARNING]

            # An entry appears: the same watch is served, with no new subscription asked.
            await spire.set_entries([entry(WEB, f"k8s:pod-uid:{pod.pod_uid}")])
            served = await asyncio.wait_for(watch.next(state.version), 10)
            assert served.spiffe_ids == (WEB,)
            watch.close()
