"""The registry chain end to end, every part real and in its own process: dev-spire ->
``spiffe-delegate run`` -> node proxy / CI / registry-side Envoys (the shipped configs) ->
Debian's docker-registry (TLS, client certificates from the SPIRE bundle only). Each test
runs over IPv4 and over IPv6 loopback."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import ipaddress
import os
import shutil
import socket
import ssl
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from agent.demo.chain import CI_ID, PROXY_ID, REGISTRY_ID, REPOSITORY, TAG, Chain, ChainSettings
from agent.demo.errors import PushFailed
from agent.demo.image import build_oci_layout
from agent.demo.pull import pull_image
from agent.demo.skopeo import push_image
from agent.demo.traffic import PullLoop, RotationWatch
from agent.model import X509Svid
from agent.sds.resources import pem_certificates, pem_private_key
from tests.spire.pki import Ca
from tests.waiting import eventually

FAMILIES = ["ipv4", "ipv6"]


def _needs(family: str) -> None:
    for tool in ("docker-registry", "skopeo"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not installed (apt-get install {tool}; .ci/setup.sh does)")
    if family == "ipv6":
        try:
            with socket.socket(socket.AF_INET6) as probe:
                probe.bind(("::1", 0))
        except OSError as exc:
            pytest.skip(f"no IPv6 loopback here: {exc}")


@contextlib.asynccontextmanager
async def running_chain(family: str, *, svid_ttl: float = 30.0) -> AsyncIterator[Chain]:
    _needs(family)
    work = Path(tempfile.mkdtemp(prefix="chain-"))
    chain = Chain(ChainSettings(workdir=work, family=family,  # type: ignore[arg-type]
                                svid_ttl=svid_ttl))
    try:
        await chain.start()
        yield chain
    except BaseException:
        for child in chain.supervisor.children.values():
            print(f"--- {child.name} (pid {child.pid}) ---\n{child.log_tail(30)}")
        raise
    finally:
        await chain.stop()
        shutil.rmtree(work, ignore_errors=True)


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def forged_svid(trust_domain: str, spiffe_id: str) -> X509Svid:
    """A valid-looking, current SVID from a CA the chain does not trust."""
    now = _now()
    ca = Ca.root(trust_domain, not_before=now - dt.timedelta(hours=1),
                 not_after=now + dt.timedelta(hours=1))
    return ca.svid(spiffe_id=spiffe_id, not_before=now - dt.timedelta(minutes=5),
                   not_after=now + dt.timedelta(minutes=30))


def tls_attempt(host: str, port: int, work: Path, svid: X509Svid | None, *,
                tls12: bool) -> str:
    """Connects with TLS (presenting ``svid`` if given) and sends GET /v2/. Returns
    "refused: ..." when the server ended the connection before any HTTP answer (TLS 1.2:
    in the handshake; TLS 1.3: the server's alert arrives on the first read), or the HTTP
    status line it got."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE  # we test the server's check of us, not ours of it
    if tls12:
        context.maximum_version = ssl.TLSVersion.TLSv1_2
    if svid is not None:
        cert, key = work / "client.pem", work / "client-key.pem"
        cert.write_bytes(pem_certificates(svid.cert_chain))
        key.write_bytes(pem_private_key(svid.private_key))
        context.load_cert_chain(cert, key)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        with socket.socket(family) as raw:
            raw.settimeout(10)
            raw.connect((host, port))
            with context.wrap_socket(raw) as tls:
                tls.sendall(b"GET /v2/ HTTP/1.1\r\nHost: registry\r\nConnection: close\r\n\r\n")
                answer = tls.recv(4096)
    except (ssl.SSLError, ConnectionResetError, BrokenPipeError) as exc:
        return f"refused: {exc}"
    if not answer:
        return "refused: closed without an answer"
    return answer.split(b"\r\n", 1)[0].decode(errors="replace")


@pytest.mark.root
@pytest.mark.parametrize("family", FAMILIES)
async def test_registry_policy_and_handshakes(family: str) -> None:
    """Pull through the proxy works; a push through it is 403; CI pushes; a client
    without an SVID, or with an SVID from a CA the chain does not trust (another trust
    domain, or a forged CA claiming ours), never gets an HTTP answer from the registry side,
    nor from the registry itself."""
    async with running_chain(family) as chain:
        assert chain.image is not None
        pulled = await pull_image(chain.proxy_url, REPOSITORY, TAG)
        assert pulled.manifest_digest == chain.image.manifest_digest
        for name, spiffe_id in (("node-proxy", PROXY_ID), ("registry-side", REGISTRY_ID),
                                ("ci-proxy", CI_ID)):
            held = await chain.held(name)
            assert held is not None and held.uris == (spiffe_id,)

        with pytest.raises(PushFailed) as refused:
            await push_image(chain.image, chain.registry_address("node-proxy"), "demo/sneaky")
        assert refused.value.denied and refused.value.status == 403, refused.value.message

        other = build_oci_layout(chain.work / "image-2", tag="2.0",
                                 files={"second.txt": b"pushed by CI\n"})
        await push_image(other, chain.registry_address("ci-proxy"), REPOSITORY)
        assert (await pull_image(chain.proxy_url, REPOSITORY, "2.0")).manifest_digest == \
            other.manifest_digest

        side = chain.roles["registry-side"]
        strangers = {
            "no certificate": None,
            "another trust domain": forged_svid("evil.test", "spiffe://evil.test/ci"),
            "a forged CA for our trust domain": forged_svid("example.org", CI_ID),
        }
        for port, what in ((side.port, "registry-side Envoy"),
                           (chain.registry_port, "registry")):
            for label, svid in strangers.items():
                for tls12 in (True, False):
                    outcome = await asyncio.to_thread(tls_attempt, chain.host, port,
                                                      chain.work, svid, tls12=tls12)
                    assert outcome.startswith("refused"), (what, label, tls12, outcome)


def listening_addresses(pids: list[int]) -> set[str]:
    """Every TCP address a LISTEN socket of these processes is bound to ("127.0.0.1:5000",
    "[::1]:5000"), from /proc/<pid>/fd and /proc/net/tcp{,6}."""
    inodes: set[str] = set()
    for pid in pids:
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            with contextlib.suppress(OSError):
                target = os.readlink(fd)
                if target.startswith("socket:["):
                    inodes.add(target[8:-1])
    found: set[str] = set()
    for table, v6 in (("/proc/net/tcp", False), ("/proc/net/tcp6", True)):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] != "0A" or fields[9] not in inodes:  # 0A: LISTEN
                continue
            hex_address, hex_port = fields[1].split(":")
            raw = bytes.fromhex(hex_address)
            # /proc/net prints each 32-bit word in host (little-endian) order.
            words = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
            address = ipaddress.ip_address(words)
            port = int(hex_port, 16)
            found.add(f"[{address}]:{port}" if v6 else f"{address}:{port}")
    return found


