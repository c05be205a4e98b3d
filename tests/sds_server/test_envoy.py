"""The whole agent (dev-spire -> client -> verifier -> cache -> SDS) feeding real Envoys,
read back through Envoy's admin /certs and /stats. Everything but Envoy runs in-process."""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import subprocess
import threading
import time
from collections.abc import AsyncIterator, Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import rsa

from agent.cache.keys import WorkloadUid
from agent.errors import SvidRejected
from agent.model import X509Bundles
from agent.spire.validation import TrustBundles, validate_x509_svid
from tests.envoyproc import EnvoyProcess, sds_bootstrap
from tests.podcgroups import fake_pod
from tests.sds.test_deploy_configs import (
    DEPLOY,
    SOCKET_IN_CONFIG,
    echo_registry,
    free_port,
    plain_http,
    rewrite,
)
from tests.sds_server.clients import fetch, secrets_of
from tests.sds_server.conftest import (
    DELEGATE,
    PROXY_ID,
    REGISTRY_ID,
    TD,
    UID_A,
    UID_B,
    AsUser,
    Pki,
    Stack,
    entry,
    held_serials,
    make_stack,
    needs_root,
    pod_launcher,
    scripted_server,
    svid_with_key,
    uris_held,
)
from tests.waiting import eventually

ID_A = f"spiffe://{TD}/envoy/a"
ID_B = f"spiffe://{TD}/envoy/b"
WEB_ID = f"spiffe://{TD}/ns/apps/sa/web"

Factory = Callable[..., EnvoyProcess]


@contextlib.asynccontextmanager
async def running(work: Path, entries: Sequence[dict[str, Any]], *, agent: bool = True,
                  **changes: Any) -> AsyncIterator[Stack]:
    stack = await make_stack(work, entries, **changes)
    try:
        if agent:
            await stack.start_agent()
        yield stack
    finally:
        await stack.stop_agent()
        await stack.spire.stop(grace=0)


def has_secrets(*names: str) -> Callable[[EnvoyProcess], bool]:
    return lambda e: all(e.sds_counter(name, "update_success") >= 1 for name in names)


# --- identities, mTLS -----------------------------------------------------------------

@pytest.mark.root
async def test_envoys_in_two_pods_get_their_own_identities_and_talk_mtls(
        work_dir: Path, envoy_factory: Factory) -> None:
    """deploy/envoy configs (ports and socket rewritten), each Envoy started inside its
    own pod's cgroups: the node proxy pulls through the registry side over mTLS, and the
    registry side sees the proxy's SPIFFE ID."""
    needs_root()
    with fake_pod() as proxy_pod, fake_pod(layout="cgroupfs-v2") as registry_pod:
        entries = [entry(PROXY_ID, f"k8s:pod-uid:{proxy_pod.pod_uid}"),
                   entry(REGISTRY_ID, f"k8s:pod-uid:{registry_pod.pod_uid}")]
        async with running(work_dir, entries) as stack:
            registry = await asyncio.start_server(echo_registry, "127.0.0.1", 0)
            registry_port = registry.sockets[0].getsockname()[1]
            proxy_port, mtls_port = free_port(), free_port()
            try:
                side = envoy_factory(
                    registry_side_config(stack.sds_socket, mtls_port, registry_port),
                    binary=pod_launcher(registry_pod, work_dir))
                proxy = envoy_factory(
                    node_proxy_config(stack.sds_socket, proxy_port, mtls_port),
                    binary=pod_launcher(proxy_pod, work_dir))
                await asyncio.gather(side.astart(wait_ready=False),
                                     proxy.astart(wait_ready=False))
                for envoy in (side, proxy):
                    await envoy.await_until(has_secrets("default", "ALL"),
                                            what="default and ALL")
                assert await proxy.acall(uris_held, proxy) == {PROXY_ID}
                assert await side.acall(uris_held, side) == {REGISTRY_ID}

                status, body = await asyncio.to_thread(
                    plain_http, "GET", f"http://127.0.0.1:{proxy_port}/v2/")
                if status != 200:
                    raise proxy.fail(f"pull failed: {status} {body}" + side.log_tail())
                echoed = json.loads(body)
                assert f"URI={PROXY_ID}" in echoed["xfcc"]
                # They were served as the pods they are in, through the cache.
                watched = set(stack.agent.cache.workloads()) if stack.agent else set()
                assert {WorkloadUid(proxy_pod.pod_uid, proxy_pod.container_id),
                        WorkloadUid(registry_pod.pod_uid, registry_pod.container_id)} <= watched
            finally:
                registry.close()


