"""Fixtures for the SDS server: dev-spire + the whole agent in-process, a scripted cache
for protocol tests, real Envoys, and helpers to start Envoy inside a fake pod."""

from __future__ import annotations

import asyncio
import dataclasses
import datetime
import itertools
import json
import os
import shlex
import shutil
import tempfile
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509.oid import NameOID
from envoy.service.secret.v3 import sds_pb2_grpc

from agent.cache.keys import WorkloadKey
from agent.cache.watch import CacheState, StatePublisher, Watch
from agent.config import AgentSettings, HostPort, ReconnectSettings
from agent.devspire import DevSpire, DevSpireSettings
from agent.model import X509Svid
from agent.runner import Agent
from agent.sds.limits import SdsLimits
from agent.sds.server import SdsServer, SdsSettings
from agent.sds.view import ViewSettings
from tests.envoyproc import EnvoyProcess, envoy_binary, envoy_factory
from tests.podcgroups import FakePod
from tests.sds.pki import MintedCa, make_ca, make_svid
from tests.waiting import eventually

__all__ = ["envoy_factory"]

TD = "example.org"
DELEGATE = f"spiffe://{TD}/spiffe-delegate"
PROXY_ID = f"spiffe://{TD}/ns/zarf/sa/registry-proxy"
REGISTRY_ID = f"spiffe://{TD}/ns/zarf/sa/zarf-registry"
SELF_EXE = os.readlink("/proc/self/exe")
FAST = ReconnectSettings(initial=0.02, maximum=0.2, reset_after=1.0)
ANY_PORT = HostPort("127.0.0.1", 0)
# Uids that name Envoys in entries (unix:uid:N); nobody needs to exist in /etc/passwd.
UID_A, UID_B = 2101, 2102


def entry(spiffe_id: str, *selectors: str, **extra: Any) -> dict[str, Any]:
    """A registration entry in `spire-server entry create -data` shape."""
    pairs = [dict(zip(("type", "value"), s.split(":", 1), strict=True)) for s in selectors]
    return {"spiffe_id": spiffe_id, "parent_id": f"spiffe://{TD}/spire/agent/dev",
            "selectors": pairs, **extra}


def delegate_entry() -> dict[str, Any]:
    # The path selector keeps root-run Envoys (unix:uid:0 too) from matching the delegate.
    return entry(DELEGATE, f"unix:uid:{os.getuid()}", f"unix:path:{SELF_EXE}")


def short_dir(prefix: str) -> Path:
    """A directory under /tmp that other uids can traverse (socket paths stay short)."""
    path = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    path.chmod(0o755)
    return path


@pytest.fixture
def work_dir() -> Iterator[Path]:
    path = short_dir("sds-")
    yield path
    shutil.rmtree(path, ignore_errors=True)


@dataclass
class Stack:
    """dev-spire and the agent, both on the test's event loop."""

    work: Path
    spire: DevSpire
    spire_settings: DevSpireSettings
    entries_path: Path
    agent_settings: AgentSettings
    agent: Agent | None = None
    extra_entries: list[dict[str, Any]] = field(default_factory=list)

    @property
    def sds_socket(self) -> Path:
        return self.agent_settings.sds_socket

    @property
    def sds(self) -> SdsServer:
        assert self.agent is not None, "the agent is not running"
        return self.agent.sds

    async def set_entries(self, *entries: dict[str, Any]) -> None:
        before = self.spire.stats.entries_reloads
        write_entries(self.entries_path, entries)
        await eventually(lambda: self.spire.stats.entries_reloads > before,
                         what="dev-spire to reload its entries")

    async def start_agent(self, *, follow_own_identity: bool = False, **changes: Any) -> Agent:
        settings = dataclasses.replace(self.agent_settings, **changes)
        self.agent = Agent(settings, follow_own_identity=follow_own_identity)
        await self.agent.start()
        return self.agent

    async def stop_agent(self) -> None:
        if self.agent is not None:
            await self.agent.close()
            self.agent = None


def write_entries(path: Path, entries: Sequence[dict[str, Any]]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"entries": [delegate_entry(), *entries]}))
    os.replace(tmp, path)