@pytest.mark.root
@pytest.mark.parametrize("family", FAMILIES)
async def test_nothing_listens_beyond_loopback(family: str) -> None:
    """Every TCP socket any process of the chain listens on is on 127.0.0.1 or ::1."""
    async with running_chain(family) as chain:
        pids = [child.pid for child in chain.supervisor.children.values()]
        addresses = await asyncio.to_thread(listening_addresses, pids)
        assert addresses, "found no listening sockets at all"
        outside = {a for a in addresses
                   if not a.startswith(("127.0.0.1:", "[::1]:"))}
        assert outside == set(), outside
        # The node proxy listens on both loopbacks, whatever the family.
        port = chain.roles["node-proxy"].port
        assert {f"127.0.0.1:{port}", f"[::1]:{port}"} <= addresses


@pytest.mark.root
@pytest.mark.parametrize("family", FAMILIES)
async def test_ten_rotations_under_a_pull_loop(family: str) -> None:
    """SVIDs rotate every second: after at least 10 rotations of every identity, each
    Envoy's /certs has shown every serial dev-spire minted for it meanwhile, and not one
    pull through the node proxy failed."""
    async with running_chain(family, svid_ttl=2.0) as chain:
        watch = RotationWatch({name: (lambda n=name: chain.held(n)) for name in chain.roles},
                              interval=0.05)
        loop = PullLoop(chain.proxy_url, REPOSITORY, TAG)
        tasks = [asyncio.create_task(watch.run()), asyncio.create_task(loop.run())]
        try:
            await eventually(lambda: all(len(seen) >= 11 for seen in watch.seen.values()),
                             timeout=60, what="10 rotations of every identity")
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        assert loop.counts.failures == [], loop.counts.failures[:5]
        assert loop.counts.ok >= 20

        minted = chain.minted()
        for name, role in chain.roles.items():
            seen = watch.seen[name]
            issued = minted[role.spiffe_id]
            first, last = issued.index(seen[0]), issued.index(seen[-1])
            between = issued[first:last + 1]
            assert len(between) >= 11
            missed = [f"{serial:x}" for serial in between if serial not in seen]
            assert missed == [], f"{role.title} never showed {missed}"


@pytest.mark.root
@pytest.mark.parametrize("family", FAMILIES)
async def test_restarting_dev_spire_then_the_agent_fails_no_request(family: str) -> None:
    """Under a pull loop: dev-spire restarts (same CA, from its data dir; every SVID is
    issued anew and reaches the Envoys), then the agent restarts (the Envoys keep serving
    and reconnect). No pull fails while the current SVIDs are valid."""
    async with running_chain(family, svid_ttl=60.0) as chain:
        loop = PullLoop(chain.proxy_url, REPOSITORY, TAG)
        task = asyncio.create_task(loop.run())
        try:
            await eventually(lambda: loop.counts.ok >= 5, what="pulls before the restarts")
            before = {name: await chain.held(name) for name in chain.roles}

            await chain.restart_spire()
            for name in chain.roles:
                old = before[name]
                assert old is not None
                await _until_rotated(chain, name, old.serial)
            pulled = loop.counts.ok
            await eventually(lambda: loop.counts.ok >= pulled + 5,
                             what="pulls with the reissued SVIDs")

            # SIGTERM: the agent drains and exits 0 (having removed its socket file).
            status = await chain.restart_agent()
            assert status == 0, f"the agent exited with status {status} on SIGTERM"
            pulled = loop.counts.ok
            await eventually(lambda: loop.counts.ok >= pulled + 5,
                             what="pulls after the agent restart")
            # The new agent serves the Envoys: a rotation now still reaches them.
            current = await chain.held("node-proxy")
            assert current is not None
            await chain.restart_spire()
            await _until_rotated(chain, "node-proxy", current.serial)
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        assert loop.counts.failures == [], loop.counts.failures[:5]


async def _until_rotated(chain: Chain, name: str, old_serial: int) -> None:
    async def changed() -> bool:
        held = await chain.held(name)
        return held is not None and held.serial != old_serial

    for _ in range(300):
        if await changed():
            return
        await asyncio.sleep(0.1)
    raise AssertionError(f"the {chain.roles[name].title} kept serial {old_serial:x}")