def registry_side_config(sds_socket: Path, mtls_port: int, registry_port: int) -> str:
    """deploy/envoy/registry-side.yaml as shipped, with the socket and ports moved."""
    return rewrite((DEPLOY / "registry-side.yaml").read_text(), {
        SOCKET_IN_CONFIG: str(sds_socket),
        'address: "::", port_value: 5443, ipv4_compat: true':
            f"address: 127.0.0.1, port_value: {mtls_port}",
        "port_value: 5001": f"port_value: {registry_port}",
        "port_value: 9902": "port_value: 0",
    })


class PullLoop:
    """GETs through the node proxy back to back in a thread until stopped; every failure
    (a status other than 200, or an exception) is kept with the time it happened."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.ok = 0
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="pull loop", daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                status, body = plain_http("GET", self.url)
            except OSError as exc:
                self.failures.append(f"{time.monotonic():.3f} {exc!r}")
                continue
            if status == 200:
                self.ok += 1
            else:
                self.failures.append(f"{time.monotonic():.3f} {status} {body[:200]}")

    async def __aenter__(self) -> PullLoop:
        self._thread.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        # Joined off the event loop: the upstream registry may be served by this loop.
        self._stop.set()
        await asyncio.to_thread(self._thread.join, 15)


async def test_rotations_under_a_pull_loop_fail_no_request(
        work_dir: Path, as_user: AsUser) -> None:
    """The shipped node-proxy and registry-side configs over mTLS, a pull loop running
    throughout: three rotations of each identity each show up as a new serial in that
    Envoy's /certs, and not one request fails."""
    needs_root()
    entries = [entry(PROXY_ID, f"unix:uid:{UID_A}"), entry(REGISTRY_ID, f"unix:uid:{UID_B}")]
    async with running(work_dir, entries) as stack:
        registry = await asyncio.start_server(echo_registry, "127.0.0.1", 0)
        registry_port = registry.sockets[0].getsockname()[1]
        proxy_port, mtls_port = free_port(), free_port()
        try:
            side = as_user(registry_side_config(stack.sds_socket, mtls_port, registry_port),
                           UID_B)
            proxy = as_user(node_proxy_config(stack.sds_socket, proxy_port, mtls_port), UID_A)
            await asyncio.gather(side.astart(wait_ready=False), proxy.astart(wait_ready=False))
            for envoy in (side, proxy):
                await envoy.await_until(has_secrets("default", "ALL"), what="default and ALL")
            url = f"http://127.0.0.1:{proxy_port}/v2/"
            status, body = await asyncio.to_thread(plain_http, "GET", url)
            assert status == 200, body + side.log_tail()

            async with PullLoop(url) as loop:
                for spiffe_id, envoy in [(PROXY_ID, proxy), (REGISTRY_ID, side)] * 3:
                    before = await held_serials(envoy)
                    pulled = loop.ok
                    await stack.spire.rotate_now(spiffe_id)
                    await envoy.await_until(
                        lambda e, old=before: e.certs().chain_serials not in (old, set()),
                        what=f"the rotated serial of {spiffe_id}")
                    await eventually(lambda n=pulled: loop.ok >= n + 5,
                                     what="pulls with the new certificate")
            assert loop.failures == [], loop.failures[:5]
            assert loop.ok >= 30
            for envoy in (side, proxy):
                assert await envoy.acall(envoy.sds_counter, "default", "update_rejected") == 0
            assert stack.sds.stats.nacks == 0
        finally:
            registry.close()


