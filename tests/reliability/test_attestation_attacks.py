"""Attestation attacks through the SDS socket: no certificate ever reaches the wrong pod.

Every test uses real processes in fake pod cgroups and dev-spire attesting from the real
/proc, with one registration entry per pod (``k8s:pod-uid``). The attacker holds an SDS
connection whose peer PID is made to name a process of the victim's pod (forced through
``ns_last_pid``) at each step: before SPIRE is asked, while SPIRE answers, between the
answer and its delivery, and while the stream is open.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest

from agent.cache.keys import WorkloadUid
from agent.cache.watch import Watch
from tests.podcgroups import FakePod, fake_pod, new_container_id
from tests.reliability.attestation_support import (
    NOBODY,
    RPC,
    AttackStack,
    Bridge,
    Probe,
    attack_stack,
    force_pid,
    hold,
    kill,
    open_fds,
    remove,
    work_directory,
)
from tests.sds_server.clients import fetch
from tests.sds_server.conftest import TD, entry
from tests.waiting import eventually

pytestmark = pytest.mark.root

A_ID = f"spiffe://{TD}/pod-a"
B_ID = f"spiffe://{TD}/pod-b"
PROXY_ID = f"spiffe://{TD}/ns/zarf/sa/registry-proxy"
Property = Callable[[str, object], None]


@pytest.fixture
def work() -> Iterator[Path]:
    path = work_directory("attest-")
    yield path
    remove(path)


def entries_for(a: FakePod, b: FakePod) -> list[dict[str, object]]:
    return [entry(A_ID, f"k8s:pod-uid:{a.pod_uid}"), entry(B_ID, f"k8s:pod-uid:{b.pod_uid}")]


async def served(stack: AttackStack, pod: FakePod, work: Path, spiffe_id: str) -> set[str]:
    """What a fresh connection from a new process of ``pod`` is served (once it holds
    ``spiffe_id``): the pod's own processes keep getting their identity."""
    own = await hold(pod, stack.sds_socket, work)
    try:
        async with Bridge(own.sock, work) as bridge:
            probe = await Probe.open(bridge.path)
            try:
                await eventually(lambda: spiffe_id in probe.ids, 15, f"{spiffe_id} to be served")
            finally:
                await probe.close()
    finally:
        own.close()
    return probe.ids


def gone(stack: AttackStack) -> int:
    """Pinned processes found gone: exited, or exited with their PID reused already."""
    return stack.stats.process_exits + stack.stats.pid_reuse_detected


def entries_of(stack: AttackStack, pod: FakePod) -> list[WorkloadUid]:
    """The cache entries of ``pod`` (the pod's, or one of its containers')."""
    return [key for key in stack.cache.workloads()
            if isinstance(key, WorkloadUid) and key.pod_uid == pod.pod_uid]


def published(watch: Watch) -> bool:
    return watch.latest() is not None


def leaked(stack: AttackStack, pod: FakePod, spiffe_id: str) -> bool:
    return any(spiffe_id in ids for key, ids in stack.served_ids().items()
               if pod.pod_uid in key)


def never_held(stack: AttackStack, pod: FakePod, spiffe_id: str) -> None:
    for key, ids in stack.served_ids().items():
        if pod.pod_uid in key:
            assert spiffe_id not in ids, f"{key} holds {spiffe_id}"


@pytest.mark.scenario("attest.pid-reuse-before-call")
async def test_pid_reused_before_the_caller_is_attested(
        work: Path, caplog: pytest.LogCaptureFixture, record_property: Property) -> None:
    """Pod B's process connects and exits; pod A's process gets its PID; then the request
    comes over B's connection. Read from /proc, the PID now names pod A."""
    caplog.set_level(logging.INFO)
    with fake_pod() as a, fake_pod() as b:
        async with attack_stack(work, entries_for(a, b)) as stack:
            held = await hold(b, stack.sds_socket, work)
            pid = held.pid
            held.kill()
            reused, tries = force_pid(a, pid)
            record_property("pid_forcing_tries", tries)
            try:
                async with Bridge(held.sock, work) as bridge:
                    probe = await Probe.open(bridge.path)
                    code, details = await probe.wait_ended()
                    await probe.close()
                assert not probe.ids, f"pod B's connection was served {probe.ids}"
                assert (code, details) == (grpc.StatusCode.UNAVAILABLE,
                                           "workload attestation failed")
                assert stack.sds.handler.stats.caller_failures == 1
                assert any(f"pid {pid}" in r.getMessage() and "exited" in r.getMessage()
                           for r in caplog.records if r.name == "spiffe_delegate.sds")
                assert stack.answers_sent() == 0, "SPIRE was asked about the reused PID"
                assert not entries_of(stack, a), "SPIRE was asked about the reused PID"
                assert await served(stack, a, work, A_ID) == {A_ID}
            finally:
                kill(reused)


