"""Endurance: many rotations across many pods with a trusted-proxy Envoy attached.

The agent runs as a real subprocess (``python -m agent run``), so its RSS, descriptors and
threads are its own; dev-spire runs on the test's loop and rotates every SVID at once, on
demand. Each pod is a sleeping process in real pod cgroups with its own registration entry
(``k8s:pod-uid``, a SPIFFE ID per pod). One Envoy, a trusted proxy, asks for every pod's
SVID as ``workload:<pod uid>`` plus its own ``default`` and ``ALL``, and uses all of them
on every request (``endurance_support.proxy_config``); a request loop runs through it for
the whole test.

A round rotates every SVID (pods, proxy and the agent's own) and ends when Envoy's /certs
holds every pod's new serial (and the proxy's). After the warm-up rounds and again after
the measured ones, the agent is sampled once it is idle (no push, ACK or stream change
and the same counts in two samples in a row): RSS, descriptors and threads from /proc,
asyncio tasks from its ``spiffe_delegate_asyncio_tasks`` gauge. Transients are kept out
rather than allowed for: descriptors are counted before the scrape connects, and the
scrape's own task is in both task counts. Threads may grow only as far as asyncio's
default executor does (bounded, ``EXECUTOR_THREADS``). Promised: RSS growth under 5 MB,
no descriptor or task growth, no thread growth beyond that bound, zero failed requests,
zero NACKs or rejected updates. A planted leak (a task, a descriptor and 256 KiB per
rotation) must trip all three checks.

Besides rotations, every round restarts containers (a pod's process killed and a new one
started: the pod is attested again through a new PID) and opens and closes short SDS
streams, so per-attestation and per-stream leaks show too.

The quick version (CI) is the same code with fewer pods and rounds; the soak
(``--soak``: 100 pods x 100 measured rounds = 10,000 pod rotations) records its numbers
in docs/reliability.md through ``record_property``. To find a leak it reports, run it with
``ENDURANCE_TRACE=/tmp/trace``: the agent then runs under tracemalloc and prints what was
allocated after the warm-up and is still alive, and which object types grew
(``ENDURANCE_TRACE_FRAMES=0``: object counts and pymalloc blocks only, at full speed).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from agent.demo.chain import free_port
from agent.devspire import DevSpire, DevSpireSettings
from agent.malloc import limit_malloc_arenas
from agent.podsim import FakePod, PodCgroupsUnavailable, create_pod
from tests.envoyproc import EnvoyProcess, envoy_binary
from tests.reliability.endurance_support import (
    PLANTED_LEAK,
    AgentProcess,
    PodIdentity,
    ProcSample,
    RequestLoop,
    churn_streams,
    proxy_config,
    setpriv_wrapper,
    sum_samples,
    tracing_prelude,
)
from tests.sds_server.conftest import DELEGATE, PROXY_ID, TD, entry, short_dir, write_entries
from tests.waiting import eventually

# The uid the proxy Envoy runs as; its entry is `unix:uid:<this>`. Pods run as root, so
# neither matches the other's entry (nor the agent's, which also pins the Python binary).
PROXY_UID = 2191
RecordProperty = Callable[[str, object], None]
# The verifier scans /proc for a pod's processes in asyncio's default executor, which starts
# threads on demand up to this bound and keeps them: container restarts that overlap may
# add up to this many threads after the warm-up. Anything beyond is a leak.
EXECUTOR_THREADS = min(32, (os.cpu_count() or 1) + 4)


@dataclass(frozen=True)
class Plan:
    pods: int
    warmup_rounds: int
    rounds: int
    rss_limit_mb: float
    round_timeout: float
    restarts_per_round: int = 0  # containers restarted (process killed, a new one) a round
    streams_per_round: int = 0  # short SDS streams opened and closed a round
    prelude: str | None = None  # run in the agent's process first (a planted leak)


LEAKY = Plan(pods=5, warmup_rounds=2, rounds=6, rss_limit_mb=5.0, round_timeout=60.0,
             prelude=PLANTED_LEAK)
QUICK = Plan(pods=20, warmup_rounds=3, rounds=20, rss_limit_mb=5.0, round_timeout=60.0,
             restarts_per_round=1, streams_per_round=3)
SOAK = Plan(pods=100, warmup_rounds=10, rounds=100, rss_limit_mb=5.0, round_timeout=120.0,
            restarts_per_round=2, streams_per_round=5)


def needs_root() -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root (pods are real cgroups, Envoy runs under another uid)")
    if shutil.which("setpriv") is None:
        pytest.skip("needs setpriv (util-linux) to run Envoy under another uid")


@contextlib.contextmanager
def pods_running(count: int) -> Iterator[list[tuple[FakePod, PodIdentity]]]:
    """``count`` pods, each with one sleeping process; closed (killed, cgroups gone) on exit."""
    made: list[tuple[FakePod, PodIdentity]] = []
    try:
        for index in range(count):
            try:
                pod = create_pod()
            except PodCgroupsUnavailable as err:
                pytest.skip(str(err))
            made.append((pod, PodIdentity(index, pod.pod_uid,
                                          f"spiffe://{TD}/ns/endurance/sa/pod-{index:03d}")))
            pod.spawn(["sleep", "86400"])
        yield made
    finally:
        errors = []
        for pod, _ in made:
            try:
                pod.close()
            except RuntimeError as err:
                errors.append(str(err))
        assert not errors, errors


def current_serials(spire: DevSpire) -> dict[str, int]:
    """Each entry's SPIFFE ID -> the serial of the SVID dev-spire serves for it now."""
    return {e.spiffe_id: spire.cache.svid_for(e).serial for e in spire.cache.entries}


