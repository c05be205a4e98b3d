"""The registry chain, for real, on one machine: dev-spire -> spiffe-delegate -> three
Envoys -> a real registry.

::

    container runtime --HTTP--> node proxy Envoy --mTLS (proxy SVID)--> registry-side Envoy
    CI (skopeo)       --HTTP--> CI Envoy         --mTLS (CI SVID)----->   (RBAC by SPIFFE ID)
                                                                       --mTLS (its SVID)-->
                                                                          docker-registry

Every Envoy takes its certificate and bundles from spiffe-delegate over SDS; the Envoy
configs are the shipped ones (``deploy/envoy``) with addresses moved. The registry itself
requires a client certificate that chains to the SPIRE bundle, so nothing reaches it but
the registry-side Envoy. As root, each Envoy runs inside its own pod's cgroups and is
attested by ``k8s:pod-uid``; otherwise each runs from its own hard link of the Envoy binary
and is attested by ``unix:uid`` + ``unix:path``. Everything listens on loopback only
(127.0.0.1, or ::1 with ``family="ipv6"``; the node proxy listens on both), on ports
chosen free; every process is started and ended by its PID (:class:`Supervisor`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import shutil
import socket
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import grpc
from envoy.extensions.transport_sockets.tls.v3 import secret_pb2, tls_spiffe_validator_config_pb2
from envoy.service.discovery.v3 import discovery_pb2
from envoy.service.secret.v3 import sds_pb2_grpc

from agent.demo.envoy import (
    CertDetails,
    EnvoyAdmin,
    envoy_argv,
    envoy_binary,
    node_proxy_config,
    registry_side_config,
    write_config,
)
from agent.demo.errors import DemoDependencyMissing
from agent.demo.image import OciImage, build_oci_layout
from agent.demo.processes import ChildFailed, Supervisor
from agent.demo.registry import (
    RegistryTls,
    issue_server_certificate,
    registry_argv,
    registry_binary,
    write_registry_config,
)
from agent.demo.skopeo import push_image, skopeo_binary
from agent.errors import SpiffeDelegateError
from agent.podsim import FakePod, create_pod
from agent.sds.resources import SECRET_TYPE_URL

__all__ = ["CI_ID", "DELEGATE_ID", "PROXY_ID", "REGISTRY_ID", "Chain", "ChainSettings",
           "Role", "free_port"]

TRUST_DOMAIN = "example.org"
PROXY_ID = f"spiffe://{TRUST_DOMAIN}/ns/zarf/sa/registry-proxy"
REGISTRY_ID = f"spiffe://{TRUST_DOMAIN}/ns/zarf/sa/zarf-registry"
CI_ID = f"spiffe://{TRUST_DOMAIN}/ns/ci/sa/image-publisher"
DELEGATE_ID = f"spiffe://{TRUST_DOMAIN}/ns/spiffe-delegate/sa/spiffe-delegate"
REPOSITORY = "demo/hello"
TAG = "1.0"

Family = Literal["ipv4", "ipv6"]
Attestation = Literal["auto", "pods", "unix"]

_MINTED = re.compile(r"minted X509-SVID (\S+) serial ([0-9a-f]+)")


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on ``host`` right now (and on the other loopback, where there is
    one: the node proxy listens on both)."""
    for _ in range(100):
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        with socket.socket(family) as first:
            first.bind((host, 0))
            port = int(first.getsockname()[1])
            other = "::1" if family == socket.AF_INET else "127.0.0.1"
            other_family = socket.AF_INET if family == socket.AF_INET6 else socket.AF_INET6
            try:
                with socket.socket(other_family) as second:
                    second.bind((other, port))
            except OSError as exc:
                if exc.errno == 99:  # EADDRNOTAVAIL: no such loopback here
                    return port
                continue
            return port
    raise OSError("no free port found")


def url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


@dataclass(frozen=True)
class ChainSettings:
    """``workdir``: where every file goes (removed by the caller). ``svid_ttl``: seconds;
    dev-spire rotates at half. ``attestation``: ``pods`` (root: real pod cgroups),
    ``unix`` (uid + binary path) or ``auto`` (pods when possible)."""

    workdir: Path
    family: Family = "ipv4"
    svid_ttl: float = 10.0
    attestation: Attestation = "auto"
    python: str = sys.executable
    grace: float = 5.0

    @property
    def loopback(self) -> str:
        return "::1" if self.family == "ipv6" else "127.0.0.1"


