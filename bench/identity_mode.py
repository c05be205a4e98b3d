"""Identity mode savings: 110 pods sharing 10 SPIFFE IDs, served to a trusted proxy, with
the default per-pod cache key and with ``--cache-key identity``.

dev-spire runs in this process (a fresh one per mode, so both mint the same SVIDs); the
agent is ``spiffe-delegate run`` as a child process (its RSS is its own); every pod is a
real ``sleep`` in a real kubepods cgroup, listed in dev-spire's pods file with a namespace
and service account; the registration entries select ``k8s:ns`` + ``k8s:sa``. The proxy is
bench/sds_client.py in a pod of its own, a trusted proxy asking ``workload:<pod uid>``.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent.cache import sources
from agent.demo.chain import free_port
from agent.devspire import DevSpire
from agent.podsim import FakePod
from bench import sampling
from bench.harness import REPO, BenchResult, Context, Row
from bench.pods import PodClient, Pods
from bench.procstack import cpu_seconds
from bench.stack import TD, AgentChild, entry, start_dev_spire

#: BENCH_PROFILE=DIR: the agent's main thread is sampled (bench/sampling.py) from just
#: before the proxy asks for the pods until they are all served, and so is this process
#: (dev-spire); DIR/identity_mode-<mode>.txt and identity_mode-devspire-<mode>.txt.
PROFILE_ENV = "BENCH_PROFILE"
PROFILE_PRELUDE = """
import signal, sys
sys.path.insert(0, %r)
from bench import sampling
_sampling = []
def _toggle(signum, frame):
    if not _sampling:
        _sampling.append(Sampler())
        _sampling[0].start()
        return
    text = _sampling.pop().stop_and_report(%r)
    with open(%r, "w") as out:
        out.write(text)
signal.signal(signal.SIGUSR2, _toggle)
"""
PROXY_ID = f"spiffe://{TD}/ns/bench/sa/registry-proxy"
X509 = "SubscribeToX509SVIDs"
MODES = ("workload", "identity")


def identity_of(index: int) -> str:
    return f"spiffe://{TD}/ns/team-{index}/sa/app-{index}"


@dataclass
class ModeFigures:
    serve_all_ms: float
    each_ms: list[float]
    spire_streams: int       # X.509-SVID subscriptions open for the pods at steady state
    spire_opened: int        # subscriptions opened for the pods in all (attestation too)
    svids_cached: int        # the agent's cache for the pods (the proxy's own left out)
    svids_minted: int        # by dev-spire
    cpu_ms: float            # the agent's CPU (user + system) until every pod was served
    rss_mb: float
    rss_growth_mb: float     # from the proxy's own stream to every pod served


def run(ctx: Context) -> BenchResult:
    return asyncio.run(_run(ctx))


def profiled(what: str) -> contextlib.AbstractContextManager[None]:
    """This process's main thread (dev-spire) sampled, with BENCH_PROFILE set."""
    return sampling.profiled(PROFILE_ENV, f"identity_mode-{what}",
                             f"identity_mode, {what} (in the benchmark's process)")


def _prelude(mode: str) -> str | None:
    directory = os.environ.get(PROFILE_ENV)
    if not directory:
        return None
    title = f"identity_mode, the agent with --cache-key {mode}, serving the pods"
    return PROFILE_PRELUDE % (str(REPO), title,
                              str(Path(directory, f"identity_mode-{mode}.txt")))


def _toggle_profile(agent: AgentChild) -> None:
    if os.environ.get(PROFILE_ENV):
        os.kill(agent.pid, signal.SIGUSR2)


def _scans_shared() -> bool:
    """Whether the agent's SpireSource hands one PodScans to all its verifiers."""
    return "PodScans" in inspect.getsource(sources)


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


async def _settle(spire: DevSpire, seconds: float = 0.5, limit: float = 15.0) -> None:
    """Until dev-spire's open subscriptions have not changed for ``seconds`` (identity mode
    closes each pod's attestation subscription after its first answer)."""
    deadline = time.monotonic() + limit
    last, since = spire.stats.open_streams[X509], time.monotonic()
    while time.monotonic() - since < seconds and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
        now = spire.stats.open_streams[X509]
        if now != last:
            last, since = now, time.monotonic()