async def steady_sample(agent: AgentProcess, timeout: float) -> ProcSample:  # noqa: ASYNC109
    """A sample taken once the agent is idle: two samples 0.2 s apart agree on
    descriptors, threads and tasks, and no push or ACK happened between them (a connection
    being closed, a task finishing, an ACK on its way are waited out)."""
    def take() -> tuple[ProcSample, tuple[float, ...]]:
        sample = agent.sample()
        values = agent.metrics()
        activity = tuple(sum_samples(values, name) for name in (
            "spiffe_delegate_sds_pushes_total", "spiffe_delegate_sds_acks_total",
            "spiffe_delegate_sds_nacks_total", "spiffe_delegate_sds_streams_open"))
        return sample, (sample.fds, sample.threads, sample.tasks, *activity)

    _, previous = await asyncio.to_thread(take)
    deadline = time.monotonic() + timeout
    while True:
        await asyncio.sleep(0.2)
        sample, current = await asyncio.to_thread(take)
        if current == previous:
            return sample
        if time.monotonic() > deadline:
            raise AssertionError(f"the agent did not settle in {timeout}s: {previous} -> "
                                 f"{current}" + agent.log_tail())
        previous = current


async def run_endurance(plan: Plan, record_property: RecordProperty) -> None:
    needs_root()
    binary = envoy_binary()
    # dev-spire logs every mint at INFO: thousands of lines the test would keep in memory.
    devspire_log = logging.getLogger("spiffe_delegate.devspire")
    old_level = devspire_log.level
    devspire_log.setLevel(logging.WARNING)
    work = short_dir("endure-")
    envoy_dir = work / "envoy"  # under /tmp, traversable by the proxy's uid
    started = time.monotonic()
    try:
        with pods_running(plan.pods) as pods:
            await _run(plan, record_property, work, envoy_dir, binary, pods, started)
    finally:
        devspire_log.setLevel(old_level)
        shutil.rmtree(work, ignore_errors=True)


def restart_container(pod: FakePod) -> None:
    """The pod's process is killed and a new one started in the same container, as a
    kubelet restarting a container: the agent must attest the pod again through the new
    PID (the rotation that follows reaches Envoy only through a new subscription)."""
    old = pod.processes.pop()
    old.kill()
    old.wait(10)
    pod.spawn(["sleep", "86400"])


