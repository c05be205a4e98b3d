"""A live process SPIRE cannot attest: the client retries it with back-off, the verifier
moves on to another process of the pod as soon as there is one, logs that once per episode,
and leaves nothing behind."""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from agent.attest import ProcReader
from agent.attest.verifier import PodTarget, VerifierSettings, VerifierStats, X509Verifier
from agent.devspire import DevSpire, DevSpireSettings
from agent.spire import DelegatedIdentityClient
from tests.devspire.conftest import DELEGATE, TD, delegate_entry, entry, write_json
from tests.podcgroups import fake_pod, new_container_id
from tests.waiting import eventually

from .conftest import FAST, kill, spawn

pytestmark = pytest.mark.root

WEB = f"spiffe://{TD}/web"
RPC = "SubscribeToX509SVIDs"


class ProcView:
    """The /proc dev-spire sees: the real entries of the PIDs it is shown, and for a hidden
    PID a process in a container no pod claims and whose status cannot be read; SPIRE's
    unix and k8s attestors both fail on it, so SPIRE answers UNAVAILABLE "workload
    attestation failed" for a process that is alive."""

    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir()
        self.show(os.getpid())  # the delegate: the test process

    def show(self, pid: int) -> None:
        (self.root / str(pid)).symlink_to(f"/proc/{pid}")

    def unattestable(self, pid: int) -> None:
        directory = self.root / str(pid)
        directory.mkdir()
        (directory / "cgroup").write_text(f"0::/system.slice/docker-{new_container_id()}.scope\n")


async def open_spire(work: Path, proc_root: Path) -> tuple[DevSpire, DelegatedIdentityClient]:
    entries = work / "entries.json"
    write_json(entries, {"entries": [delegate_entry(os.getuid())]})
    settings = DevSpireSettings(
        socket_path=str(work / "admin.sock"), trust_domain=TD, entries_path=str(entries),
        authorized_delegates=(DELEGATE,), reload_interval=0.05, proc_root=str(proc_root))
    dev = DevSpire(settings)
    await dev.start()
    return dev, DelegatedIdentityClient(settings.socket_path, backoff=FAST)


@pytest.fixture
async def unattestable_spire(work_dir: Path) -> AsyncIterator[tuple[DevSpire,
                                                                   DelegatedIdentityClient,
                                                                   ProcView]]:
    view = ProcView(work_dir / "proc")
    dev, client = await open_spire(work_dir, view.root)
    try:
        yield dev, client, view
    finally:
        await client.close()
        await dev.stop(grace=0)


async def test_a_pid_spire_cannot_attest_gives_way_to_another_process(
        unattestable_spire: tuple[DevSpire, DelegatedIdentityClient, ProcView], work_dir: Path,
        caplog: pytest.LogCaptureFixture) -> None:
    dev, client, view = unattestable_spire
    caplog.set_level(logging.DEBUG)
    with fake_pod() as pod:
        entries = work_dir / "entries.json"
        write_json(entries, {"entries": [delegate_entry(os.getuid()),
                                         entry(WEB, f"k8s:pod-uid:{pod.pod_uid}")]})
        dev.reload()
        stuck = spawn(pod)
        view.unattestable(stuck.pid)
        bundles = client.subscribe_x509_bundles()
        await asyncio.wait_for(anext(bundles), 10)  # the connection (and dev-spire's pidfd
        await bundles.aclose()                       # for it) exists before the count
        pidfds = open_pidfds()
        stats = VerifierStats()
        verifier = X509Verifier(client, ProcReader(), PodTarget(pod.pod_uid), stats=stats,
                                settings=VerifierSettings(rescan_interval=0.05,
                                                          answer_timeout=0.3))
        first = asyncio.ensure_future(verifier.__anext__())
        try:
            # Alone in its pod, the process keeps its one subscription: SPIRE refuses it
            # again and again (the client backs off), nothing is churned or delivered.
            await eventually(lambda: dev.stats.errors_returned[RPC] >= 3, 10,
                             "SPIRE to refuse the PID a few times")
            await asyncio.sleep(0.7)  # past two answer timeouts
            assert stats.subscriptions == 1 and not first.done()
            assert dev.stats.open_streams[RPC] <= 1

            # Another process of the pod appears: it is tried within an answer timeout.
            other = spawn(pod)
            view.show(other.pid)
            update = await asyncio.wait_for(first, 10)
            assert update.process.pid == other.pid and update.spiffe_ids == (WEB,)
            assert verifier.current is not None and verifier.current.pid == other.pid
            await eventually(lambda: dev.stats.open_streams[RPC] == 1, 5,
                             "the unanswered subscription to be closed")
            warnings = [r.getMessage() for r in caplog.records
                        if r.name == "spiffe_delegate.attest" and r.levelno >= logging.WARNING]
            assert len(warnings) == 1, warnings
            assert f"PID {stuck.pid}" in warnings[0] and "no answer from SPIRE" in warnings[0]

            # The stuck process is still the pod's oldest: when the carrier goes, it is
            # tried again (a new episode), and the verifier carries on.
            refused = dev.stats.errors_returned[RPC]
            kill(other)
            await eventually(lambda: stats.process_exits == 1, 5, "the carrier's exit")
            # SPIRE refuses it again: its subscription lives only an instant per retry, so
            # the refusals are counted rather than open streams caught at the right moment.
            await eventually(lambda: dev.stats.errors_returned[RPC] > refused, 5,
                             "a subscription for the stuck process again")
        finally:
            first.cancel()
            await verifier.aclose()
            kill(stuck)
        await eventually(lambda: dev.stats.open_streams[RPC] == 0, 5, "no SPIRE stream left")
        await eventually(lambda: open_pidfds() <= pidfds, 5, "no pidfd left")


def open_pidfds() -> int:
    """pidfds this process holds (what a verifier pins processes with)."""
    count = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            count += "pidfd" in os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
    return count