async def make_stack(work: Path, entries: Sequence[dict[str, Any]] = (),
                     **agent_changes: Any) -> Stack:
    entries_path = work / "entries.json"
    write_entries(entries_path, entries)
    spire_settings = DevSpireSettings(socket_path=str(work / "admin.sock"), trust_domain=TD,
                                      entries_path=str(entries_path),
                                      authorized_delegates=(DELEGATE,), reload_interval=0.05)
    spire = DevSpire(spire_settings)
    await spire.start()
    # Port 0: agents of tests running at once (and on one host) never clash on ports.
    settings = AgentSettings(spire_admin_socket=work / "admin.sock",
                             sds_socket=work / "sds.sock", trust_domain=TD, reconnect=FAST,
                             shutdown_grace=2.0, health_address=ANY_PORT,
                             metrics_address=ANY_PORT)
    settings = dataclasses.replace(settings, **agent_changes)
    return Stack(work, spire, spire_settings, entries_path, settings)


@pytest.fixture
async def stack(work_dir: Path) -> AsyncIterator[Stack]:
    """dev-spire with only the delegate's entry, and a running agent (trust domain TD)."""
    harness = await make_stack(work_dir)
    await harness.start_agent()
    yield harness
    await harness.stop_agent()
    await harness.spire.stop(grace=0)


# --- a scripted cache -----------------------------------------------------------------

class FakeCache:
    """Hands out real Watches over StatePublishers the test fills: ``publish(...)`` sets
    the state of one key, or (``key=None``) of every key, present and future."""

    def __init__(self) -> None:
        self._versions = itertools.count(1)
        self.publishers: dict[WorkloadKey, StatePublisher] = {}
        self.default: dict[str, Any] | None = None
        self.watched: list[WorkloadKey] = []
        self.open_watches: set[Watch] = set()

    def watch(self, key: WorkloadKey, *, pidfd: int | None = None) -> Watch:
        publisher = self.publishers.get(key)
        if publisher is None:
            publisher = self.publishers[key] = StatePublisher(self._versions)
            if self.default is not None:
                publisher.publish(**self.default)
        self.watched.append(key)
        watch = Watch(key, publisher, self.open_watches.discard)
        self.open_watches.add(watch)
        return watch

    def publish(self, svids: Sequence[X509Svid], bundles: Mapping[str, tuple[bytes, ...]],
                *, federated: Mapping[str, tuple[bytes, ...]] | None = None,
                key: WorkloadKey | None = None, trust_domain: str = "") -> CacheState | None:
        kwargs: dict[str, Any] = {"svids": tuple(svids), "bundles": dict(bundles),
                                  "federated_bundles": dict(federated or {}),
                                  "trust_domain": trust_domain}
        if key is not None:
            publisher = self.publishers.setdefault(key, StatePublisher(self._versions))
            return publisher.publish(**kwargs)
        self.default = kwargs
        states = [p.publish(**kwargs) for p in self.publishers.values()]
        return next((s for s in states if s is not None), None)

    def close(self) -> None:
        for publisher in self.publishers.values():
            publisher.close()


@dataclass(frozen=True)
class Pki:
    ca: MintedCa
    other: MintedCa

    @property
    def bundles(self) -> dict[str, tuple[bytes, ...]]:
        return {self.ca.key_name: (self.ca.der,)}

    def svid(self, spiffe_id: str = PROXY_ID, **kwargs: Any) -> X509Svid:
        return make_svid(self.ca, spiffe_id, **kwargs)


def svid_with_key(ca: MintedCa, spiffe_id: str, key: Any) -> X509Svid:
    """A well-formed X.509-SVID whose certificate and key are ``key``'s (any key type)."""
    now = datetime.datetime.now(datetime.UTC).replace(microsecond=0)
    not_after = now + datetime.timedelta(hours=1)
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "SPIRE")]))
            .issuer_name(ca.cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=1))
            .not_valid_after(not_after)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(True, False, True, False, False, False, False, False,
                                         False), critical=True)
            .add_extension(x509.SubjectAlternativeName(
                [x509.UniformResourceIdentifier(spiffe_id)]), critical=False)
            .sign(ca.key, hashes.SHA256()))
    return X509Svid(spiffe_id=spiffe_id,
                    cert_chain=(cert.public_bytes(serialization.Encoding.DER),),
                    private_key=key.private_bytes(serialization.Encoding.DER,
                                                  serialization.PrivateFormat.PKCS8,
                                                  serialization.NoEncryption()),
                    expires_at=int(not_after.timestamp()))