async def _run(plan: Plan, record_property: RecordProperty, work: Path, envoy_dir: Path,
               binary: Path, pods: list[tuple[FakePod, PodIdentity]], started: float) -> None:
    identities = [identity for _, identity in pods]
    entries_path = work / "entries.json"
    write_entries(entries_path, [entry(PROXY_ID, f"unix:uid:{PROXY_UID}"),
                                 *(entry(p.spiffe_id, f"k8s:pod-uid:{p.pod_uid}")
                                   for p in identities)])
    spire = DevSpire(DevSpireSettings(socket_path=str(work / "admin.sock"), trust_domain=TD,
                                      entries_path=str(entries_path),
                                      authorized_delegates=(DELEGATE,), reload_interval=1.0))
    await spire.start()
    # ENDURANCE_TRACE=/some/prefix: run the agent under tracemalloc and dump what grew
    # between the baseline and the end (endurance_support.tracing_prelude).
    trace = os.environ.get("ENDURANCE_TRACE")
    prelude = plan.prelude
    if trace:
        frames = int(os.environ.get("ENDURANCE_TRACE_FRAMES", "25"))  # 0: objects only
        prelude = (prelude or "") + tracing_prelude(Path(trace), frames)
    agent = AgentProcess(
        ["--spire-admin-socket", str(work / "admin.sock"), "--sds-socket",
         str(work / "sds.sock"), "--trust-domain", TD, "--trusted-proxy", PROXY_ID,
         "--health-address", "off", "--shutdown-grace", "2s", "--log-level", "info"],
        log_path=work / "agent.log", metrics_port=free_port(),
        prelude=prelude)
    front_port, pods_port = free_port(), free_port()
    os.makedirs(envoy_dir, mode=0o755, exist_ok=True)
    os.chown(envoy_dir, PROXY_UID, PROXY_UID)
    envoy = EnvoyProcess(
        proxy_config(sds_socket=work / "sds.sock", front_port=front_port, pods_port=pods_port,
                     proxy_id=PROXY_ID, pods=identities),
        envoy_dir, binary=setpriv_wrapper(envoy_dir, binary, PROXY_UID), log_level="warning")
    loop = RequestLoop(front_port, identities)
    try:
        agent.start()
        await eventually(lambda: agent.alive_and((work / "sds.sock").exists()), timeout=60,
                         what="the agent's SDS socket")
        try:
            await envoy.astart(wait_ready=True, timeout=plan.round_timeout)
        except AssertionError as exc:  # say what the agent was doing meanwhile
            agent.check_alive()
            raise AssertionError(f"{exc}\n--- the agent (still running) ---"
                                 f"{agent.log_tail()}") from None
        await _envoy_holds(envoy, spire, identities, plan.round_timeout)
        loop.start()
        await eventually(lambda: loop.ok >= len(identities) or loop.failed > 0, timeout=60,
                         what="the first requests through Envoy")
        assert loop.failed == 0, loop.first_failures

        rotations = restarts = streams = 0
        baseline: ProcSample | None = None
        rss_max = 0
        rss_mid = 0  # after half the measured rounds: growth that keeps on is a trend
        total = plan.warmup_rounds + plan.rounds
        for number in range(1, total + 1):
            for _ in range(plan.restarts_per_round):
                await asyncio.to_thread(restart_container, pods[restarts % len(pods)][0])
                restarts += 1
            await churn_streams(work / "sds.sock", plan.streams_per_round)
            streams += plan.streams_per_round
            await spire.rotate_now()
            await _envoy_holds(envoy, spire, identities, plan.round_timeout)
            if number > plan.warmup_rounds:
                rotations += len(identities)
            rss = (await asyncio.to_thread(agent.sample)).rss_kb
            rss_max = max(rss_max, rss)
            if number == plan.warmup_rounds + plan.rounds // 2:
                rss_mid = rss
            if number == plan.warmup_rounds:
                baseline = await steady_sample(agent, plan.round_timeout)
                if trace:
                    await asyncio.to_thread(agent.dump, Path(f"{trace}.1"))
        assert baseline is not None
        final = await steady_sample(agent, plan.round_timeout)
        if trace:
            print(await asyncio.to_thread(agent.dump, Path(f"{trace}.2")))
        loop.stop()
        requests = loop.requests  # all of them, warm-up included, as the failures
        values = await asyncio.to_thread(agent.metrics)
        nacks = sum_samples(values, "spiffe_delegate_sds_nacks_total")
        rejected = await asyncio.to_thread(_rejected_updates, envoy)
        duration = time.monotonic() - started
        growth_mb = (final.rss_kb - baseline.rss_kb) / 1024
        for name, value in [
                ("pods", len(identities)), ("rounds", plan.rounds),
                ("warmup_rounds", plan.warmup_rounds), ("rotations", rotations),
                ("container_restarts", restarts), ("sds_streams_churned", streams),
                ("rss_start_mb", round(baseline.rss_mb, 1)),
                ("rss_mid_mb", round(rss_mid / 1024, 1)),
                ("rss_end_mb", round(final.rss_mb, 1)),
                ("rss_max_mb", round(rss_max / 1024, 1)),
                ("rss_growth_mb", round(growth_mb, 2)),
                ("fds_before", baseline.fds), ("fds_after", final.fds),
                ("tasks_before", baseline.tasks), ("tasks_after", final.tasks),
                ("threads_before", baseline.threads), ("threads_after", final.threads),
                ("requests", requests), ("failed_requests", loop.failed),
                ("nacks", int(nacks)), ("envoy_update_rejected", rejected),
                ("duration_s", round(duration, 1))]:
            record_property(name, value)
        problems = [
            *([f"{loop.failed} of {requests} requests failed: {loop.first_failures}"]
              if loop.failed else []),
            *(["no request was sent"] if requests == 0 else []),
            *([f"{int(nacks)} NACKs, {rejected} updates rejected by Envoy"]
              if nacks or rejected else []),
            *([f"descriptors grew: {baseline.fds} -> {final.fds}"]
              if final.fds != baseline.fds else []),
            *([f"tasks grew: {baseline.tasks} -> {final.tasks}"]
              if final.tasks != baseline.tasks else []),
            *([f"threads grew: {baseline.threads} -> {final.threads} (more than asyncio's "
               f"default executor may add: {EXECUTOR_THREADS})"]
              if final.threads > baseline.threads + EXECUTOR_THREADS else []),
            *([f"RSS grew {growth_mb:.2f} MB (limit {plan.rss_limit_mb} MB)"]
              if growth_mb >= plan.rss_limit_mb else []),
        ]
        assert not problems, "; ".join(problems) + agent.log_tail(10)
    finally:
        # Every one is stopped even if stopping another fails.
        async with contextlib.AsyncExitStack() as cleanup:
            cleanup.push_async_callback(spire.stop, grace=0)
            cleanup.callback(agent.stop)
            cleanup.callback(envoy.stop)
            cleanup.callback(loop.stop)


