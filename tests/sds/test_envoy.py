"""The builders and the harness against a real Envoy.

``ScaffoldSds`` below is throwaway scaffolding to prove the Secret builders and
``tests/envoyproc.py``: a bare SDS v3 server (state of the world per stream, minimal nonce
handling). It is not the product's SDS server and must not grow into one.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml
from envoy.service.discovery.v3 import discovery_pb2
from envoy.service.secret.v3 import sds_pb2_grpc

from agent.model import X509Svid
from agent.sds.names import SdsNames
from agent.sds.resources import SECRET_TYPE_URL, select_secrets, use_spiffe_validator
from tests.envoyproc import (
    EnvoyProcess,
    EnvoyStartError,
    envoy_binary,
    sds_bootstrap,
    validate_config,
)
from tests.sds.conftest import FEDERATED_TD, LOCAL_TD, Pki
from tests.sds.pki import leaf, make_svid
from tests.waiting import eventually

DEPLOY = Path(__file__).resolve().parents[2] / "deploy" / "envoy"

Build = Callable[[Sequence[str], Any], Iterable[Any]]
_END = object()  # the client closed its side of the stream


class ScaffoldSds(sds_pb2_grpc.SecretDiscoveryServiceServicer):  # type: ignore[misc]
    """StreamSecrets only: answers each stream's names with ``build(names, node)``.

    A request echoing the last nonce with the same names is an ACK or NACK: recorded, not
    answered. ``push`` bumps the version and re-sends every stream its names.
    """

    def __init__(self, build: Build) -> None:
        self.build = build
        self.version = 0
        self.requests: list[Any] = []
        self.sent: list[tuple[tuple[str, ...], Any]] = []
        self._streams: set[asyncio.Queue[Any]] = set()

    def push(self, build: Build | None = None) -> None:
        if build is not None:
            self.build = build
        self.version += 1
        for queue in self._streams:
            queue.put_nowait(None)

    async def StreamSecrets(self, request_iterator: AsyncIterator[Any],
                            context: Any) -> AsyncIterator[Any]:
        queue: asyncio.Queue[Any] = asyncio.Queue()
        self._streams.add(queue)

        async def read() -> None:
            try:
                async for request in request_iterator:
                    queue.put_nowait(request)
            finally:
                queue.put_nowait(_END)

        reader = asyncio.create_task(read())
        names: list[str] | None = None
        node = None
        last_nonce = ""
        try:
            while True:
                item = await queue.get()
                if item is _END:
                    return
                if item is None:
                    if names is None:
                        continue
                else:
                    self.requests.append(item)
                    if item.HasField("node"):
                        node = item.node
                    if last_nonce and item.response_nonce != last_nonce:
                        continue  # stale
                    if names is not None and set(item.resource_names) == set(names):
                        continue  # ACK or NACK of what we sent
                    names = list(item.resource_names)
                response = discovery_pb2.DiscoveryResponse(
                    version_info=str(self.version), nonce=secrets.token_hex(4),
                    type_url=SECRET_TYPE_URL)
                for secret in self.build(names, node):
                    response.resources.add().Pack(secret)
                last_nonce = response.nonce
                self.sent.append((tuple(names), response))
                yield response
        finally:
            reader.cancel()
            self._streams.discard(queue)

    def last_sent(self, name: str) -> Any:
        return [response for names, response in self.sent if name in names][-1]

    def nacks(self, name: str) -> list[Any]:
        return [r for r in self.requests
                if name in r.resource_names and r.HasField("error_detail")]


def builder(svids: Sequence[X509Svid], bundles: Mapping[str, tuple[bytes, ...]]) -> Build:
    def build(names: Sequence[str], node: Any) -> Iterable[Any]:
        return select_secrets(names, svids, bundles, LOCAL_TD,
                              spiffe_validator=use_spiffe_validator(node, SdsNames())).secrets
    return build


async def serve(scaffold: ScaffoldSds, socket: Path) -> grpc.aio.Server:
    server = grpc.aio.server()
    sds_pb2_grpc.add_SecretDiscoveryServiceServicer_to_server(scaffold, server)
    server.add_insecure_port(f"unix:{socket}")
    await server.start()
    return server


# --- offline validation -------------------------------------------------------------

@pytest.mark.parametrize("name", ["node-proxy.yaml", "registry-side.yaml"])
def test_deploy_config_validates(name: str, tmp_path: Path) -> None:
    result = validate_config(DEPLOY / name, tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "OK" in result.stdout + result.stderr


def test_validate_rejects_a_broken_config(tmp_path: Path) -> None:
    text = (DEPLOY / "node-proxy.yaml").read_text()
    broken = text.replace("match_typed_subject_alt_names", "match_typed_subject_alt_nams")
    assert broken != text
    result = validate_config(broken, tmp_path)
    assert result.returncode != 0


def test_node_proxy_pins_the_registry_and_uses_sds_names() -> None:
    text = (DEPLOY / "node-proxy.yaml").read_text()
    for needle in ("name: default", "name: ALL", "san_type: URI", "max_connection_duration",
                   "path: /run/spiffe-delegate/sds.sock", "initial_fetch_timeout",
                   "retry_back_off", "set_node_on_first_message_only: true",
                   "port_value: 5000", '"::1"'):
        assert needle in text, needle


@pytest.mark.parametrize("api_type", ["GRPC", "DELTA_GRPC"])
def test_harness_bootstrap_validates(api_type: str, tmp_path: Path) -> None:
    config = sds_bootstrap(tmp_path / "sds.sock", api_type=api_type,
                           tls_certificates=["default", "spiffe://example.org/a"],
                           validation_contexts=["ROOTCA", "ALL", "spiffe://example.org"])
    result = validate_config(config, tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr


async def test_harness_reports_a_failed_start_with_the_log(
        envoy_factory: Callable[..., EnvoyProcess], tmp_path: Path) -> None:
    config = sds_bootstrap(tmp_path / "sds.sock")
    del config["node"]["cluster"]
    config["static_resources"]["clusters"][0]["type"] = "NOT_A_TYPE"
    envoy = envoy_factory(config)
    with pytest.raises(EnvoyStartError, match="exited with status") as caught:
        await envoy.astart(timeout=10)
    assert "last lines of" in str(caught.value)
    assert "NOT_A_TYPE" in str(caught.value)


@pytest.mark.root
def test_harness_runs_envoy_as_another_uid(
        envoy_factory: Callable[..., EnvoyProcess], tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root to switch uid")
    nobody = 65534
    envoy = envoy_factory(sds_bootstrap(tmp_path / "none.sock", tls_certificates=[],
                                        validation_contexts=[]), user=nobody)
    envoy.start()
    status = Path(f"/proc/{envoy.pid}/status").read_text()
    uids = next(line for line in status.splitlines() if line.startswith("Uid:")).split()[1:]
    gids = next(line for line in status.splitlines() if line.startswith("Gid:")).split()[1:]
    assert set(uids) == {str(nobody)} and set(gids) == {str(nobody)}, status
    assert envoy.stop() == 0


# --- a real Envoy fed by the builders ---------------------------------------------------

CERT_NAMES = ["default", f"spiffe://{LOCAL_TD}/ns/zarf/sa/second"]
CA_NAMES = ["ROOTCA", "ALL", f"spiffe://{FEDERATED_TD}"]


async def test_envoy_holds_the_secrets_and_rejects_a_mismatched_key(
        pki: Pki, tmp_path: Path, envoy_factory: Callable[..., EnvoyProcess]) -> None:
    assert pki.second.spiffe_id == CERT_NAMES[1]
    scaffold = ScaffoldSds(builder([pki.proxy, pki.second], pki.bundles))
    socket = tmp_path / "sds.sock"
    server = await serve(scaffold, socket)
    try:
        envoy = envoy_factory(sds_bootstrap(socket, tls_certificates=CERT_NAMES,
                                            validation_contexts=CA_NAMES,
                                            initial_fetch_timeout="5s"))
        await envoy.astart()
        everything = CERT_NAMES + CA_NAMES
        await envoy.await_until(
            lambda e: all(e.sds_counter(n, "update_success") >= 1 for n in everything),
            what=f"update_success for {everything}")

        # One stream per name; the node is on each stream's first request only.
        first = [r for r in scaffold.requests if r.HasField("node")]
        assert sorted(n for r in first for n in r.resource_names) == sorted(everything)
        version = first[0].node.user_agent_build_version.version
        assert (version.major_number, version.minor_number) >= (1, 18)

        certs = await envoy.acall(envoy.certs)
        proxy_leaf, second_leaf = leaf(pki.proxy), leaf(pki.second)
        if not {proxy_leaf.serial_number, second_leaf.serial_number} <= certs.chain_serials:
            raise envoy.fail(f"SVIDs not held: {certs}")
        uris = {u for c in certs.chain_certs for u in c.uris}
        assert {pki.proxy.spiffe_id, pki.second.spiffe_id} <= uris
        held_cas = certs.ca_serials
        all_serials = {ca.cert.serial_number for ca in (pki.local, pki.federated, pki.zulu)}
        assert any({c.serial for c in cas} == all_serials for cas, _ in certs.contexts), (
            "no validation context holds every bundle (ALL)")
        for ca in (pki.local, pki.federated):
            if ca.cert.serial_number not in held_cas:
                raise envoy.fail(f"CA of {ca.trust_domain} not held: {certs}")
        for name in everything:
            assert await envoy.acall(envoy.sds_counter, name, "update_rejected") == 0

        # A rotation is taken: the new serial replaces the old one.
        rotated = make_svid(pki.local, pki.proxy.spiffe_id)
        scaffold.push(builder([rotated, pki.second], pki.bundles))
        await envoy.await_until(
            lambda e: leaf(rotated).serial_number in e.certs().chain_serials,
            what="the rotated SVID in /certs")
        assert proxy_leaf.serial_number not in (await envoy.acall(envoy.certs)).chain_serials
        good_version = str(scaffold.version)

        # A certificate whose key does not match: NACKed, the rotated one stays.
        stranger = make_svid(pki.local, pki.proxy.spiffe_id)
        mismatched = X509Svid(spiffe_id=stranger.spiffe_id, cert_chain=stranger.cert_chain,
                              private_key=rotated.private_key, expires_at=stranger.expires_at)
        scaffold.push(builder([mismatched, pki.second], pki.bundles))
        await envoy.await_until(lambda e: e.sds_counter("default", "update_rejected") >= 1,
                                what="update_rejected for default")
        # The counter moves before the NACK reaches us.
        await eventually(lambda: bool(scaffold.nacks("default")), timeout=5,
                         what="a request with error_detail for default")
        nack = scaffold.nacks("default")[-1]
        assert nack.version_info == good_version       # it stays on the version it had
        assert nack.response_nonce == scaffold.last_sent("default").nonce
        assert nack.error_detail.code == grpc.StatusCode.INTERNAL.value[0]
        assert nack.error_detail.message
        certs = await envoy.acall(envoy.certs)
        assert leaf(rotated).serial_number in certs.chain_serials
        assert leaf(stranger).serial_number not in certs.chain_serials
        # The other secrets were re-sent unchanged and accepted.
        assert await envoy.acall(envoy.sds_counter, CERT_NAMES[1], "update_rejected") == 0
    finally:
        await server.stop(grace=None)


async def test_node_metadata_switches_envoy_to_trusted_ca(
        pki: Pki, tmp_path: Path, envoy_factory: Callable[..., EnvoyProcess]) -> None:
    scaffold = ScaffoldSds(builder([pki.proxy], pki.bundles))
    socket = tmp_path / "sds.sock"
    server = await serve(scaffold, socket)
    try:
        envoy = envoy_factory(sds_bootstrap(
            socket, tls_certificates=["default"], validation_contexts=["ROOTCA"],
            node_metadata={"disable_spiffe_cert_validation": "true"}))
        await envoy.astart()
        await envoy.await_until(lambda e: e.sds_counter("ROOTCA", "update_success") >= 1,
                                what="ROOTCA accepted")
        active = await envoy.acall(envoy.active_secrets)
        context = active["ROOTCA"]["validation_context"]
        assert "trusted_ca" in context and "custom_validator_config" not in context, context
        assert "tls_certificate" in active["default"]
        certs = await envoy.acall(envoy.certs)
        assert pki.local.cert.serial_number in certs.ca_serials
        assert pki.federated.cert.serial_number not in certs.ca_serials
    finally:
        await server.stop(grace=None)


@pytest.mark.parametrize("name", ["node-proxy.yaml", "registry-side.yaml"])
def test_shipped_admin_api_answers_probes_and_refuses_the_rest(name: str,
                                                                tmp_path: Path) -> None:
    """Anything on the host's loopback reaches the admin port (the node proxy runs with
    hostNetwork): it must not be able to stop Envoy or read its configuration."""

    config = yaml.safe_load((DEPLOY / name).read_text())
    config["admin"]["address"]["socket_address"]["port_value"] = 0
    for listener in config["static_resources"]["listeners"]:
        listener["address"]["socket_address"]["port_value"] = 0
    path = tmp_path / "envoy.json"
    path.write_text(json.dumps(config))
    address_file = tmp_path / "admin-address"
    with open(tmp_path / "envoy.log", "wb") as log:
        envoy = subprocess.Popen(
            [str(envoy_binary()), "-c", str(path), "--disable-hot-restart",
             "--use-dynamic-base-id", "--concurrency", "1",
             "--admin-address-path", str(address_file), "-l", "warning"],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = 30.0
        while not address_file.exists() or not address_file.read_text().strip():
            assert envoy.poll() is None, (tmp_path / "envoy.log").read_text()[-2000:]
            deadline -= 0.05
            assert deadline > 0, "Envoy never wrote its admin address"
            time.sleep(0.05)
        base = f"http://{address_file.read_text().strip()}"

        def status(path: str, method: str = "GET") -> int:
            request = urllib.request.Request(base + path, method=method)
            try:
                with urllib.request.urlopen(request, timeout=5) as response:
                    return int(response.status)
            except urllib.error.HTTPError as exc:
                return int(exc.code)

        assert status("/ready") in (200, 503)  # 503 while SDS (no agent here) is pending
        assert status("/stats/prometheus") == 200
        for path in ("/quitquitquit", "/drain_listeners", "/logging?level=trace",
                     "/healthcheck/fail", "/reset_counters"):
            assert status(path, "POST") == 403, path
        for path in ("/config_dump", "/certs", "/clusters", "/stats"):
            assert status(path) == 403, path
        assert envoy.poll() is None, "Envoy stopped"
    finally:
        envoy.kill()
        envoy.wait()
