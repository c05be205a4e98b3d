"""X509Verifier on bare real processes with a scripted SPIRE client (no root needed)."""

from __future__ import annotations

import asyncio
import logging
import os
import subprocess
from collections.abc import AsyncIterator, Iterator, Sequence
from typing import Any

import pytest

from agent.attest import ProcessGone, ProcReader
from agent.attest.verifier import (
    PodTarget,
    ProcessTarget,
    VerifierSettings,
    X509Verifier,
)
from agent.clock import ManualClock
from agent.errors import SpirePermissionDenied
from agent.model import Selector, X509SvidUpdate
from tests.podcgroups import fake_pod
from tests.waiting import eventually

from .conftest import kill, spawn

EMPTY = X509SvidUpdate(svids=())


class Subscription:
    """One scripted SubscribeToX509SVIDs stream."""

    def __init__(self, pid: int | None) -> None:
        self.pid = pid
        self.queue: asyncio.Queue[X509SvidUpdate | BaseException] = asyncio.Queue()
        self.sent = 0
        self.closed = False

    async def run(self) -> AsyncIterator[X509SvidUpdate]:
        try:
            while True:
                item = await self.queue.get()
                if isinstance(item, BaseException):
                    raise item
                self.sent += 1
                yield item
        finally:
            self.closed = True


class ScriptedClient:
    """Every subscription starts with ``first`` queued (like SPIRE's initial answer)."""

    def __init__(self, *first: X509SvidUpdate | BaseException) -> None:
        self.first = first
        self.subscriptions: list[Subscription] = []

    def subscribe_x509_svids(self, *, pid: int | None = None,
                             selectors: Sequence[Selector] | None = None
                             ) -> AsyncIterator[X509SvidUpdate]:
        sub = Subscription(pid)
        for item in self.first:
            sub.queue.put_nowait(item)
        self.subscriptions.append(sub)
        return sub.run()


@pytest.fixture
def sleeper() -> Iterator[subprocess.Popen[Any]]:
    proc = subprocess.Popen(["sleep", "60"])
    yield proc
    kill(proc)


async def test_exit_closes_the_subscription_at_once(sleeper: subprocess.Popen[Any]) -> None:
    client = ScriptedClient(EMPTY)
    verifier = X509Verifier(client, ProcReader(), ProcessTarget(sleeper.pid))
    got = await asyncio.wait_for(anext(verifier), 5)
    assert got.process.pid == sleeper.pid and got.update == EMPTY
    (sub,) = client.subscriptions
    assert sub.pid == sleeper.pid and not sub.closed

    kill(sleeper)  # SPIRE says nothing more; only the pidfd can tell
    await asyncio.wait_for(verifier.wait_orphaned(), 5)
    await eventually(lambda: sub.closed, 5, "the subscription to close")
    with pytest.raises(ProcessGone):
        await asyncio.wait_for(anext(verifier), 5)
    assert verifier.stats.process_exits == 1
    assert verifier.pid_reuse_detected == 0
    assert len(client.subscriptions) == 1, "a bare process is never attested again"
    await verifier.aclose()


async def test_an_answer_is_checked_again_right_before_delivery(
        sleeper: subprocess.Popen[Any]) -> None:
    # No pidfd: the only thing standing between a held answer and its consumer is the
    # check at delivery.
    client = ScriptedClient(EMPTY)
    verifier = X509Verifier(client, ProcReader(), ProcessTarget(sleeper.pid),
                            settings=VerifierSettings(use_pidfd=False))
    verifier._start()
    await eventually(lambda: bool(client.subscriptions) and client.subscriptions[0].sent == 1,
                     5, "SPIRE's answer to be read")
    kill(sleeper)  # the answer was verified on receipt, then the process went
    with pytest.raises(ProcessGone):
        await asyncio.wait_for(anext(verifier), 5)
    assert verifier.stats.answers_discarded == 1
    assert verifier.stats.answers_delivered == 0
    await eventually(lambda: client.subscriptions[0].closed, 5)
    await verifier.aclose()


async def test_caller_pidfd_is_used_and_left_open(sleeper: subprocess.Popen[Any]) -> None:
    pidfd = os.pidfd_open(sleeper.pid)
    try:
        client = ScriptedClient(EMPTY)
        verifier = X509Verifier(client, ProcReader(),
                                ProcessTarget(sleeper.pid, pidfd=pidfd))
        assert (await asyncio.wait_for(anext(verifier), 5)).process.pid == sleeper.pid
        await verifier.aclose()
        assert client.subscriptions[0].closed
        os.fstat(pidfd)  # still ours, still open
    finally:
        os.close(pidfd)


