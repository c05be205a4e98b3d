"""/metrics with --metrics-tls-mode spiffe: the agent's own SVID from dev-spire, scrapers'
SVIDs from dev-spire, SPIFFE ID allow-listing, rotation without restart, and the agent's
private key never written to a file."""

from __future__ import annotations

import base64
import datetime as dt
import logging
import os
import ssl
import time
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from prometheus_client import Gauge

from agent.config import MetricsTlsSettings
from agent.errors import ConfigError
from agent.http.tls import SpiffeTls
from agent.model import X509Svid
from agent.runner import Agent
from agent.spire.backoff import BackoffPolicy
from agent.spire.client import DelegatedIdentityClient
from tests.http.conftest import (
    INTRUDER_SELECTORS,
    METRICS_DNS,
    SCRAPER,
    SCRAPER_SELECTORS,
    Harness,
    client_context,
    connect,
    get,
    pem_key,
)
from tests.sds_server.conftest import DELEGATE, TD
from tests.spire.pki import HOUR, Ca
from tests.waiting import eventually

SPIFFE_MODE = MetricsTlsSettings(mode="spiffe", allowed_ids=(SCRAPER,))


def tls_of(agent: Agent) -> SpiffeTls:
    assert agent.endpoints is not None and agent.endpoints.spiffe_tls is not None
    return agent.endpoints.spiffe_tls


async def serving_agent(harness: Harness) -> Agent:
    await harness.start_spire()
    agent = await harness.start_agent(metrics_tls=SPIFFE_MODE)
    Gauge("spiffe_delegate_test_probe", "set by the test", registry=agent.metrics_registry).set(7)
    await eventually(lambda: tls_of(agent).serial is not None, what="the agent's own SVID")
    return agent


async def test_allowed_scraper_gets_metrics_others_do_not(harness: Harness,
                                                          tmp_path: Path) -> None:
    agent = await serving_agent(harness)
    bundle = harness.bundle()
    scraper = await harness.svid_for(*SCRAPER_SELECTORS)
    assert scraper.spiffe_id == SCRAPER

    reply = await get(agent.metrics_address, "/metrics",
                      context=client_context(bundle, scraper, tmp_path / "scraper"))
    assert reply.status == 200, reply.body
    assert reply.headers["content-type"].startswith("text/plain; version=")
    assert b"spiffe_delegate_test_probe 7.0" in reply.body
    assert reply.server_cert is not None
    assert reply.server_cert.serial_number == tls_of(agent).serial

    # The certificate names the Service, so a scraper can verify the host name (serverName).
    checked = client_context(bundle, scraper, tmp_path / "scraper", hostname=True)
    reply = await get(agent.metrics_address, "/metrics", context=checked,
                      server_hostname=METRICS_DNS)
    assert reply.status == 200

    intruder = await harness.svid_for(*INTRUDER_SELECTORS)
    refused = await get(agent.metrics_address, "/metrics",
                        context=client_context(bundle, intruder, tmp_path / "intruder"))
    assert refused.status == 403
    assert b"spiffe_delegate_test_probe" not in refused.body
    # Every path, so that refused clients learn nothing.
    assert (await get(agent.metrics_address, "/anything",
                      context=client_context(bundle, intruder, tmp_path / "i2"))).status == 403


async def test_no_client_certificate_fails_the_handshake(harness: Harness,
                                                         tmp_path: Path) -> None:
    agent = await serving_agent(harness)
    bundle = harness.bundle()
    assert agent.metrics_address is not None
    with pytest.raises(ssl.SSLError, match="alert handshake failure"):
        await connect(agent.metrics_address, client_context(bundle, None, tmp_path, tls12=True))
    # TLS 1.3: the client finishes first; the server's alert arrives on the first read.
    connection = await connect(agent.metrics_address, client_context(bundle, None, tmp_path))
    with pytest.raises(ssl.SSLError, match="alert certificate required"):
        await connection.request("/metrics")
    connection.close()
    # Still serving others.
    scraper = await harness.svid_for(*SCRAPER_SELECTORS)
    ok = await get(agent.metrics_address, "/metrics",
                   context=client_context(bundle, scraper, tmp_path / "s"))
    assert ok.status == 200


