"""dev-spire, the whole agent in-process and real Envoys: real traffic (identities, a
rotation, an invalid SVID, SPIRE dropping every stream), then one scrape of the agent's
registry, parsed back, must show every metric with a value that fits what happened."""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path
from typing import Any

import pytest

from agent.attest.verifier import ATTESTATION_RESULTS
from agent.runner import Agent
from tests.envoyproc import EnvoyProcess, sds_bootstrap
from tests.metrics.labels import Scrape, scrape, scrape_endpoint, suspicious_labels
from tests.podcgroups import fake_pod
from tests.sds_server.conftest import (
    TD,
    UID_A,
    AsUser,
    Stack,
    entry,
    held_serials,
    make_stack,
    needs_root,
    pod_launcher,
)
from tests.waiting import eventually

ID_A = f"spiffe://{TD}/envoy/a"
POD_ID = f"spiffe://{TD}/ns/zarf/sa/registry-proxy"
TTL = 3600.0  # dev-spire's default X.509-SVID lifetime

Factory = Callable[..., EnvoyProcess]


@contextlib.asynccontextmanager
async def running(work: Path, entries: Sequence[dict[str, Any]]
                  ) -> AsyncIterator[tuple[Stack, Agent]]:
    """dev-spire and the agent as ``spiffe-delegate run`` wires it (own identity too)."""
    stack = await make_stack(work, entries)
    try:
        yield stack, await stack.start_agent(follow_own_identity=True)
    finally:
        await stack.stop_agent()
        await stack.spire.stop(grace=0)


def has_secrets(*names: str) -> Callable[[EnvoyProcess], bool]:
    return lambda e: all(e.sds_counter(name, "update_success") >= 1 for name in names)


async def new_serial(envoy: EnvoyProcess, before: set[int], what: str) -> set[int]:
    await envoy.await_until(lambda e: e.certs().chain_serials not in (before, set()),
                            what=what)
    return await held_serials(envoy)


def serial_spellings(serials: set[int]) -> list[str]:
    return [form for serial in serials for form in (str(serial), f"{serial:x}")]