def _rejected_updates(envoy: EnvoyProcess) -> int:
    stats = envoy.stats(r"^sds\..*update_rejected$")
    return sum(int(v) for v in stats.values())


async def _envoy_holds(envoy: EnvoyProcess, spire: DevSpire, identities: list[PodIdentity],
                       timeout: float) -> None:  # noqa: ASYNC109
    serials = current_serials(spire)
    wanted = {serials[p.spiffe_id] for p in identities} | {serials[PROXY_ID]}
    await envoy.await_until(lambda e: wanted <= e.certs().chain_serials, timeout=timeout,
                            what="every pod's current serial (and the proxy's) in /certs")


@pytest.mark.scenario("endurance.quick")
async def test_endurance_quick(record_property: RecordProperty) -> None:
    """20 pods x 20 measured rounds = 400 pod rotations (after 3 warm-up rounds)."""
    await run_endurance(QUICK, record_property)


async def test_a_planted_leak_is_caught() -> None:
    """The checks can fail: an agent that leaks a task, a descriptor and 256 KiB per
    rotation fails on all three (the requests still succeed)."""
    recorded: dict[str, object] = {}
    with pytest.raises(AssertionError) as failure:
        await run_endurance(LEAKY, recorded.__setitem__)
    message = str(failure.value)
    assert "descriptors grew" in message, message
    assert "tasks grew" in message, message
    assert "RSS grew" in message, message
    assert "requests failed" not in message, message
    assert recorded["rotations"] == 5 * 6


@pytest.mark.soak
@pytest.mark.scenario("endurance.soak")
async def test_endurance_soak(record_property: RecordProperty) -> None:
    """100 pods x 100 measured rounds = 10,000 pod rotations (after 10 warm-up rounds)."""
    await run_endurance(SOAK, record_property)


def test_malloc_arenas_are_capped_unless_the_operator_chose() -> None:
    """`run` caps glibc's arenas (agent/malloc.py): without the cap, the executor threads
    that scan /proc on container restarts grew the agent's RSS by about 5 MB per 1,500
    restarts (found by this suite's restart-heavy runs)."""
    assert limit_malloc_arenas(environ={"MALLOC_ARENA_MAX": "4"}) is False
    if os.path.exists("/proc/self/maps") and "libc.so.6" in Path("/proc/self/maps").read_text():
        assert limit_malloc_arenas(environ={}) is True