@pytest.mark.scenario("attest.pid-reuse-during-call")
@pytest.mark.parametrize("use_pidfd", [True, False], ids=["pidfd", "proc-recheck-only"])
async def test_pid_reused_while_spire_is_answering(work: Path, use_pidfd: bool,
                                                  record_property: Property) -> None:
    """Pod B's process asks; SPIRE holds the call; B's process exits and pod A's takes its
    PID; SPIRE then attests the PID (now pod A's) and answers with A's SVID."""
    with fake_pod() as a, fake_pod() as b:
        async with attack_stack(work, entries_for(a, b), use_pidfd=use_pidfd) as stack:
            arrived: list[tuple[int, set[str]]] = []
            stack.client.on_answer = lambda pid, update: arrived.append(
                (pid, {s.spiffe_id for s in update.svids}))
            # Long enough for the kill and the forced fork on a loaded machine; with a
            # pidfd the call is dropped at the exit, so the wait is only paid without one.
            stack.spire.faults.set_delay(RPC, 30.0 if use_pidfd else 3.0)
            # Someone else watches pod B too (another of its proxies' streams), so B's entry
            # and its SPIRE call outlive the attacker's own stream, which ends at the exit.
            watch = stack.cache.watch(WorkloadUid(b.pod_uid))
            held = await hold(b, stack.sds_socket, work)
            pid = held.pid
            async with Bridge(held.sock, work) as bridge:
                probe = await Probe.open(bridge.path)
                await eventually(lambda: stack.open_x509_streams() == 1, 10,
                                 "SPIRE to be holding the by-PID call")
                held.kill()
                reused, tries = force_pid(a, pid)
                record_property("pid_forcing_tries", tries)
                try:
                    assert not arrived, "SPIRE answered before the PID was reused"
                    if use_pidfd:
                        # The pidfd says so at once: the call is abandoned before SPIRE
                        # attests anything.
                        await eventually(lambda: gone(stack) >= 1 or published(watch), 10,
                                         "the exit")
                        assert not published(watch), "pod B's entry published an answer"
                        await eventually(lambda: stack.open_x509_streams() == 0, 10,
                                         "the by-PID call to be cancelled")
                    else:
                        # SPIRE answers about the PID as it is now: pod A. The answer fails
                        # its re-check and is thrown away.
                        await eventually(lambda: stack.stats.answers_discarded >= 1
                                         or published(watch), 10, "the answer to be handled")
                        assert not published(watch), "pod A's SVID was published as pod B's"
                        assert (pid, {A_ID}) in arrived, arrived
                        assert stack.stats.pid_reuse_detected == 1
                    record_property("answers_discarded", stack.stats.answers_discarded)
                    stack.spire.faults.set_delay(RPC, 0)
                    assert await served(stack, a, work, A_ID) == {A_ID}
                    await asyncio.sleep(0.3)  # room for a wrong push to arrive
                    assert A_ID not in probe.ids, "pod A's SVID reached pod B's connection"
                    assert probe.responses == 0
                    assert not published(watch), "pod B's entry published something"
                    never_held(stack, b, A_ID)
                    await probe.close()
                finally:
                    watch.close()
                    kill(reused)