async def test_wrong_start_time_is_a_gone_process(sleeper: subprocess.Popen[Any]) -> None:
    start_time = ProcReader().identity(sleeper.pid).start_time
    client = ScriptedClient(EMPTY)
    verifier = X509Verifier(client, ProcReader(),
                            ProcessTarget(sleeper.pid, start_time=start_time + 1))
    with pytest.raises(ProcessGone):
        await asyncio.wait_for(anext(verifier), 5)
    assert client.subscriptions == [], "SPIRE is never asked about another process"
    await verifier.aclose()


async def test_refusal_is_logged_once_and_retried(sleeper: subprocess.Popen[Any],
                                                  caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.ERROR, "spiffe_delegate.attest")
    clock = ManualClock()
    denied = SpirePermissionDenied("denied SubscribeToX509SVIDs: no identity issued")
    client = ScriptedClient(denied)
    verifier = X509Verifier(client, ProcReader(), ProcessTarget(sleeper.pid), clock=clock,
                            settings=VerifierSettings(retry_interval=5))
    pending = asyncio.ensure_future(anext(verifier))
    for attempt in range(1, 4):
        def refused_and_waiting(attempt: int = attempt) -> bool:
            return len(client.subscriptions) == attempt and clock.sleepers == 1
        await eventually(refused_and_waiting, 5, f"attempt {attempt}")
        clock.advance(5)
    assert len([r for r in caplog.records if "refused" in r.getMessage()]) == 1
    client.first = (EMPTY,)
    clock.advance(5)
    assert (await asyncio.wait_for(pending, 5)).update == EMPTY
    await verifier.aclose()


async def test_pod_target_rejects_a_bad_uid() -> None:
    with pytest.raises(ValueError, match="not a pod UID"):
        PodTarget("not-a-uid")


@pytest.mark.root
async def test_pod_is_attested_again_through_another_of_its_processes() -> None:
    with fake_pod() as pod:
        sandbox = spawn(pod)  # started first, like the pause container
        app_container = pod.add_container()
        app = spawn(pod, container_id=app_container)
        helper = spawn(pod, container_id=app_container)
        client = ScriptedClient(EMPTY)
        verifier = X509Verifier(client, ProcReader(), PodTarget(pod.pod_uid),
                                settings=VerifierSettings(rescan_interval=0.05))
        first = await asyncio.wait_for(anext(verifier), 5)
        assert first.process.pid == app.pid, "the app container's oldest process, not the sandbox"
        assert first.process.pod_uid == pod.pod_uid
        assert first.process.container_id == app_container

        for gone, successor in ((app, helper), (helper, sandbox)):
            kill(gone)
            answer = await asyncio.wait_for(anext(verifier), 5)
            assert answer.process.pid == successor.pid
            assert answer.process.pod_uid == pod.pod_uid
        assert [sub.pid for sub in client.subscriptions] == [app.pid, helper.pid, sandbox.pid]
        assert all(sub.closed for sub in client.subscriptions[:-1])
        assert verifier.stats.process_exits == 2 and not verifier.orphaned

        kill(sandbox)
        await asyncio.wait_for(verifier.wait_orphaned(), 5)
        late = spawn(pod)  # a restarted container: the pod is served again
        answer = await asyncio.wait_for(anext(verifier), 5)
        assert answer.process.pid == late.pid and not verifier.orphaned
        await verifier.aclose()
        assert all(sub.closed for sub in client.subscriptions)


@pytest.mark.root
async def test_pod_caller_pinned_at_accept_time_is_attested_first() -> None:
    with fake_pod() as pod:
        older = spawn(pod)
        caller = spawn(pod)
        pidfd = os.pidfd_open(caller.pid)  # what SO_PEERPIDFD hands over at accept
        try:
            client = ScriptedClient(EMPTY)
            # Only the pidfd, as a cache user holding PeerCredentials may pass it.
            verifier = X509Verifier(client, ProcReader(), PodTarget(pod.pod_uid, pidfd=pidfd))
            assert (await asyncio.wait_for(anext(verifier), 5)).process.pid == caller.pid
            kill(caller)
            assert (await asyncio.wait_for(anext(verifier), 5)).process.pid == older.pid
            await verifier.aclose()
            os.fstat(pidfd)
        finally:
            os.close(pidfd)