async def test_uid_entries_rotation_and_fetch(work_dir: Path, as_user: AsUser) -> None:
    """Envoys under two uids get two identities from one agent; a rotation in dev-spire
    is a new serial in /certs; FetchSecrets serves the caller (here: the delegate)."""
    needs_root()
    entries = [entry(ID_A, f"unix:uid:{UID_A}"), entry(ID_B, f"unix:uid:{UID_B}")]
    async with running(work_dir, entries) as stack:
        names = {"tls_certificates": ["default"], "validation_contexts": ["ROOTCA", "ALL"]}
        a = as_user(sds_bootstrap(stack.sds_socket, **names), UID_A)
        b = as_user(sds_bootstrap(stack.sds_socket, **names), UID_B)
        await asyncio.gather(a.astart(), b.astart())
        for envoy in (a, b):
            await envoy.await_until(has_secrets("default", "ROOTCA", "ALL"))
        assert await a.acall(uris_held, a) == {ID_A}
        assert await b.acall(uris_held, b) == {ID_B}
        ca_serial = x509.load_der_x509_certificate(stack.spire.bundle_der()).serial_number
        assert ca_serial in (await a.acall(a.certs)).ca_serials

        before = await held_serials(a)
        updates = await a.acall(a.sds_counter, "default", "update_success")
        await stack.spire.rotate_now(ID_A)
        await a.await_until(lambda e: e.certs().chain_serials - before != set(),
                            what="the rotated serial")
        assert await a.acall(a.sds_counter, "default", "update_success") == updates + 1
        assert await a.acall(a.sds_counter, "default", "update_rejected") == 0
        assert stack.sds.stats.nacks == 0

        response = await fetch(stack.sds_socket, ["default", "ROOTCA"])
        secrets = secrets_of(response)
        assert set(secrets) == {"default", "ROOTCA"}
        leaf = x509.load_pem_x509_certificate(
            secrets["default"].tls_certificate.certificate_chain.inline_bytes)
        sans = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        assert sans.get_values_for_type(x509.UniformResourceIdentifier) == [DELEGATE]


@pytest.mark.parametrize("mode", ["key_mismatch", "expired"])
async def test_an_invalid_svid_from_spire_is_never_pushed(
        work_dir: Path, as_user: AsUser, mode: str) -> None:
    needs_root()
    async with running(work_dir, [entry(ID_A, f"unix:uid:{UID_A}")]) as stack:
        envoy = as_user(sds_bootstrap(stack.sds_socket, validation_contexts=[]), UID_A)
        await envoy.astart()
        await envoy.await_until(has_secrets("default"))
        first = await held_serials(envoy)
        responses = stack.sds.stats.responses
        assert stack.agent is not None
        cache_stats = stack.agent.cache.stats

        stack.spire.faults.corrupt_x509(mode)
        await stack.spire.rotate_now(ID_A)
        await eventually(lambda: sum(cache_stats.svids_rejected.values()) >= 1,
                         what="the cache to reject the corrupt SVID")
        assert stack.sds.stats.responses == responses, "something was pushed"
        assert await held_serials(envoy) == first
        assert await envoy.acall(envoy.sds_counter, "default", "update_rejected") == 0

        await stack.spire.rotate_now(ID_A)  # a good one again
        await envoy.await_until(lambda e: e.certs().chain_serials not in (first, set()),
                                what="the next good SVID")
        assert stack.sds.stats.nacks == 0