@pytest.mark.scenario("attest.pid-reuse-after-call")
@pytest.mark.parametrize("use_pidfd", [True, False], ids=["pidfd", "proc-recheck-only"])
async def test_pid_reused_between_the_answer_and_its_delivery(
        work: Path, use_pidfd: bool, record_property: Property) -> None:
    """SPIRE answers about pod B's process; as the answer arrives (before the verifier has
    looked at it) B's process exits and pod A's process takes the PID."""
    with fake_pod() as a, fake_pod() as b:
        async with attack_stack(work, entries_for(a, b), use_pidfd=use_pidfd) as stack:
            held = await hold(b, stack.sds_socket, work)
            pid = held.pid
            outcome: list[object] = []

            def reuse_now(answered_pid: int, update: object) -> None:
                if answered_pid != pid or outcome:
                    return
                held.kill()
                try:
                    outcome.append(force_pid(a, pid))
                except BaseException as exc:
                    outcome.append(exc)

            stack.client.on_answer = reuse_now
            async with Bridge(held.sock, work) as bridge:
                probe = await Probe.open(bridge.path)
                await eventually(lambda: bool(outcome), 15, "SPIRE's answer")
                if isinstance(outcome[0], BaseException):
                    raise outcome[0]
                reused, tries = outcome[0]  # type: ignore[misc]
                record_property("pid_forcing_tries", tries)
                try:
                    await eventually(lambda: stack.stats.answers_discarded >= 1
                                     or stack.stats.answers_delivered >= 1, 10,
                                     "the answer to be handled")
                    assert stack.stats.answers_delivered == 0, \
                        "an answer about a reused PID was delivered"
                    assert stack.stats.pid_reuse_detected == 1
                    stack.client.on_answer = None
                    assert await served(stack, a, work, A_ID) == {A_ID}
                    await asyncio.sleep(0.3)
                    assert probe.responses == 0, f"pod B's dead process was served {probe.ids}"
                    never_held(stack, b, A_ID)
                    await probe.close()
                finally:
                    kill(reused)


@pytest.mark.scenario("attest.pid-reuse-during-stream")
@pytest.mark.parametrize("use_pidfd", [True, False], ids=["pidfd", "proc-recheck-only"])
async def test_pid_reused_while_the_stream_is_open(
        work: Path, use_pidfd: bool, record_property: Property) -> None:
    """Pod A's process is being served A's SVID on an open stream; it exits (its connection
    lives on) and pod B's process takes its PID; SPIRE then re-attests the PID (the
    subscription breaks and reconnects) and rotates."""
    with fake_pod() as a, fake_pod() as b:
        async with attack_stack(work, entries_for(a, b), use_pidfd=use_pidfd) as stack:
            held = await hold(a, stack.sds_socket, work)
            pid = held.pid
            async with Bridge(held.sock, work) as bridge:
                probe = await Probe.open(bridge.path)
                await eventually(lambda: A_ID in probe.ids, 15, "pod A's SVID")
                responses = probe.responses
                held.kill()
                reused, tries = force_pid(b, pid)
                record_property("pid_forcing_tries", tries)
                try:
                    sent = stack.answers_sent()
                    stack.spire.faults.drop_streams_now()  # SPIRE re-attests on reconnect
                    await stack.spire.rotate_now()
                    if not use_pidfd:
                        await eventually(lambda: stack.answers_sent() > sent, 10,
                                         "SPIRE to answer about the reused PID")
                        await eventually(lambda: stack.stats.answers_discarded >= 1
                                         or leaked(stack, a, B_ID), 10,
                                         "that answer to be handled")
                        never_held(stack, a, B_ID)
                        assert stack.stats.pid_reuse_detected == 1
                    else:
                        await eventually(lambda: gone(stack) >= 1 or leaked(stack, a, B_ID), 10,
                                         "the exit")
                        never_held(stack, a, B_ID)
                    assert await served(stack, b, work, B_ID) == {B_ID}
                    await stack.spire.rotate_now()
                    code, _ = await probe.wait_ended()
                    assert code == grpc.StatusCode.OK
                    assert probe.ids == {A_ID}, "pod B's SVID reached pod A's connection"
                    assert probe.responses == responses, "a rotation reached the new process"
                    never_held(stack, a, B_ID)
                    await probe.close()
                finally:
                    kill(reused)