async def test_a_certificate_from_another_ca_fails_the_handshake(harness: Harness,
                                                                 tmp_path: Path) -> None:
    agent = await serving_agent(harness)
    now = time_now()
    rogue = Ca.root(TD, not_before=now - HOUR, not_after=now + HOUR)  # same name, other key
    fake = rogue.svid(spiffe_id=SCRAPER, not_before=now - HOUR, not_after=now + HOUR)
    assert agent.metrics_address is not None
    with pytest.raises(ssl.SSLError, match="alert unknown ca"):
        await connect(agent.metrics_address,
                      client_context(harness.bundle(), fake, tmp_path, tls12=True))


async def test_rotation_reaches_new_connections_without_restart(harness: Harness,
                                                                 tmp_path: Path) -> None:
    agent = await serving_agent(harness)
    assert harness.spire is not None and agent.metrics_address is not None
    context = client_context(harness.bundle(), await harness.svid_for(*SCRAPER_SELECTORS),
                             tmp_path)
    before = await connect(agent.metrics_address, context)  # handshake done, no request yet
    old = tls_of(agent).serial
    assert before.server_cert is not None and before.server_cert.serial_number == old

    for _ in range(2):
        previous = tls_of(agent).serial
        assert await harness.spire.rotate_now(DELEGATE) >= 1
        await eventually(lambda p=previous: tls_of(agent).serial != p,  # type: ignore[misc]
                         what="the rotated SVID to reach the metrics endpoint")
        reply = await get(agent.metrics_address, "/metrics", context=context)
        assert reply.status == 200 and reply.server_cert is not None
        assert reply.server_cert.serial_number == tls_of(agent).serial != previous

    # A connection made before the rotations keeps its certificate and is still served.
    reply = await before.request("/metrics")
    assert reply.status == 200 and reply.server_cert is not None
    assert reply.server_cert.serial_number == old


async def test_a_new_ca_in_the_bundle_reaches_the_client_check(harness: Harness,
                                                              tmp_path: Path) -> None:
    agent = await serving_agent(harness)
    assert harness.spire is not None
    before = await harness.svid_for(*SCRAPER_SELECTORS)
    built, own_serial = tls_of(agent).contexts_built, tls_of(agent).serial
    await harness.spire.rotate_ca_now()
    # Only the bundle changed (the agent keeps its SVID): the client check gets the new CA.
    await eventually(lambda: tls_of(agent).contexts_built > built, what="a new context")
    assert tls_of(agent).serial == own_serial
    assert await harness.spire.rotate_now(SCRAPER) == 1
    after = await harness.svid_for(*SCRAPER_SELECTORS)
    assert issuing_key(after) != issuing_key(before), "the scraper's SVID is from the new CA"
    reply = await get(agent.metrics_address, "/metrics",
                      context=client_context(harness.bundle(), after, tmp_path))
    assert reply.status == 200


async def test_refuses_connections_until_the_agent_has_an_svid(
        harness: Harness, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="spiffe_delegate.http")
    agent = await harness.start_agent(metrics_tls=SPIFFE_MODE)  # before dev-spire
    assert agent.metrics_address is not None
    unverified = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    unverified.check_hostname, unverified.verify_mode = False, ssl.CERT_NONE
    for _ in range(3):
        with pytest.raises((ssl.SSLError, ConnectionError, OSError)):
            await connect(agent.metrics_address, unverified)
    refusals = [r for r in caplog.records if "no X.509-SVID of its own yet" in r.getMessage()]
    assert len(refusals) == 1, "logged once, not per connection"

    await harness.start_spire()
    await eventually(lambda: tls_of(agent).serial is not None, what="the agent's own SVID")
    scraper = await harness.svid_for(*SCRAPER_SELECTORS)
    reply = await get(agent.metrics_address, "/metrics",
                      context=client_context(harness.bundle(), scraper, tmp_path))
    assert reply.status == 200