async def test_envoy_nack_keeps_its_secret_and_the_rejected_one_is_not_resent(
        work_dir: Path, as_user: AsUser, pki: Pki) -> None:
    """A secret Envoy refuses (an RSA-1024 key: Envoy wants 2048 bits or more) is NACKed:
    Envoy keeps the last good one; the agent counts and logs the NACK's error_detail and
    never pushes that secret again. The agent's own validation rejects such keys too
    (``weak_key``), so the SVID is fed through a scripted cache to reach Envoy at all: the
    NACK path stays proven for whatever else Envoy may refuse."""
    needs_root()
    weak = svid_with_key(pki.ca, ID_A, rsa.generate_private_key(65537, 1024))
    trust = TrustBundles.parse(X509Bundles({pki.ca.key_name: (pki.ca.der,)}))
    with pytest.raises(SvidRejected) as rejected:  # the real cache's gate stops it first
        validate_x509_svid(weak, trust, now=datetime.now(UTC))
    assert rejected.value.reason == "weak_key"

    harness = await scripted_server(work_dir)
    try:
        harness.cache.publish([pki.svid(ID_A)], pki.bundles)
        envoy = as_user(sds_bootstrap(harness.socket, validation_contexts=[]), UID_A)
        await envoy.astart()
        await envoy.await_until(has_secrets("default"))
        first = await held_serials(envoy)

        harness.cache.publish([weak], pki.bundles)
        await envoy.await_until(lambda e: e.sds_counter("default", "update_rejected") == 1,
                                what="Envoy to reject the RSA-1024 certificate")
        stats = harness.server.stats
        await eventually(lambda: stats.nacks == 1, what="the NACK to reach the agent")
        assert stats.nacks_by_name["default"] == 1
        assert "2048-bit or larger" in stats.last_nack_detail
        assert await held_serials(envoy) == first

        # A new state with the same rejected secret (only a bundle changed): not resent.
        avoided = stats.repushes_avoided
        harness.cache.publish([weak], {**pki.bundles, pki.other.key_name: (pki.other.der,)})
        await eventually(lambda: stats.repushes_avoided > avoided, what="a skipped push")
        fixed = pki.svid(ID_A)
        harness.cache.publish([fixed], pki.bundles)
        await envoy.await_until(lambda e: e.certs().chain_serials not in (first, set()))
        assert await envoy.acall(envoy.sds_counter, "default", "update_rejected") == 1
        assert stats.nacks == 1
    finally:
        harness.cache.close()
        await harness.server.stop(grace=1)


# --- start-up order, restarts, delta --------------------------------------------------

def node_proxy_config(sds_socket: Path, proxy_port: int, registry_port: int) -> str:
    """deploy/envoy/node-proxy.yaml as shipped, with the socket and ports moved."""
    return rewrite((DEPLOY / "node-proxy.yaml").read_text(), {
        SOCKET_IN_CONFIG: str(sds_socket),
        "port_value: 5000": f"port_value: {proxy_port}",
        "address: zarf-docker-registry.zarf.svc.cluster.local, port_value: 5443":
            f"address: 127.0.0.1, port_value: {registry_port}",
        "port_value: 9901": "port_value: 0",
    })


async def test_shipped_envoy_started_first_holds_its_certificate_within_a_second(
        work_dir: Path, as_user: AsUser) -> None:
    """The node proxy config as shipped, started 2 s before the agent (long enough for
    its retry back-off to reach the maximum), gets default and ALL within one second of the
    agent's socket coming up; then the agent restarts underneath a running Envoy."""
    needs_root()
    async with running(work_dir, [entry(PROXY_ID, f"unix:uid:{UID_A}")], agent=False,
                       trust_domain=None) as stack:
        envoy = as_user(node_proxy_config(stack.sds_socket, free_port(), free_port()), UID_A)
        await envoy.astart(wait_ready=False)
        await asyncio.sleep(2.0)
        assert not stack.sds_socket.exists()
        agent = await stack.start_agent()
        up = time.monotonic()
        await eventually(lambda: agent.sds.stats.responses >= 2, timeout=5,
                         what="default and ALL to be pushed")
        delay = time.monotonic() - up
        assert delay < 1.0, f"Envoy got its secrets {delay:.2f}s after the agent came up"
        await envoy.await_until(has_secrets("default", "ALL"), timeout=5)
        assert await envoy.acall(uris_held, envoy) == {PROXY_ID}
        first = await held_serials(envoy)

        await stack.stop_agent()
        assert not stack.sds_socket.exists()
        # Envoy keeps serving what it holds.
        assert await envoy.acall(envoy.ready_state) == "LIVE"
        assert await held_serials(envoy) == first

        await stack.spire.rotate_now(PROXY_ID)  # while no agent runs
        agent = await stack.start_agent()
        await envoy.await_until(lambda e: e.certs().chain_serials not in (first, set()),
                                what="the new agent's push after Envoy reconnected")
        await eventually(lambda: agent.sds.stats.streams_opened >= 2,
                         what="both of Envoy's streams to reconnect")