async def _cached(agent: AgentChild) -> int:
    """X.509-SVIDs in the agent's cache, every kind of key (its metrics)."""
    return int(await asyncio.get_running_loop().run_in_executor(
        None, agent.metric_sum, "spiffe_delegate_svids_cached"))


def _exists(path: Path) -> bool:
    return path.exists()


async def _wait_for(path: Path, agent: AgentChild, limit: float = 30.0) -> None:
    deadline = time.monotonic() + limit
    while not _exists(path):
        agent.check_alive()
        if time.monotonic() > deadline:
            raise RuntimeError(f"the agent did not create {path} in {limit:g}s"
                               + agent.log_tail())
        await asyncio.sleep(0.05)


async def _one_mode(mode: str, work: Path, entries: list[dict[str, Any]],
                    pod_list: list[dict[str, Any]], workers: list[FakePod],
                    proxy: PodClient) -> ModeFigures:
    directory = work / mode
    directory.mkdir()
    spire = await start_dev_spire(directory, entries, pod_list)
    sds = directory / "sds.sock"
    agent = AgentChild(
        ["--spire-admin-socket", str(directory / "admin.sock"), "--sds-socket", str(sds),
         "--trust-domain", TD, "--trusted-proxy", PROXY_ID, "--cache-key", mode,
         "--health-address", f"127.0.0.1:{free_port()}", "--log-level", "warning"],
        directory / "agent.log", free_port(), prelude=_prelude(mode))
    try:
        agent.start()
        await _wait_for(sds, agent)
        await proxy.ask(f"use {sds}")
        await proxy.ask("hold")
        await _settle(spire)
        open_before = spire.stats.open_streams[X509]
        opened_before = spire.stats.streams_opened[X509]
        minted_before = spire.stats.svids_minted
        rss_before = _rss_mb(agent.pid)
        cached_before = await _cached(agent)
        _toggle_profile(agent)
        cpu_before = cpu_seconds(agent.pid)
        with profiled(f"devspire-{mode}"):
            served = await proxy.ask("workloads " + ",".join(p.pod_uid for p in workers))
        cpu_served = cpu_seconds(agent.pid) - cpu_before
        await _settle(spire)
        _toggle_profile(agent)
        cached = await _cached(agent) - cached_before
        figures = ModeFigures(
            serve_all_ms=served["all_ms"], each_ms=served["each_ms"],
            spire_streams=spire.stats.open_streams[X509] - open_before,
            spire_opened=spire.stats.streams_opened[X509] - opened_before,
            svids_cached=cached, svids_minted=spire.stats.svids_minted - minted_before,
            cpu_ms=cpu_served * 1000, rss_mb=_rss_mb(agent.pid),
            rss_growth_mb=_rss_mb(agent.pid) - rss_before)
        await proxy.ask("release")
        return figures
    finally:
        await asyncio.get_running_loop().run_in_executor(None, agent.stop)
        await spire.stop(grace=0)


async def _run(ctx: Context) -> BenchResult:
    identities = ctx.size(10, 2)
    per_identity = 11
    work = ctx.workdir
    with Pods() as made:
        workers = [made.new() for _ in range(identities * per_identity)]
        for pod in workers:
            pod.spawn(["sleep", "3600"])
        proxy_pod = made.new()
        pod_list = [{"uid": pod.pod_uid, "namespace": f"team-{i % identities}",
                     "service_account": f"app-{i % identities}", "name": f"app-{i}",
                     "containers": [{"id": pod.container_id, "name": "app"}]}
                    for i, pod in enumerate(workers)]
        entries = [entry(identity_of(k), f"k8s:ns:team-{k}", f"k8s:sa:app-{k}")
                   for k in range(identities)]
        entries.append(entry(PROXY_ID, f"k8s:pod-uid:{proxy_pod.pod_uid}"))
        proxy = PodClient(proxy_pod, work, work / "unused.sock")
        await proxy.ready()
        processes = len([name for name in os.listdir("/proc") if name.isdigit()])
        figures = {mode: await _one_mode(mode, work, entries, pod_list, workers, proxy)
                   for mode in MODES}
    return _result(figures, len(workers), identities, processes)