@pytest.fixture(scope="session")
def pki() -> Pki:
    return Pki(make_ca(TD), make_ca("partner.test"))


@dataclass
class Scripted:
    """An SdsServer over a FakeCache, on a real socket."""

    cache: FakeCache
    server: SdsServer
    socket: Path

    def channel(self) -> grpc.aio.Channel:
        return grpc.aio.insecure_channel(f"unix:{self.socket}")

    def stub(self, channel: grpc.aio.Channel) -> Any:
        return sds_pb2_grpc.SecretDiscoveryServiceStub(channel)


async def scripted_server(work: Path, *, trusted: Sequence[str] = (),
                          fetch_timeout: float = 2.0, trust_domain: str | None = TD,
                          limits: SdsLimits | None = None) -> Scripted:
    cache = FakeCache()
    socket = work / "sds.sock"
    server = SdsServer(SdsSettings(socket, view=ViewSettings(
        trust_domain=trust_domain, trusted_proxies=frozenset(trusted)),
        fetch_timeout=fetch_timeout, limits=limits if limits is not None else SdsLimits()),
        cache)
    await server.start()
    return Scripted(cache, server, socket)


@pytest.fixture
async def scripted(work_dir: Path) -> AsyncIterator[Scripted]:
    harness = await scripted_server(work_dir)
    yield harness
    harness.cache.close()
    await harness.server.stop(grace=1)


# --- Envoy in a pod -------------------------------------------------------------------

def pod_launcher(pod: FakePod, directory: Path, program: str | Path | None = None,
                 container_id: str | None = None) -> Path:
    """:meth:`FakePod.launcher` for ``program``, by default the real Envoy: an executable
    that runs it inside the pod from its first instruction."""
    return pod.launcher(directory, program if program is not None else envoy_binary(),
                        container_id)


AsUser = Callable[..., EnvoyProcess]


@pytest.fixture
def as_user(envoy_factory: Callable[..., EnvoyProcess]) -> Iterator[AsUser]:
    """``as_user(config, uid, **kwargs)``: an unstarted Envoy (from ``envoy_factory``) that
    will run as ``uid`` (gid ``uid``, no other groups).

    The switch happens in a ``setpriv`` wrapper, not through ``Popen(user=...)``: with a
    user, Popen must fork() instead of vfork(), and gRPC's fork handlers in a process with
    gRPC threads can crash the child before it execs (seen as Envoy dying with SIGBUS or
    SIGSEGV and an event-engine error in its log)."""
    made: list[Path] = []

    def make(config: Any, uid: int, **kwargs: Any) -> EnvoyProcess:
        workdir = short_dir("envoy-")
        made.append(workdir)
        os.chown(workdir, uid, uid)
        wrapper = workdir / "envoy-as-user"
        wrapper.write_text("#!/bin/sh\n"
                           f"exec setpriv --reuid={uid} --regid={uid} --clear-groups "
                           f'{shlex.quote(str(envoy_binary()))} "$@"\n')
        wrapper.chmod(0o755)
        return envoy_factory(config, binary=wrapper, workdir=workdir, **kwargs)

    yield make
    for directory in made:
        shutil.rmtree(directory, ignore_errors=True)


def uris_held(envoy: EnvoyProcess) -> set[str]:
    return {uri for cert in envoy.certs().chain_certs for uri in cert.uris}


async def held_serials(envoy: EnvoyProcess) -> set[int]:
    serials: set[int] = await envoy.acall(lambda: envoy.certs().chain_serials)
    return serials


def needs_root() -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root (runs Envoy under other uids / in pod cgroups)")


async def settle(*awaitables: Any) -> None:
    await asyncio.gather(*awaitables)