@pytest.mark.scenario("attest.cgroup-move")
async def test_process_moved_to_another_pods_cgroup(work: Path,
                                                    caplog: pytest.LogCaptureFixture) -> None:
    """Pod A's process, served A's SVID, is moved into pod B's cgroups while its stream is
    open (pod A keeps another process, so A's SVID keeps rotating)."""
    caplog.set_level(logging.INFO)
    with fake_pod() as a, fake_pod() as b:
        async with attack_stack(work, entries_for(a, b)) as stack:
            other = a.spawn(["sleep", "120"], uid=NOBODY)
            held = await hold(a, stack.sds_socket, work)
            async with Bridge(held.sock, work) as bridge:
                probe = await Probe.open(bridge.path)
                await eventually(lambda: A_ID in probe.ids, 15, "pod A's SVID")
                responses = probe.responses
                b.move(held.pid)
                await stack.spire.rotate_now(A_ID)
                await eventually(lambda: probe.ended is not None or probe.responses > responses,
                                 10, "the stream to end")
                assert probe.responses == responses, "a rotation of A reached the moved process"
                code, details = await probe.wait_ended()
                assert probe.ids == {A_ID}, "pod B's SVID reached the moved process as A's"
                assert code == grpc.StatusCode.UNAVAILABLE, (code, details)
                assert any("moved" in r.getMessage() and str(held.pid) in r.getMessage()
                           for r in caplog.records if r.name == "spiffe_delegate.sds")
                # Pod A is re-attested through its other process and keeps rotating.
                await eventually(lambda: stack.stats.answers_discarded >= 1, 10,
                                 "the moved carrier's answer to be discarded")
                assert await served(stack, a, work, A_ID) == {A_ID}
                never_held(stack, a, B_ID)
                never_held(stack, b, A_ID)
                await probe.close()
            held.close()
            kill(other)


@pytest.mark.scenario("attest.exit-before-attestation")
async def test_caller_exits_before_it_is_attested(work: Path) -> None:
    """Two ways out: the caller exits before its first request (it cannot be identified),
    or after it was identified but before SPIRE answered. Nothing is served either way, and
    nothing is left behind: no cache entry, no SPIRE stream, no descriptor, no task."""
    with fake_pod() as a, fake_pod() as b:
        async with attack_stack(work, entries_for(a, b)) as stack:
            await served(stack, a, work, A_ID)  # warm up: imports, first connections
            await eventually(lambda: not stack.cache.workloads(), 10, "the warm-up to end")
            fds, tasks = open_fds(), len(asyncio.all_tasks())

            held = await hold(b, stack.sds_socket, work)
            held.kill()
            async with Bridge(held.sock, work) as bridge:
                probe = await Probe.open(bridge.path)
                code, details = await probe.wait_ended()
                await probe.close()
            assert (code, details) == (grpc.StatusCode.UNAVAILABLE, "workload attestation failed")
            assert probe.responses == 0
            assert not stack.cache.workloads(), "a cache entry was opened for a dead caller"

            stack.spire.faults.set_delay(RPC, 0.5)
            held = await hold(b, stack.sds_socket, work)
            async with Bridge(held.sock, work) as bridge:
                probe = await Probe.open(bridge.path)
                await eventually(lambda: stack.open_x509_streams() == 1, 10,
                                 "SPIRE to be holding the by-PID call")
                held.kill()
                code, details = await probe.wait_ended()
                await probe.close()
            assert probe.responses == 0, f"an exited caller was served {probe.ids}"
            stack.spire.faults.set_delay(RPC, 0)

            await eventually(lambda: not stack.cache.workloads(), 10, "the entry to close")
            await eventually(lambda: stack.open_x509_streams() == 0, 10, "SPIRE streams")
            await eventually(lambda: stack.sds.connections == 0, 10, "relayed connections")
            await eventually(lambda: open_fds() <= fds, 10,
                             f"descriptors back to {fds} (now {open_fds()})")
            await eventually(lambda: len(asyncio.all_tasks()) <= tasks, 10, "tasks")
            assert stack.sds.handler.stats.streams_active == 0