def _result(figures: dict[str, ModeFigures], pods: int, identities: int,
            processes: int) -> BenchResult:
    scans_shared = _scans_shared()
    per_pod, shared = figures["workload"], figures["identity"]
    rows: list[Row] = []

    def pair(measure: str, unit: str, a: float, b: float, *, one_each: bool = False) -> None:
        """Per-pod row, then identity row against it. ``one_each``: the natural target,
        one per pod with the per-pod key and one per identity with the identity key."""
        peer = Row(f"{measure}, per-pod key", unit, a, samples=1)
        row = Row(f"{measure}, identity key", unit, b, samples=1).against(peer)
        if one_each:
            peer.target, peer.met = f"= {pods} (one per pod)", a == pods
            row.target, row.met = f"= {identities} (one per identity)", b == identities
        rows.extend((peer, row))

    pair("SPIRE X.509 subscriptions open for the pods", "streams", per_pod.spire_streams,
         shared.spire_streams, one_each=True)
    pair("SPIRE X.509 subscriptions opened for the pods (attestation included)", "streams",
         per_pod.spire_opened, shared.spire_opened)
    pair("X.509-SVIDs held in the agent's cache", "SVIDs", per_pod.svids_cached,
         shared.svids_cached, one_each=True)
    pair("agent RSS, every pod served", "MB", per_pod.rss_mb, shared.rss_mb)
    pair("agent RSS growth for the pods", "MB", per_pod.rss_growth_mb, shared.rss_growth_mb)
    pair("agent CPU until every pod was served", "ms", per_pod.cpu_ms, shared.cpu_ms)
    peer = Row.of("time to serve every pod, per-pod key (per pod: first response)", "ms",
                  per_pod.each_ms)
    rows.append(peer)
    rows.append(Row.of("time to serve every pod, identity key (per pod: first response)",
                       "ms", shared.each_ms).against(peer))
    details: dict[str, Any] = {
        "pods": pods, "identities": identities,
        "spire_streams_per_pod": per_pod.spire_streams,
        "spire_streams_identity": shared.spire_streams,
        "spire_streams_opened_per_pod": per_pod.spire_opened,
        "spire_streams_opened_identity": shared.spire_opened,
        "svids_per_pod": per_pod.svids_cached, "svids_identity": shared.svids_cached,
        "svids_minted_per_pod": per_pod.svids_minted,
        "svids_minted_identity": shared.svids_minted,
        "rss_mb_per_pod": round(per_pod.rss_mb, 1), "rss_mb_identity": round(shared.rss_mb, 1),
        "rss_growth_mb_per_pod": round(per_pod.rss_growth_mb, 1),
        "rss_growth_mb_identity": round(shared.rss_growth_mb, 1),
        "serve_all_ms_per_pod": round(per_pod.serve_all_ms, 1),
        "serve_all_ms_identity": round(shared.serve_all_ms, 1),
        "agent_cpu_ms_per_pod": round(per_pod.cpu_ms),
        "agent_cpu_ms_identity": round(shared.cpu_ms),
        "processes_on_machine": processes,
        "pod_scans_shared": scans_shared,
    }
    notes = [
        f"**Method.** {pods} pods (a real `sleep` in a real kubepods cgroup each) share "
        f"{identities} SPIFFE IDs: dev-spire's pods file gives pod i namespace `team-(i mod "
        f"{identities})` and service account `app-(i mod {identities})`, and each of the "
        f"{identities} registration entries selects `k8s:ns` + `k8s:sa`, so it matches "
        f"{pods // identities} pods. They are served the way a node proxy (ztunnel-style) "
        "asks for them: one trusted proxy (bench/sds_client.py in a pod of its own, "
        "`--trusted-proxy`) holds its own `default` stream, then opens one StreamSecrets "
        f"stream per pod asking `workload:<pod uid>`, all {pods} at once on one "
        "connection, and keeps them open. The agent is `spiffe-delegate run` as a child "
        "process, once with the default `--cache-key workload` and once with `--cache-key "
        "identity`, each against a fresh in-process dev-spire. Figures are read once every "
        "pod has its first response and dev-spire's open subscriptions have stopped "
        "changing: subscriptions (dev-spire's counters, less those of the agent itself and "
        "of the proxy's own stream), SVIDs in the agent's cache "
        "(`spiffe_delegate_svids_cached`), SVIDs dev-spire minted, the agent's VmRSS. "
        "One run of each mode: the rows have one sample; the time row's p50/p99 are over "
        "the pods' first responses, measured from the moment the streams were opened.",
        f"**Reading.** In identity mode each pod is still attested on its own (a by-PID "
        "subscription read to its first verified answer, then closed: the 'opened' row), "
        "then joins its identity's one long-lived subscription. dev-spire, as SPIRE's "
        "agent, mints one SVID per registration entry in both modes "
        f"({per_pod.svids_minted} and {shared.svids_minted}): the saving is on the SPIRE "
        "streams the node holds and on the agent's cache, not on signing. The only "
        "targets are the natural ones: one open subscription and one cached SVID per pod "
        "with the per-pod key, per identity with the identity key. The agent's RSS grows "
        "by nearly as much in both modes: most of what grows is per SDS stream (the "
        f"proxy's {pods} streams, their tasks and gRPC state, exist in both modes), and "
        "a cached SVID or a SPIRE subscription is small beside it; what identity mode "
        "saves at this size is SPIRE's streams (and its agent's work per stream), not "
        "the agent's memory.",
        f"**Where the time goes.** Serving the {pods} pods cost the agent "
        f"{per_pod.cpu_ms / pods:.1f} ms of CPU per pod with the per-pod key and "
        f"{shared.cpu_ms / pods:.1f} ms with the identity key, over "
        f"{per_pod.serve_all_ms:.0f} and {shared.serve_all_ms:.0f} ms of wall time to "
        f"serve them all ({processes} processes on the machine); part of that CPU runs "
        "in threads, so on a busy node it can exceed the wall time. The "
        "sampled profiles of the agent's event loop while it serves the pods "
        "(docs/profiles/identity_mode-workload.txt, identity_mode-identity.txt; dev-spire "
        "meanwhile: identity_mode-devspire-*.txt) show it idle about 45% of the time; "
        "the rest is /proc reads (identifying callers, pinning each pod's process, "
        "re-reading the proxy's process before every push: `ProcReader.identity`, about "
        "a fifth of the samples), the SDS handler, and validating each SVID SPIRE sends "
        f"(`validate_x509_svid`; with the per-pod key the same {identities} SVIDs are "
        f"validated {pods // identities} times each). The threads do the rest: every "
        "`workload:<uid>` lookup looks for a live process of its pod by reading the "
        "cgroup file of every process on the "
        "machine, so a burst of lookups costs one /proc scan each, O(pods x processes), "
        "which is also why this row moves with what else runs on the machine; and the "
        "scanning threads slow the event loop's own /proc reads by contending for the "
        "GIL (one `ProcReader.identity` measured 43 us alone, 130 us beside three "
        "threads scanning /proc), which is why those reads loom so large in the "
        "profiles. "
        + ("In this run the agent's verifiers share one `PodScans` "
           "(agent/attest/verifier.py): lookups made together share a scan. "
           if scans_shared else
           "`PodScans` (agent/attest/verifier.py) makes lookups made together share one "
           "scan, but in this run each verifier has its own (SpireSource does not pass "
           "one shared object yet). Sharing it, measured with this benchmark on this "
           "machine with 1,000 idle processes added (1,200 in all, a busy node), cut the "
           "agent's CPU to serve the pods from 4.3-6.3 s to 0.5-0.8 s and the time to "
           "serve every pod from 3.9-5.0 s to 0.7-1.2 s (per-pod key; identity key "
           "alike); with about 215 processes the two were within noise. ")
        + "What else would shorten it: validating each distinct SVID once (with the "
        "per-pod key the same certificate arrives once per pod; remembering verified "
        "SVIDs by their DER bytes would skip the repeats), and a re-check before each "
        "push that reads only what it compares (stat and cgroup).",
    ]
    return BenchResult("identity_mode", "Identity mode savings", rows, details, notes)