@pytest.mark.root
async def test_every_metric_after_real_envoy_traffic(work_dir: Path, as_user: AsUser) -> None:
    needs_root()
    async with running(work_dir, [entry(ID_A, f"unix:uid:{UID_A}")]) as (stack, agent):
        spire = stack.spire
        envoy = as_user(sds_bootstrap(agent.settings.sds_socket,
                                      tls_certificates=["default"],
                                      validation_contexts=["ROOTCA"]), UID_A)
        await envoy.astart()
        await envoy.await_until(has_secrets("default", "ROOTCA"), what="default and ROOTCA")
        serials = [await held_serials(envoy)]

        # A rotation reaches Envoy.
        await spire.rotate_now(ID_A)
        serials.append(await new_serial(envoy, serials[-1], "the rotated SVID"))

        # An invalid SVID is rejected and never pushed; the next good one is.
        spire.faults.corrupt_x509("key_mismatch")
        await spire.rotate_now(ID_A)
        cache_stats = agent.cache.stats
        await eventually(lambda: cache_stats.svids_rejected["key_mismatch"] >= 1,
                         what="the corrupt SVID to be rejected")
        await spire.rotate_now(ID_A)
        serials.append(await new_serial(envoy, serials[-1], "the next good SVID"))

        # SPIRE drops every stream: the client reconnects and is connected again.
        spire.faults.drop_streams_now()
        await eventually(lambda: agent.client.status.reconnects >= 1, what="a reconnect")
        await eventually(lambda: agent.client.status.connected, what="SPIRE again")
        sds = agent.sds.stats
        await eventually(lambda: sum(sds.acks_by_kind.values()) >= 4,
                         what="Envoy's ACKs of the pushes")

        # HTTP/1.1 on the SDS socket (a misconfigured cluster) is answered 400 and counted.
        reader, writer = await asyncio.open_unix_connection(str(agent.settings.sds_socket))
        writer.write(b"GET / HTTP/1.1\r\nHost: sds\r\n\r\n")
        answer = await asyncio.wait_for(reader.read(), 10)
        writer.close()
        assert answer.startswith(b"HTTP/1.1 400"), answer[:80]
        await eventually(lambda: agent.sds.rejected_connections.get("http1") == 1,
                         what="the HTTP/1.1 connection to be counted")

        assert agent.metrics_address is not None
        result = await scrape_endpoint(agent.metrics_address)  # over HTTP, as Prometheus
        envoy_pid = envoy.pid
        left = result.value("spiffe_delegate_svid_expiry_seconds", spiffe_id=ID_A)

    def check(condition: bool, what: str) -> None:
        assert condition, f"{what}\n--- scrape ---\n{result.text}"

    # SPIRE connection
    check(result.value("spiffe_delegate_spire_connected") == 1, "connected")
    check(result.value("spiffe_delegate_spire_reconnects_total") >= 1, "reconnects")
    rpc = "spiffe_delegate_spire_rpc_duration_seconds"
    for method in ("SubscribeToX509SVIDs", "SubscribeToX509Bundles", "SubscribeToJWTBundles"):
        check(result.value(f"{rpc}_count", method=method, code="OK") >= 1, f"{method} OK")
        check(result.value(f"{rpc}_bucket", method=method, code="OK", le="+Inf")
              == result.value(f"{rpc}_count", method=method, code="OK"), f"{method} buckets")
    errors = {(s.labels["method"], s.labels["code"]): s.value
              for s in result.samples("spiffe_delegate_spire_rpc_errors_total")}
    check(errors.get(("SubscribeToX509SVIDs", "UNAVAILABLE"), 0) >= 1
          and errors.get(("SubscribeToX509Bundles", "UNAVAILABLE"), 0) >= 1,
          f"the dropped streams as errors: {errors}")

    # Attestation
    attestations = result.by_label("spiffe_delegate_attestations_total", "result")
    check(set(attestations) == set(ATTESTATION_RESULTS), "every result has a series")
    check(attestations["ok"] >= 1, "Envoy attested ok")
    check(attestations["failed"] == 0 and attestations["spire_error"] == 0,
          "no failed attestation")
    check(result.value("spiffe_delegate_pid_reuse_detected_total") == 0, "no PID reuse")

    # The SVID cache: Envoy is a bare process (a unix:uid entry), so its entry is "process".
    cached = result.by_label("spiffe_delegate_svids_cached", "kind")
    check(cached["process"] >= 1 and cached["identity"] == 0, f"cached: {cached}")
    # dev-spire rounds not_after up to a whole second; the SVID was minted seconds ago.
    check(TTL - 120 < left <= TTL + 1, f"expiry {left}s: a fresh SVID of a {TTL}s TTL")
    check(result.value("spiffe_delegate_svid_rotations_total") >= 2, "two rotations")
    check(result.value("spiffe_delegate_svids_rejected_total", reason="key_mismatch") >= 1,
          "the key_mismatch rejection")

    # SDS: Envoy holds one stream per secret here, and ACKs every push.
    check(result.value("spiffe_delegate_sds_streams_open") >= 2, "two streams open")
    check(result.value("spiffe_delegate_sds_streams_opened_total", api="sotw") >= 2,
          "SotW streams opened")
    check(result.value("spiffe_delegate_sds_pushes_total", resource="default") >= 3,
          "default pushed at first and after each good rotation")
    check(result.value("spiffe_delegate_sds_pushes_total", resource="ROOTCA") >= 1, "ROOTCA")
    check(result.value("spiffe_delegate_sds_acks_total", resource="default") >= 3, "ACKs")
    check(result.value("spiffe_delegate_sds_acks_total", resource="ROOTCA") >= 1, "ACKs")
    check(result.total("spiffe_delegate_sds_nacks_total") == 0, "no NACK")
    rejected = result.by_label("spiffe_delegate_sds_connections_rejected_total", "reason")
    check(rejected == {"http1": 1, "tls": 0, "not_http2": 0, "handshake_timeout": 0,
                       "too_many_connections": 0}, f"the HTTP/1.1 connection: {rejected}")
    check(result.value("spiffe_delegate_sds_requests_over_limits_total") == 0, "no over-limit")
    ack = "spiffe_delegate_sds_push_ack_seconds"
    check(result.value(f"{ack}_count") >= 4, "push-to-ACK observations")
    check(0 < result.value(f"{ack}_sum") < 10 * result.value(f"{ack}_count"),
          "push-to-ACK seconds")

    # The process
    check(result.value("process_resident_memory_bytes") > 0, "process metrics")
    check(bool(result.samples("python_info")), "python_info")

    # Nothing that names one process, response or certificate is a label value.
    known = [str(envoy_pid), str(os.getpid())]
    for held in serials:
        known += serial_spellings(held)
    check(suspicious_labels(result.families, known=known) == [], "identifiers in labels: "
          + "; ".join(suspicious_labels(result.families, known=known)))


@pytest.mark.root
async def test_an_envoy_in_a_pod_is_a_workload_entry_and_its_uid_no_label(
        work_dir: Path, envoy_factory: Factory) -> None:
    needs_root()
    with fake_pod() as pod:
        entries = [entry(POD_ID, f"k8s:pod-uid:{pod.pod_uid}")]
        async with running(work_dir, entries) as (_, agent):
            envoy = envoy_factory(sds_bootstrap(agent.settings.sds_socket),
                                  binary=pod_launcher(pod, work_dir))
            await envoy.astart()
            await envoy.await_until(has_secrets("default", "ROOTCA"))
            serials = await held_serials(envoy)
            await eventually(lambda: sum(agent.sds.stats.acks_by_kind.values()) >= 2,
                             what="the ACKs")
            result: Scrape = scrape(agent.metrics_registry)
        assert result.by_label("spiffe_delegate_svids_cached", "kind")["workload"] == 1
        assert result.value("spiffe_delegate_svid_expiry_seconds", spiffe_id=POD_ID) > 0
        assert result.by_label("spiffe_delegate_attestations_total", "result")["ok"] >= 1
        assert pod.pod_uid not in result.text
        known = [pod.pod_uid, str(envoy.pid), *serial_spellings(serials)]
        assert suspicious_labels(result.families, known=known) == []