@pytest.mark.scenario("attest.workload-names-untrusted")
async def test_workload_names_from_untrusted_callers(
        work: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Only a trusted proxy may ask for ``workload:<pod uid>``: a caller with another
    identity is refused, and one with none is served nothing; pod A is never even attested
    on their behalf."""
    caplog.set_level(logging.INFO)
    with fake_pod() as a, fake_pod() as b, fake_pod() as proxy, fake_pod() as nobody:
        entries = [*entries_for(a, b), entry(PROXY_ID, f"k8s:pod-uid:{proxy.pod_uid}")]
        async with attack_stack(work, entries, trusted=[PROXY_ID]) as stack:
            a_process = a.spawn(["sleep", "120"], uid=NOBODY)
            name = f"workload:{a.pod_uid}"
            for names in ([name], ["default", name]):
                held = await hold(b, stack.sds_socket, work)
                async with Bridge(held.sock, work) as bridge:
                    probe = await Probe.open(bridge.path, names)
                    code, details = await probe.wait_ended()
                    await probe.close()
                held.close()
                assert probe.ids == set(), f"an untrusted caller was served {probe.ids}"
                assert code == grpc.StatusCode.PERMISSION_DENIED, (code, details)
                assert name in details and "trusted proxy" in details
            assert any("not a trusted proxy" in r.getMessage() for r in caplog.records
                       if r.name == "spiffe_delegate.sds" and r.levelno >= logging.WARNING)

            # A caller SPIRE gives no identity at all: nothing, ever.
            held = await hold(nobody, stack.sds_socket, work)
            async with Bridge(held.sock, work) as bridge:
                probe = await Probe.open(bridge.path, [name])
                key = WorkloadUid(nobody.pod_uid, nobody.container_id)
                await eventually(lambda: key in stack.cache.workloads()
                                 and stack.cache.workloads()[key].version > 0, 10,
                                 "the unregistered caller's attestation")
                await asyncio.sleep(0.3)
                assert probe.responses == 0 and probe.ended is None
                await probe.close()
            held.close()
            assert not entries_of(stack, a), "pod A was attested for an untrusted caller"

            # The trusted proxy gets pod A's SVID by the same name (the name is right).
            held = await hold(proxy, stack.sds_socket, work)
            async with Bridge(held.sock, work) as bridge:
                probe = await Probe.open(bridge.path, [name])
                await eventually(lambda: A_ID in probe.ids, 15, "pod A's SVID for the proxy")
                await probe.close()
            held.close()
            kill(a_process)


UNSHARE = shutil.which("unshare")


@pytest.mark.scenario("attest.other-pid-namespace")
async def test_caller_in_a_child_pid_namespace_is_attested_as_itself(work: Path) -> None:
    """The kernel translates a caller's PID into the agent's namespace: a caller that is
    PID 1 of its own namespace is attested as the process it is on the host."""
    if UNSHARE is None:
        pytest.skip("unshare (util-linux) is needed to start a process in a new PID namespace")
    with fake_pod() as a, fake_pod() as b:
        async with attack_stack(work, entries_for(a, b)) as stack:
            prefix = [UNSHARE, "--pid", "--fork", "--kill-child", "setpriv",
                      f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", "--"]
            try:
                held = await hold(b, stack.sds_socket, work, argv_prefix=prefix, uid=None)
            except RuntimeError as exc:
                pytest.skip(f"the kernel refused a new PID namespace here: {exc}")
            assert held.reported_pid == 1, "the caller is not in a PID namespace of its own"
            host_pid = child_of(held.pid)
            async with Bridge(held.sock, work) as bridge:
                probe = await Probe.open(bridge.path)
                await eventually(lambda: B_ID in probe.ids, 15, "pod B's SVID")
                calls = stack.sds.handler.open_calls()
                assert [(c.pid, c.pod_uid) for c in calls] == [(host_pid, b.pod_uid)]
                await probe.close()
            held.close()
            assert probe.ids == {B_ID}


def start_namespaced_agent(unshare: str, admin: Path, sds: Path,
                           log: Path) -> subprocess.Popen[bytes]:
    with log.open("wb") as out:
        return subprocess.Popen(
            [unshare, "--pid", "--fork", "--mount-proc", "--kill-child",
             sys.executable, "-m", "agent", "run", "--spire-admin-socket", str(admin),
             "--sds-socket", str(sds), "--trust-domain", TD, "--health-address", "off",
             "--metrics-address", "off", "--log-level", "info"],
            stdout=out, stderr=subprocess.STDOUT, cwd=Path(__file__).parents[2])


def child_of(pid: int) -> int:
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    assert len(children) == 1, children
    return int(children[0])


@pytest.mark.scenario("attest.other-pid-namespace")
async def test_caller_the_agent_cannot_see_is_refused(work: Path) -> None:
    """The agent runs in a PID namespace of its own (with its own /proc) and the caller
    outside it: SO_PEERCRED says PID 0. Refused, with the reason in the agent's log."""
    if UNSHARE is None:
        pytest.skip("unshare (util-linux) is needed to start a process in a new PID namespace")
    with fake_pod() as a, fake_pod() as b:
        async with attack_stack(work, entries_for(a, b)):
            sds, log = work / "inner-sds.sock", work / "agent.log"
            agent = start_namespaced_agent(UNSHARE, work / "admin.sock", sds, log)
            try:
                await eventually(lambda: sds.exists() or agent.poll() is not None, 30,
                                 "the namespaced agent's SDS socket")
                if agent.poll() is not None:
                    text = log.read_text()
                    if text.startswith("unshare"):
                        pytest.skip(f"the kernel refused a new PID namespace here: {text}")
                    raise AssertionError(f"the agent exited: {text}")
                held = await hold(b, sds, work)
                async with Bridge(held.sock, work) as bridge:
                    probe = await Probe.open(bridge.path)
                    code, details = await probe.wait_ended()
                    await probe.close()
                held.close()
                assert probe.responses == 0
                assert (code, details) == (grpc.StatusCode.UNAVAILABLE,
                                           "workload attestation failed")
                await eventually(lambda: "PID namespace this agent cannot see" in log.read_text(),
                                 10, "the reason in the agent's log")
            finally:
                kill(agent)


async def test_two_containers_of_one_pod_are_served_their_own_identities(work: Path) -> None:
    """Entries may select by container (SPIRE's ``k8s:container-name``; dev-spire also has
    ``k8s:container-id``): each container's caller gets its own SVID, never its sibling's,
    even while the sibling's stream is open."""
    with fake_pod() as pod:
        first, second = pod.container_id, new_container_id()
        one, two = f"spiffe://{TD}/one", f"spiffe://{TD}/two"
        entries = [entry(one, f"k8s:pod-uid:{pod.pod_uid}", f"k8s:container-id:{first}"),
                   entry(two, f"k8s:pod-uid:{pod.pod_uid}", f"k8s:container-id:{second}")]
        async with attack_stack(work, entries) as stack:
            held_one = await hold(pod, stack.sds_socket, work, container_id=first)
            async with Bridge(held_one.sock, work) as bridge_one:
                probe_one = await Probe.open(bridge_one.path)
                await eventually(lambda: one in probe_one.ids, 15, "the first container's SVID")
                held_two = await hold(pod, stack.sds_socket, work, container_id=second)
                async with Bridge(held_two.sock, work) as bridge_two:
                    probe_two = await Probe.open(bridge_two.path)
                    await eventually(lambda: bool(probe_two.ids), 15, "an SVID for the second")
                    await probe_two.close()
                held_two.close()
                await probe_one.close()
            held_one.close()
            assert probe_two.ids == {two}, "a container was served its sibling's SVID"
            assert probe_one.ids == {one}


@pytest.mark.scenario("attest.exit-before-attestation")
async def test_fetch_from_a_caller_that_exits_while_it_waits(work: Path) -> None:
    """FetchSecrets waits for its caller's first SVID; the caller exits meanwhile, while
    its pod lives on (so the pod's SVID does arrive): the answer is not handed to the
    connection the dead process left behind."""
    with fake_pod() as a, fake_pod() as b:
        async with attack_stack(work, entries_for(a, b)) as stack:
            other = b.spawn(["sleep", "120"], uid=NOBODY)
            stack.spire.faults.set_delay(RPC, 1.0)
            held = await hold(b, stack.sds_socket, work)
            async with Bridge(held.sock, work) as bridge:
                pending = asyncio.ensure_future(fetch(bridge.path, ["default"]))
                await eventually(lambda: stack.open_x509_streams() == 1, 10,
                                 "SPIRE to be holding the by-PID call")
                held.kill()
                with pytest.raises(grpc.aio.AioRpcError) as refused:
                    await asyncio.wait_for(pending, 15)
            assert refused.value.code() == grpc.StatusCode.UNAVAILABLE, refused.value
            assert "exited" in (refused.value.details() or "")
            stack.spire.faults.set_delay(RPC, 0)
            # The pod itself is still served, through its other process.
            assert await served(stack, b, work, B_ID) == {B_ID}
            kill(other)
