"""The agent's HTTP endpoints against an in-process dev-spire: a harness that starts the
agent and dev-spire in either order, scrapers' SVIDs from dev-spire, and a raw HTTP/1.1
client (plain or TLS) that reports what the server presented."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import shutil
import ssl
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from agent.config import AgentSettings, HostPort
from agent.devspire import DevSpire, DevSpireSettings
from agent.model import Selector, X509Svid
from agent.runner import Agent
from agent.spire.backoff import BackoffPolicy
from agent.spire.client import DelegatedIdentityClient
from tests.sds_server.conftest import DELEGATE, FAST, SELF_EXE, TD, entry, short_dir

ANY_PORT = HostPort("127.0.0.1", 0)
METRICS_DNS = "spiffe-delegate-metrics.spiffe-delegate.svc"
SCRAPER = f"spiffe://{TD}/ns/monitoring/sa/prometheus"
INTRUDER = f"spiffe://{TD}/ns/default/sa/intruder"
SCRAPER_SELECTORS = ("k8s:ns:monitoring", "k8s:sa:prometheus")
INTRUDER_SELECTORS = ("k8s:ns:default", "k8s:sa:intruder")


def entries() -> list[dict[str, Any]]:
    # The delegate's SVID carries a DNS name, as its entry would for Prometheus' serverName.
    delegate = entry(DELEGATE, f"unix:uid:{os.getuid()}", f"unix:path:{SELF_EXE}",
                     dns_names=[METRICS_DNS])
    return [delegate, entry(SCRAPER, *SCRAPER_SELECTORS), entry(INTRUDER, *INTRUDER_SELECTORS)]


@dataclass
class Harness:
    work: Path
    spire_settings: DevSpireSettings
    spire: DevSpire | None = None
    agents: list[Agent] = field(default_factory=list)

    @property
    def admin_socket(self) -> Path:
        return Path(self.spire_settings.socket_path)

    async def start_spire(self) -> DevSpire:
        assert self.spire is None
        self.spire = DevSpire(self.spire_settings)
        await self.spire.start()
        return self.spire

    async def stop_spire(self) -> None:
        if self.spire is not None:
            await self.spire.stop(grace=0)
            self.spire = None

    def settings(self, **changes: Any) -> AgentSettings:
        base = AgentSettings(spire_admin_socket=self.admin_socket,
                             sds_socket=self.work / "sds.sock", trust_domain=TD,
                             reconnect=FAST, shutdown_grace=2.0, health_address=ANY_PORT,
                             metrics_address=ANY_PORT)
        return dataclasses.replace(base, **changes)

    async def start_agent(self, *, follow_own_identity: bool = True, **changes: Any) -> Agent:
        agent = Agent(self.settings(**changes), follow_own_identity=follow_own_identity)
        await agent.start()
        self.agents.append(agent)
        return agent

    async def close(self) -> None:
        for agent in self.agents:
            await agent.close()
        await self.stop_spire()

    async def svid_for(self, *selectors: str) -> X509Svid:
        """The X.509-SVID dev-spire issues to a workload with these selectors."""
        async with DelegatedIdentityClient(
                self.admin_socket,
                backoff=BackoffPolicy(initial=0.02, maximum=0.2, reset_after=1.0)) as client:
            stream = client.subscribe_x509_svids(
                selectors=[Selector.parse(s) for s in selectors])
            async for update in stream:
                if update.svids:
                    return update.svids[0]
        raise AssertionError(f"dev-spire issued nothing to {selectors}")

    def bundle(self) -> bytes:
        assert self.spire is not None
        return self.spire.bundle_der()


@pytest.fixture
def work_dir() -> Iterator[Path]:
    path = short_dir("http-")
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
async def harness(work_dir: Path) -> AsyncIterator[Harness]:
    entries_path = work_dir / "entries.json"
    entries_path.write_text(json.dumps({"entries": entries()}))
    settings = DevSpireSettings(socket_path=str(work_dir / "admin.sock"), trust_domain=TD,
                                entries_path=str(entries_path),
                                authorized_delegates=(DELEGATE,), reload_interval=0.05)
    made = Harness(work_dir, settings)
    yield made
    await made.close()


# --- PEM helpers ----------------------------------------------------------------------

def pem_chain(ders: tuple[bytes, ...]) -> bytes:
    return b"".join(x509.load_der_x509_certificate(der).public_bytes(serialization.Encoding.PEM)
                    for der in ders)


def pem_key(der: bytes) -> bytes:
    key = serialization.load_der_private_key(der, None)
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def client_context(ca: bytes | str, svid: X509Svid | None, key_dir: Path, *,
                   tls12: bool = False, hostname: bool = False) -> ssl.SSLContext:
    """A scraper's context: trusts ``ca`` (DER bytes or PEM text), presents ``svid``."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = hostname
    context.load_verify_locations(cadata=ca)
    if tls12:
        context.maximum_version = ssl.TLSVersion.TLSv1_2
    if svid is not None:
        key_dir.mkdir(parents=True, exist_ok=True)
        cert_file, key_file = key_dir / "client.crt", key_dir / "client.key"
        cert_file.write_bytes(pem_chain(svid.cert_chain))
        key_file.write_bytes(pem_key(svid.private_key))
        context.load_cert_chain(cert_file, key_file)
    return context


# --- a raw HTTP/1.1 client ------------------------------------------------------------

@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes
    server_cert: x509.Certificate | None = None

    def json(self) -> Any:
        return json.loads(self.body)


def parse_reply(raw: bytes, server_cert: x509.Certificate | None = None) -> Reply:
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ")[1])
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return Reply(status, headers, body, server_cert)


@dataclass
class Connection:
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter

    @property
    def server_cert(self) -> x509.Certificate | None:
        ssl_object = self.writer.get_extra_info("ssl_object")
        if ssl_object is None:
            return None
        return x509.load_der_x509_certificate(ssl_object.getpeercert(binary_form=True))

    async def request(self, path: str = "/", method: str = "GET") -> Reply:
        self.writer.write(f"{method} {path} HTTP/1.1\r\nHost: agent\r\n\r\n".encode())
        await self.writer.drain()
        raw = await asyncio.wait_for(self.reader.read(), 10)
        cert = self.server_cert
        self.writer.close()
        return parse_reply(raw, cert)

    def close(self) -> None:
        self.writer.close()


async def connect(address: HostPort, context: ssl.SSLContext | None = None,
                  server_hostname: str | None = None) -> Connection:
    kwargs: dict[str, Any] = {}
    if context is not None:
        kwargs = {"ssl": context, "server_hostname": server_hostname or ""}
    reader, writer = await asyncio.wait_for(
        asyncio.open_connection(address.host, address.port, **kwargs), 10)
    return Connection(reader, writer)


async def get(address: HostPort | None, path: str, *, method: str = "GET",
              context: ssl.SSLContext | None = None,
              server_hostname: str | None = None) -> Reply:
    assert address is not None, "the endpoint is disabled"
    connection = await connect(address, context, server_hostname)
    return await connection.request(path, method)


async def eventually_async(condition: Callable[[], Awaitable[bool]], timeout: float = 10.0,  # noqa: ASYNC109
                           what: str = "condition") -> None:
    """:func:`tests.waiting.eventually` for a condition that must await (an HTTP request)."""
    deadline = time.monotonic() + timeout
    while not await condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.05)