async def test_the_private_key_never_touches_the_disk(harness: Harness, work_dir: Path,
                                                      tmp_path: Path) -> None:
    started = time.time()
    agent = await serving_agent(harness)
    # The same SVID the agent holds: dev-spire answers this process's PID with it.
    own = await own_svid(harness)
    assert own.spiffe_id == DELEGATE
    await eventually(lambda: tls_of(agent).serial == serial_of(own), what="same SVID")
    scraper = await harness.svid_for(*SCRAPER_SELECTORS)
    reply = await get(agent.metrics_address, "/metrics",
                      context=client_context(harness.bundle(), scraper, tmp_path))
    assert reply.status == 200

    needles = key_needles(own.private_key)
    assert any(needle in pem_key(own.private_key) for needle in needles), "needles find PEM"
    relay_dirs = [Path("/tmp") / name for name in os.listdir("/tmp")
                  if name.startswith("spiffe-delegate-")]
    places = [work_dir, *relay_dirs, Path.cwd(), Path("/dev/shm")]
    for path in files_under(places, since=started):
        data = read_quietly(path)
        for needle in needles:
            assert needle not in data, f"the agent's private key is in {path}"
    # The anonymous memory files are closed as soon as ssl has read them.
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        assert "spiffe-delegate-tls" not in target, f"fd {fd} still open: {target}"


async def test_spiffe_mode_settings_are_checked() -> None:
    with pytest.raises(ConfigError, match="--metrics-tls-mode spiffe needs at least one "
                                          "--metrics-allowed-id"):
        MetricsTlsSettings(mode="spiffe").validate()
    with pytest.raises(ConfigError, match=r"outside the trust domain example\.org"):
        MetricsTlsSettings(mode="spiffe", allowed_ids=("spiffe://other.test/x",)).validate(TD)
    with pytest.raises(ConfigError, match="only apply with --metrics-tls-mode files"):
        MetricsTlsSettings(mode="spiffe", allowed_ids=(SCRAPER,),
                           cert_file=Path("tls.crt")).validate()
    with pytest.raises(ConfigError, match="--metrics-allowed-id only applies"):
        MetricsTlsSettings(allowed_ids=(SCRAPER,)).validate()


async def test_agent_refuses_to_start_with_spiffe_mode_and_no_allowed_id(
        harness: Harness) -> None:
    agent = Agent(harness.settings(metrics_tls=MetricsTlsSettings(mode="spiffe")))
    with pytest.raises(ConfigError, match="--metrics-allowed-id"):
        await agent.start()
    assert not harness.settings().sds_socket.exists(), "nothing bound before the check"
    await agent.client.close()


# --- helpers ----------------------------------------------------------------------------

def time_now() -> dt.datetime:
    return dt.datetime.now(dt.UTC).replace(microsecond=0)


def issuing_key(svid: X509Svid) -> bytes | None:
    leaf = x509.load_der_x509_certificate(svid.cert_chain[0])
    aki = leaf.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    return aki.key_identifier


def serial_of(svid: X509Svid) -> int:
    return x509.load_der_x509_certificate(svid.cert_chain[0]).serial_number


async def own_svid(harness: Harness) -> X509Svid:
    policy = BackoffPolicy(initial=0.02, maximum=0.2, reset_after=1.0)
    async with DelegatedIdentityClient(harness.admin_socket, backoff=policy) as client:
        async for update in client.subscribe_x509_svids(pid=os.getpid()):
            mine = [s for s in update.svids if s.spiffe_id == DELEGATE]
            if mine:
                return mine[0]
    raise AssertionError("no SVID for this process")


def key_needles(pkcs8_der: bytes) -> list[bytes]:
    """The key as DER, as PEM body text (PKCS#8 and SEC1), and its raw private scalar."""
    key = serialization.load_der_private_key(pkcs8_der, None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    sec1 = key.private_bytes(serialization.Encoding.DER,
                             serialization.PrivateFormat.TraditionalOpenSSL,
                             serialization.NoEncryption())
    scalar = key.private_numbers().private_value.to_bytes(32, "big")
    return [pkcs8_der, sec1, scalar, base64.b64encode(pkcs8_der)[:64],
            base64.b64encode(sec1)[:64]]


def files_under(places: list[Path], *, since: float) -> list[Path]:
    found = []
    for place in places:
        if not place.exists():
            continue
        for root, dirs, names in os.walk(place):
            dirs[:] = [d for d in dirs if d not in (".git", ".venv", "node_modules")]
            for name in names:
                path = Path(root) / name
                try:
                    st = path.lstat()
                except OSError:
                    continue
                if path.is_file() and not path.is_symlink() and st.st_mtime >= since - 1 \
                        and st.st_size < 16 * 1024 * 1024:
                    found.append(path)
    return found


def read_quietly(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError:
        return b""