async def test_rootca_reaches_an_envoy_that_spire_issues_nothing_to(
        work_dir: Path, as_user: AsUser) -> None:
    """No entry matches this Envoy and no --trust-domain is set: ROOTCA still arrives (the
    agent's trust domain, learned from its own SVID), and default does not."""
    needs_root()
    async with running(work_dir, [entry(ID_B, f"unix:uid:{UID_B}")], agent=False,
                       trust_domain=None) as stack:
        await stack.start_agent(follow_own_identity=True)
        envoy = as_user(sds_bootstrap(stack.sds_socket, validation_contexts=["ROOTCA"]),
                        UID_A)
        await envoy.astart(wait_ready=False)
        await envoy.await_until(has_secrets("ROOTCA"), what="ROOTCA")
        ca_serial = x509.load_der_x509_certificate(stack.spire.bundle_der()).serial_number
        assert ca_serial in (await envoy.acall(envoy.certs)).ca_serials
        assert await envoy.acall(envoy.sds_counter, "default", "update_success") == 0


async def test_delta_grpc_envoy_including_a_restart(work_dir: Path,
                                                    as_user: AsUser) -> None:
    needs_root()
    async with running(work_dir, [entry(ID_A, f"unix:uid:{UID_A}")]) as stack:
        envoy = as_user(sds_bootstrap(stack.sds_socket, api_type="DELTA_GRPC",
                                            validation_contexts=["ROOTCA", "ALL"]), UID_A)
        await envoy.astart()
        await envoy.await_until(has_secrets("default", "ROOTCA", "ALL"))
        assert await envoy.acall(uris_held, envoy) == {ID_A}
        assert stack.sds.stats.delta_streams_opened == 3
        assert stack.sds.stats.streams_opened == 0

        first = await held_serials(envoy)
        await stack.spire.rotate_now(ID_A)
        await envoy.await_until(lambda e: e.certs().chain_serials not in (first, set()))
        second = await held_serials(envoy)

        # A new agent: Envoy reconnects and reports what it holds; nothing is resent.
        await stack.stop_agent()
        agent = await stack.start_agent()
        await eventually(lambda: agent.sds.stats.delta_streams_opened == 3
                         and agent.sds.stats.repushes_avoided >= 3,
                         what="Envoy to reconnect and be found up to date")
        assert agent.sds.stats.resources_sent == 0
        assert await held_serials(envoy) == second
        await stack.spire.rotate_now(ID_A)
        await envoy.await_until(lambda e: e.certs().chain_serials not in (second, set()))
        assert agent.sds.stats.nacks == 0


# --- workload:<pod uid> ---------------------------------------------------------------

@pytest.mark.root
async def test_workload_names_for_a_trusted_proxy_only(work_dir: Path,
                                                        as_user: AsUser) -> None:
    needs_root()
    with fake_pod() as web:
        sleep = shutil.which("sleep") or "/bin/sleep"
        sleeper = subprocess.Popen([str(pod_launcher(web, work_dir, sleep)), "60"])  # noqa: ASYNC220
        web.processes.append(sleeper)  # killed (and reaped) with the pod
        name = f"workload:{web.pod_uid}"
        entries = [entry(PROXY_ID, f"unix:uid:{UID_A}"), entry(ID_B, f"unix:uid:{UID_B}"),
                   entry(WEB_ID, f"k8s:pod-uid:{web.pod_uid}")]
        async with running(work_dir, entries, trusted_proxies=(PROXY_ID,)) as stack:
            config = sds_bootstrap(stack.sds_socket, tls_certificates=["default", name],
                                   validation_contexts=[])
            proxy = as_user(config, UID_A)
            stranger = as_user(config, UID_B)
            await asyncio.gather(proxy.astart(), stranger.astart(wait_ready=False))
            await proxy.await_until(has_secrets("default", name))
            assert await proxy.acall(uris_held, proxy) == {PROXY_ID, WEB_ID}

            await stranger.await_until(has_secrets("default"))
            await eventually(lambda: stack.sds.stats.refused["PERMISSION_DENIED"] >= 1,
                             what="the stranger to be refused")
            assert await stranger.acall(stranger.sds_counter, name, "update_success") == 0
            assert await stranger.acall(uris_held, stranger) == {ID_B}
            # The delegate itself is no trusted proxy either.
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await fetch(stack.sds_socket, [name])
            assert caught.value.code() is grpc.StatusCode.PERMISSION_DENIED