@dataclass
class Role:
    """One Envoy of the chain and the identity it should hold."""

    name: str          # "node-proxy", "registry-side", "ci-proxy"
    title: str         # for people
    spiffe_id: str
    port: int
    admin: EnvoyAdmin
    selectors: list[dict[str, str]] = field(default_factory=list)
    binary: Path | None = None


class Chain:
    """Start with ``await chain.start()``, end with ``await chain.stop()`` (also on error)."""

    def __init__(self, settings: ChainSettings, *,
                 on_progress: Callable[[str], None] | None = None) -> None:
        self.settings = settings
        self.work = settings.workdir
        self._say = on_progress or (lambda _text: None)
        self.supervisor = Supervisor(self.work)
        self.host = settings.loopback
        self.spire_socket = self.work / "spire-admin.sock"
        self.sds_socket = self.work / "sds.sock"
        self.attestation = ""  # how the Envoys are attested, for people
        self.image: OciImage | None = None
        self.registry_port = free_port(self.host)
        self.registry_ca: Path | None = None
        self.bundle_pem: Path = self.work / "bundle.pem"
        self._pods: list[FakePod] = []
        self.roles = {
            name: Role(name, title, spiffe_id, free_port(self.host),
                       EnvoyAdmin(self.work / f"{name}.admin"))
            for name, title, spiffe_id in (
                ("registry-side", "registry-side Envoy", REGISTRY_ID),
                ("node-proxy", "node registry proxy", PROXY_ID),
                ("ci-proxy", "CI Envoy", CI_ID))}

    # --- addresses ------------------------------------------------------------------------

    def base_url(self, role: str) -> str:
        return f"http://{url_host(self.host)}:{self.roles[role].port}"

    @property
    def proxy_url(self) -> str:
        return self.base_url("node-proxy")

    def registry_address(self, role: str) -> str:
        """``host:port`` for skopeo (``[::1]:port`` for IPv6)."""
        return f"{url_host(self.host)}:{self.roles[role].port}"

    # --- lifecycle ------------------------------------------------------------------------

    async def start(self) -> None:
        for check in (envoy_binary, registry_binary, skopeo_binary):
            check()
        self.work.mkdir(parents=True, exist_ok=True)
        self.work.chmod(0o700)
        await self._prepare_attestation()
        self._write_entries()
        await self.start_spire()
        await self.start_agent()
        await self._fetch_bundle()
        await self._start_registry()
        for role in self.roles.values():
            await self._start_envoy(role)
        for role in self.roles.values():
            await self.wait_for_identity(role.name)
        self.image = build_oci_layout(self.work / "image", tag=TAG)
        self._say(f"pushing {REPOSITORY}:{TAG} as CI ({CI_ID}) through the CI Envoy")
        await push_image(self.image, self.registry_address("ci-proxy"), REPOSITORY)

    async def stop(self) -> None:
        await self.supervisor.stop_all(grace=self.settings.grace)
        for pod in self._pods:
            with contextlib.suppress(Exception):
                pod.close()
        self._pods.clear()

    # --- attestation ----------------------------------------------------------------------

    async def _prepare_attestation(self) -> None:
        mode = self.settings.attestation
        if mode in ("auto", "pods"):
            try:
                for role in self.roles.values():
                    pod = create_pod()
                    self._pods.append(pod)
                    role.binary = pod.launcher(self.work, envoy_binary())
                    role.selectors = [{"type": "k8s", "value": f"pod-uid:{pod.pod_uid}"}]
                self.attestation = ("pods: each Envoy runs in its own pod cgroup and is "
                                    "attested by k8s:pod-uid")
                return
            except SpiffeDelegateError as exc:
                for pod in self._pods:
                    pod.close()
                self._pods.clear()
                if mode == "pods":
                    raise
                self._say(f"pod cgroups unavailable ({exc.message}); using unix attestation")
        bindir = self.work / "bin"
        bindir.mkdir(exist_ok=True)
        uid = os.geteuid()
        for role in self.roles.values():
            link = bindir / f"envoy-{role.name}"
            try:
                os.link(envoy_binary(), link)
            except OSError:
                shutil.copy2(envoy_binary(), link)
            role.binary = link
            role.selectors = [{"type": "unix", "value": f"uid:{uid}"},
                              {"type": "unix", "value": f"path:{link}"}]
        self.attestation = (f"unix: every Envoy runs as uid {uid} from its own copy of the "
                            "binary and is attested by unix:uid + unix:path")

    def _write_entries(self) -> None:
        parent = f"spiffe://{TRUST_DOMAIN}/spire/agent/dev"
        ttl = max(1, round(self.settings.svid_ttl))
        python = os.path.realpath(self.settings.python)
        entries = [{"spiffe_id": DELEGATE_ID, "parent_id": parent, "x509_svid_ttl": ttl,
                    "selectors": [{"type": "unix", "value": f"uid:{os.geteuid()}"},
                                  {"type": "unix", "value": f"path:{python}"}]}]
        entries += [{"spiffe_id": role.spiffe_id, "parent_id": parent, "x509_svid_ttl": ttl,
                     "selectors": role.selectors} for role in self.roles.values()]
        path = self.work / "entries.json"
        path.write_text(json.dumps({"entries": entries}, indent=1))

    # --- dev-spire and the agent ----------------------------------------------------------

    async def start_spire(self) -> None:
        self._say("starting dev-spire (SPIRE-compatible development server; production "
                  "uses SPIRE)")
        argv = [self.settings.python, "-m", "agent", "dev-spire",
                "--socket", str(self.spire_socket), "--trust-domain", TRUST_DOMAIN,
                "--entries", str(self.work / "entries.json"),
                "--authorized-delegate", DELEGATE_ID,
                "--svid-ttl", f"{self.settings.svid_ttl}s", "--reload-interval", "0.2s",
                "--log-format", "json"]
        # Its CA survives a restart, as a SPIRE server's keys do (data_dir).
        argv += ["--data-dir", str(self.work / "dev-spire-data")]
        await self.supervisor.start("dev-spire", argv)
        await self._wait(lambda: self.spire_socket.exists(), "dev-spire", "its socket")

    async def start_agent(self) -> None:
        self._say("starting spiffe-delegate run")
        argv = [self.settings.python, "-m", "agent", "run",
                "--spire-admin-socket", str(self.spire_socket),
                "--sds-socket", str(self.sds_socket), "--trust-domain", TRUST_DOMAIN,
                "--reconnect-max", "1s", "--shutdown-grace", "2s",
                "--health-address", f"{url_host(self.host)}:{free_port(self.host)}",
                "--metrics-address", f"{url_host(self.host)}:{free_port(self.host)}"]
        await self.supervisor.start("agent", argv)
        await self._wait(lambda: self.sds_socket.exists(), "agent", "the SDS socket")

    async def restart_spire(self) -> None:
        await self.supervisor.stop("dev-spire", grace=self.settings.grace)
        await self.start_spire()

    async def restart_agent(self) -> int | None:
        """SIGTERM, then a new agent; returns the old one's exit status. A clean exit
        removed the socket file; after an unclean one the stale file is removed here, so that
        the wait for the new agent's socket cannot be fooled by it."""
        status = await self.supervisor.stop("agent", grace=self.settings.grace)
        if status != 0:
            self.sds_socket.unlink(missing_ok=True)
        await self.start_agent()
        return status

    async def _wait(self, condition: Callable[[], bool], child: str, what: str,
                    timeout: float = 30.0) -> None:  # noqa: ASYNC109
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while not condition():
            self.supervisor.check(child)
            if loop.time() > deadline:
                raise ChildFailed(f"{child} did not bring up {what} within {timeout:.0f}s:\n"
                                  f"{self.supervisor[child].log_tail()}")
            await asyncio.sleep(0.05)

    async def _fetch_bundle(self) -> None:
        """The trust bundle (SDS ROOTCA, asked of the agent like any workload would), for
        the registry's client CAs."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 30
        while True:
            self.supervisor.check("agent")
            try:
                pem = await fetch_bundle_pem(self.sds_socket)
                break
            except grpc.aio.AioRpcError as exc:
                if loop.time() > deadline:
                    raise ChildFailed(f"the agent served no ROOTCA: {exc.details()}",
                                      f"see {self.supervisor['agent'].log}") from None
                await asyncio.sleep(0.1)
        self.bundle_pem.write_bytes(pem)

    # --- registry and Envoys --------------------------------------------------------------

    async def _start_registry(self) -> None:
        self._say(f"starting docker-registry on {url_host(self.host)}:{self.registry_port} "
                  "(TLS, client certificates from the SPIRE bundle only)")
        tls_dir = self.work / "registry-tls"
        tls_dir.mkdir(mode=0o700, exist_ok=True)
        ca, cert, key = issue_server_certificate(tls_dir, ["localhost", self.host])
        self.registry_ca = ca
        config = self.work / "registry.yml"
        write_registry_config(config, storage=self.work / "registry-data", host=self.host,
                              port=self.registry_port,
                              tls=RegistryTls(cert, key, (self.bundle_pem,)))
        await self.supervisor.start("registry", registry_argv(config))
        await self._wait(lambda: _listening(self.host, self.registry_port), "registry",
                         "its port")

    async def _start_envoy(self, role: Role) -> None:
        if role.name == "registry-side":
            config = registry_side_config(
                sds_socket=self.sds_socket, admin_host=self.host, listen_host=self.host,
                listen_port=role.port, registry_host=self.host,
                registry_port=self.registry_port, registry_ca=self.registry_ca)
        else:
            side = self.roles["registry-side"]
            config = node_proxy_config(
                sds_socket=self.sds_socket, admin_host=self.host, listen_port=role.port,
                upstream_host=self.host, upstream_port=side.port, node_id=role.name)
        path = write_config(config, self.work / f"{role.name}.json")
        admin_file = self.work / f"{role.name}.admin"
        admin_file.unlink(missing_ok=True)
        role.admin = EnvoyAdmin(admin_file)
        assert role.binary is not None
        self._say(f"starting the {role.title} on {url_host(self.host)}:{role.port}")
        await self.supervisor.start(role.name, envoy_argv(role.binary, path, admin_file))

    async def wait_for_identity(self, name: str, timeout: float = 30.0) -> CertDetails:  # noqa: ASYNC109
        """Waits until the Envoy ``name`` holds an SVID with its SPIFFE ID."""
        role = self.roles[name]
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            self.supervisor.check(name)
            held = await self.held(name)
            if held is not None:
                return held
            if loop.time() > deadline:
                raise ChildFailed(f"the {role.title} did not get {role.spiffe_id} within "
                                  f"{timeout:.0f}s:\n{self.supervisor[name].log_tail()}",
                                  f"see {self.supervisor['agent'].log}")
            await asyncio.sleep(0.1)

    async def held(self, name: str) -> CertDetails | None:
        """The SVID the Envoy ``name`` holds for its own identity now (the newest, if /certs
        lists more than one context), or None."""
        role = self.roles[name]
        try:
            certs = await role.admin.certs()
        except (OSError, ConnectionError, ValueError):
            return None
        mine = [leaf for leaf in certs.leaves() if role.spiffe_id in leaf.uris]
        if not mine:
            return None
        return max(mine, key=lambda leaf: leaf.expiration_time)

    def minted(self) -> dict[str, list[int]]:
        """Serials dev-spire minted, by SPIFFE ID, in order (from its JSON log)."""
        out: dict[str, list[int]] = {}
        child = self.supervisor.children.get("dev-spire")
        if child is None:
            return out
        try:
            lines = child.log.read_text(errors="replace").splitlines()
        except OSError:
            return out
        for line in lines:
            if "minted X509-SVID" not in line:
                continue
            try:
                message = str(json.loads(line).get("msg", ""))
            except ValueError:
                continue
            found = _MINTED.search(message)
            if found:
                out.setdefault(found.group(1), []).append(int(found.group(2), 16))
        return out


def _listening(host: str, port: int) -> bool:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family) as probe:
        probe.settimeout(0.5)
        return probe.connect_ex((host, port)) == 0


async def fetch_bundle_pem(sds_socket: Path, name: str = "ROOTCA") -> bytes:
    """FetchSecrets ``name`` from an SDS server; the PEM of its trusted CAs."""
    async with grpc.aio.insecure_channel(f"unix:{sds_socket}") as channel:
        stub = sds_pb2_grpc.SecretDiscoveryServiceStub(channel)
        response = await stub.FetchSecrets(discovery_pb2.DiscoveryRequest(
            resource_names=[name], type_url=SECRET_TYPE_URL), timeout=5)
    for resource in response.resources:
        secret = secret_pb2.Secret()
        resource.Unpack(secret)
        context = secret.validation_context
        if context.trusted_ca.inline_bytes:
            return bytes(context.trusted_ca.inline_bytes)
        validator = tls_spiffe_validator_config_pb2.SPIFFECertValidatorConfig()
        context.custom_validator_config.typed_config.Unpack(validator)
        return b"".join(bytes(td.trust_bundle.inline_bytes) for td in validator.trust_domains)
    raise DemoDependencyMissing(f"the agent answered no {name}", "see the agent's log")
