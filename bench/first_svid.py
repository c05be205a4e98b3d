"""First SVID on a new SDS stream, warm and cold, versus a raw gRPC round trip plus the
/proc reads attestation needs (the floor), all measured in the same run.

dev-spire and the agent run in this process, on one event loop; each client is a real
process in a real kubepods cgroup (agent/podsim.py), running bench/sds_client.py, which
times its own calls. Every pod has its own registration entry (``k8s:pod-uid``).
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

from agent.config import AgentSettings, HostPort
from agent.runner import Agent
from bench import sampling
from bench.harness import BenchResult, Context, Row
from bench.pods import PodClient, Pods
from bench.stack import TD, entry, start_dev_spire, start_floor

#: BENCH_PROFILE=DIR: sample this process (agent and dev-spire) during the cold and warm
#: phases; DIR/first_svid-<phase>.txt gets the report.
PROFILE_ENV = "BENCH_PROFILE"
TARGET = "p50 <= 3x, p99 <= 5x"
ANY_PORT = HostPort("127.0.0.1", 0)


def profiled(phase: str) -> contextlib.AbstractContextManager[None]:
    """With BENCH_PROFILE set: this process's main thread (the agent and dev-spire) sampled
    over ``phase`` (bench/sampling.py), written to DIR/first_svid-<phase>.txt."""
    return sampling.profiled(PROFILE_ENV, f"first_svid-{phase}", f"first_svid, {phase} phase")


def pod_id(index: int) -> str:
    return f"spiffe://{TD}/ns/bench/sa/pod-{index}"


def run(ctx: Context) -> BenchResult:
    return asyncio.run(_run(ctx))


async def _run(ctx: Context) -> BenchResult:
    rounds = ctx.size(1000, 30)
    colds = ctx.size(24, 2)
    work = ctx.workdir
    with Pods() as made:
        pods = [made.new() for _ in range(colds + 1)]
        entries = [entry(pod_id(i), f"k8s:pod-uid:{pod.pod_uid}") for i, pod in enumerate(pods)]
        spire = await start_dev_spire(work, entries)
        floor = await start_floor(work / "floor.sock")
        settings = AgentSettings(spire_admin_socket=work / "admin.sock",
                                 sds_socket=work / "sds.sock", trust_domain=TD,
                                 health_address=ANY_PORT, metrics_address=ANY_PORT,
                                 shutdown_grace=2.0)
        agent = Agent(settings)
        try:
            await agent.start()
            clients = [PodClient(pod, work, settings.sds_socket, work / "floor.sock")
                       for pod in pods]
            await asyncio.gather(*(client.ready() for client in clients))
            minted_before = spire.stats.svids_minted
            cold: list[float] = []
            with profiled("cold"):
                for client in clients:  # one at a time: each sample is a pod never seen
                    cold.append((await client.ask("first"))["ms"])
            minted = spire.stats.svids_minted - minted_before
            with profiled("warm"):
                warm: dict[str, list[float]] = await clients[0].ask(f"warm {rounds}")
        finally:
            await agent.close()
            await floor.stop(None)
            await spire.stop(grace=0)
    return _result(cold, warm, minted, ctx)


def _result(cold: list[float], warm: dict[str, list[float]], minted: int,
            ctx: Context) -> BenchResult:
    floor = Row.of("floor: gRPC unary on an open connection + /proc stat, cgroup", "ms",
                   warm["floor"])
    stream = Row.of("first SVID, new stream on an open connection (warm)", "ms",
                    warm["stream"])
    stream.against(floor, TARGET)
    stream.met = _met(stream)
    floor_conn = Row.of("floor: connect + gRPC unary + /proc stat, cgroup", "ms",
                        warm["floor_conn"])
    stream_conn = Row.of("first SVID, new connection + stream (warm)", "ms",
                         warm["stream_conn"]).against(floor_conn)
    cold_row = Row.of("first SVID, new connection + stream, pod never seen (cold)", "ms",
                      cold).against(floor_conn)
    details: dict[str, Any] = {
        "first_svid_p50_ms": stream.p50, "first_svid_p99_ms": stream.p99,
        "first_svid_cold_p50_ms": cold_row.p50, "floor_p50_ms": floor.p50,
        "floor_p99_ms": floor.p99,
        "first_svid_new_connection_p50_ms": stream_conn.p50,
        "floor_new_connection_p50_ms": floor_conn.p50,
        "cold_svids_minted": minted,
    }
    notes = [
        "**Method.** dev-spire and the agent run in the benchmark's process, on one "
        "asyncio event loop; each client is a real process (bench/sds_client.py, "
        "grpc.aio) in a real kubepods cgroup (agent/podsim.py), with a registration entry "
        "of its own (`k8s:pod-uid`). A sample is timed in the client, from opening a "
        "StreamSecrets stream that asks for `default` and `ROOTCA` to the first "
        "DiscoveryResponse carrying both. *Warm*: the pod already holds an open stream "
        "(as an Envoy does), so the agent has its SVID; a new stream still goes through "
        "the whole path: the peer-credential relay, identifying the caller from its "
        "pinned pidfd and /proc, the cache watch, the liveness re-check before the push, "
        "and building the Secret protos. *Cold*: the first stream of a pod the agent has "
        "never seen, on a new connection, one pod at a time: attestation, a new SPIRE "
        f"subscription by PID, dev-spire attesting the PID from /proc and minting "
        f"({minted} SVIDs minted for {len(cold)} cold pods), re-verification, the push. "
        f"{len(warm['stream'])} warm rounds, each interleaving floor and agent samples; "
        f"{len(cold)} cold samples, so the cold p99 is their maximum.",
        "**Floor.** A raw grpc.aio unary method on a Unix socket in the same process, "
        "whose handler reads `/proc/<pid>/stat` and `/proc/<pid>/cgroup` of the caller: "
        "the least any PID-attesting answer costs in this language and RPC stack. The "
        "target (p50 within 3x, p99 within 5x) applies to the warm new stream on an open "
        "connection, against the floor on an open connection. A new connection (what a "
        "starting Envoy makes) is shown against a floor that also connects.",
        f"**Cold.** {cold_row.ratio_p50 or 0:.1f}x the connecting floor at p50 "
        f"({cold_row.p50 or 0:.1f} ms against {stream_conn.p50 or 0:.1f} ms warm on a new "
        "connection); no target applies. What the cold path adds: the agent's by-PID "
        "subscription to dev-spire (a second gRPC stream, here in the same process), "
        "dev-spire attesting the PID from /proc (status, exe, cgroup; user and group "
        "names) and minting, the agent validating the SVID and re-reading the pinned "
        "process after the answer, then the push. The sampled profile of this process "
        "over the cold samples (docs/profiles/first_svid-cold.txt) has no single item "
        "dominating: the event loop is idle about half the time (waiting on the client "
        "process and on gRPC's own threads, once per hop); dev-spire's "
        "`SubscribeToX509SVIDs` (attestation and minting) is the largest block, about an "
        "eighth of the samples; then the relay's pumping, the /proc reads of the agent's "
        "attestation and re-checks, the SDS handler, and `validate_x509_svid` (about 5%, "
        "mostly verifying the chain against the bundle; py-spiffe's pyasn1 DER split, "
        "which cost 1.1 ms per SVID, was removed from it in commit e281dc1). With a "
        "real SPIRE agent the SPIRE side (attestation through the kubelet, a server "
        "round trip for a new entry) would dominate instead.",
        "**Warm, per stream.** The sampled profile (docs/profiles/first_svid-warm.txt) "
        "shows this process idle about 60% of the warm phase; the SDS handler's own "
        "share (identifying the caller, the cache watch, the re-check before the push, "
        "building the response) is about a tenth of the samples and the peer-credential "
        "relay about as much: the relay is the one structural cost the floor does not "
        "pay (each message crosses one more socket), and it is what lets every stream "
        "be tied to the kernel's pidfd of its caller.",
    ]
    return BenchResult("first_svid", "First SVID on a new SDS stream",
                       [floor, stream, floor_conn, stream_conn, cold_row], details, notes)


def _met(row: Row) -> bool:
    return (row.ratio_p50 is not None and row.ratio_p50 <= 3
            and row.ratio_p99 is not None and row.ratio_p99 <= 5)
