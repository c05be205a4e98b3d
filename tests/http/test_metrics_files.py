"""/metrics with --metrics-tls-mode files: certificate, key and client CA from files laid out
as a mounted cert-manager Secret, replaced in place or by kubelet's ``..data`` symlink swap,
picked up by new connections without a restart; a bad replacement keeps the old ones."""

from __future__ import annotations

import dataclasses
import datetime as dt
import logging
import os
import shutil
import ssl
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from agent.config import MetricsTlsSettings
from agent.errors import ConfigError
from agent.http.tls import FileTls
from agent.model import X509Svid
from agent.runner import Agent
from tests.http.conftest import SCRAPER, Harness, connect, get, pem_chain, pem_key
from tests.spire.pki import HOUR, Ca
from tests.waiting import eventually


def now() -> dt.datetime:
    return dt.datetime.now(dt.UTC).replace(microsecond=0)


class Pki:
    """A server CA (what scrapers trust) and a client CA (--metrics-client-ca-file)."""

    def __init__(self) -> None:
        t = now()
        self.server_ca = Ca.root("metrics.test", name="server-ca", not_before=t - HOUR,
                                 not_after=t + 24 * HOUR)
        self.client_ca = Ca.root("clients.test", name="client-ca", not_before=t - HOUR,
                                 not_after=t + 24 * HOUR)

    def server(self) -> X509Svid:
        t = now()
        return self.server_ca.svid("/spiffe-delegate-metrics", not_before=t - HOUR,
                                   not_after=t + HOUR)

    def client(self, spiffe_id: str = SCRAPER, ca: Ca | None = None) -> X509Svid:
        t = now()
        return (ca or self.client_ca).svid(spiffe_id=spiffe_id, not_before=t - HOUR,
                                           not_after=t + HOUR)

    def secret(self, server: X509Svid | None = None) -> dict[str, bytes]:
        """The three keys of a cert-manager Secret."""
        server = server or self.server()
        return {"tls.crt": pem_chain(server.cert_chain), "tls.key": pem_key(server.private_key),
                "ca.crt": self.client_ca.cert.public_bytes(serialization.Encoding.PEM)}

    def scraper_context(self, client: X509Svid | None, key_dir: Path, *,
                        tls12: bool = False) -> ssl.SSLContext:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.check_hostname = False
        context.load_verify_locations(
            cadata=self.server_ca.cert.public_bytes(serialization.Encoding.PEM).decode())
        if tls12:
            context.maximum_version = ssl.TLSVersion.TLSv1_2
        if client is not None:
            key_dir.mkdir(parents=True, exist_ok=True)
            (key_dir / "c.crt").write_bytes(pem_chain(client.cert_chain))
            (key_dir / "c.key").write_bytes(pem_key(client.private_key))
            context.load_cert_chain(key_dir / "c.crt", key_dir / "c.key")
        return context


class SecretVolume:
    """A directory as kubelet mounts a Secret: ``tls.crt -> ..data/tls.crt`` and
    ``..data -> ..<timestamp>``; an update writes a new timestamped directory and renames a
    new ``..data`` symlink over the old one (atomic), then removes the old directory."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.root.mkdir(parents=True, exist_ok=True)
        self._generation = 0

    def path(self, name: str) -> Path:
        return self.root / name

    def publish(self, files: dict[str, bytes]) -> None:
        self._generation += 1
        data_dir = self.root / f"..2026_06_01_12_00_{self._generation:02d}.{os.getpid()}"
        data_dir.mkdir()
        for name, content in files.items():
            (data_dir / name).write_bytes(content)
        old = os.readlink(self.root / "..data") if (self.root / "..data").is_symlink() else None
        tmp = self.root / "..data_tmp"
        os.symlink(data_dir.name, tmp)
        os.rename(tmp, self.root / "..data")
        for name in files:
            if not (self.root / name).is_symlink():
                os.symlink(f"..data/{name}", self.root / name)
        if old is not None:
            shutil.rmtree(self.root / old)


def files_mode(volume: SecretVolume, **changes: Any) -> MetricsTlsSettings:
    settings = MetricsTlsSettings(mode="files", cert_file=volume.path("tls.crt"),
                                  key_file=volume.path("tls.key"),
                                  client_ca_file=volume.path("ca.crt"), reload_interval=0.05)
    return dataclasses.replace(settings, **changes)


def file_tls(agent: Agent) -> FileTls:
    assert agent.endpoints is not None and agent.endpoints.file_tls is not None
    return agent.endpoints.file_tls


def serial(svid: X509Svid) -> int:
    return x509.load_der_x509_certificate(svid.cert_chain[0]).serial_number


@pytest.fixture
def pki() -> Pki:
    return Pki()


async def test_client_certificate_required_and_checked(harness: Harness, pki: Pki,
                                                        tmp_path: Path) -> None:
    volume = SecretVolume(tmp_path / "secret")
    server = pki.server()
    volume.publish(pki.secret(server))
    agent = await harness.start_agent(follow_own_identity=False, metrics_tls=files_mode(volume))
    reply = await get(agent.metrics_address, "/metrics",
                      context=pki.scraper_context(pki.client(), tmp_path / "c"))
    assert reply.status == 200 and reply.server_cert is not None
    assert reply.server_cert.serial_number == serial(server)
    assert agent.metrics_address is not None
    with pytest.raises(ssl.SSLError, match="alert handshake failure"):
        await connect(agent.metrics_address, pki.scraper_context(None, tmp_path, tls12=True))
    t = now()
    stranger = Ca.root("clients.test", not_before=t - HOUR, not_after=t + HOUR)
    with pytest.raises(ssl.SSLError, match="alert unknown ca"):
        await connect(agent.metrics_address,
                      pki.scraper_context(pki.client(ca=stranger), tmp_path / "s", tls12=True))


async def test_allowed_ids_apply_in_files_mode_too(harness: Harness, pki: Pki,
                                                    tmp_path: Path) -> None:
    volume = SecretVolume(tmp_path / "secret")
    volume.publish(pki.secret())
    agent = await harness.start_agent(
        follow_own_identity=False, metrics_tls=files_mode(volume, allowed_ids=(SCRAPER,)))
    ok = await get(agent.metrics_address, "/metrics",
                   context=pki.scraper_context(pki.client(), tmp_path / "a"))
    assert ok.status == 200
    other = await get(agent.metrics_address, "/metrics", context=pki.scraper_context(
        pki.client("spiffe://clients.test/someone"), tmp_path / "b"))
    assert other.status == 403


async def test_symlink_swap_and_in_place_replacement_are_picked_up(
        harness: Harness, pki: Pki, tmp_path: Path) -> None:
    volume = SecretVolume(tmp_path / "secret")
    first = pki.server()
    volume.publish(pki.secret(first))
    agent = await harness.start_agent(follow_own_identity=False, metrics_tls=files_mode(volume))
    context = pki.scraper_context(pki.client(), tmp_path / "c")
    assert agent.metrics_address is not None
    held = await connect(agent.metrics_address, context)  # opened before any change

    second = pki.server()
    volume.publish(pki.secret(second))  # kubelet's ..data swap
    await eventually(lambda: file_tls(agent).serial == serial(second), what="the swap")
    reply = await get(agent.metrics_address, "/metrics", context=context)
    assert reply.server_cert is not None and reply.server_cert.serial_number == serial(second)

    third = pki.server()
    for name, content in pki.secret(third).items():  # plain files replaced one by one
        target = volume.root / os.readlink(volume.path(name))
        tmp = target.with_name(target.name + ".new")
        tmp.write_bytes(content)
        os.replace(tmp, target)
    await eventually(lambda: file_tls(agent).serial == serial(third), what="the replacement")
    reply = await get(agent.metrics_address, "/metrics", context=context)
    assert reply.server_cert is not None and reply.server_cert.serial_number == serial(third)

    old = await held.request("/metrics")  # the old connection kept its certificate
    assert old.status == 200 and old.server_cert is not None
    assert old.server_cert.serial_number == serial(first)


async def test_a_bad_replacement_keeps_the_old_certificate_and_is_logged_once(
        harness: Harness, pki: Pki, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.ERROR, logger="spiffe_delegate.http")
    volume = SecretVolume(tmp_path / "secret")
    first = pki.server()
    volume.publish(pki.secret(first))
    agent = await harness.start_agent(follow_own_identity=False, metrics_tls=files_mode(volume))
    context = pki.scraper_context(pki.client(), tmp_path / "c")

    broken = pki.secret()
    broken["tls.key"] = pem_key(pki.server().private_key)  # another certificate's key
    volume.publish(broken)
    await eventually(lambda: any("keeping the previous certificate" in r.getMessage()
                                 for r in caplog.records), what="the error")
    reloads = file_tls(agent).reloads
    for _ in range(5):  # several polls of the same bad files
        reply = await get(agent.metrics_address, "/metrics", context=context)
        assert reply.status == 200 and reply.server_cert is not None
        assert reply.server_cert.serial_number == serial(first)
    errors = [r.getMessage() for r in caplog.records if "keeping the previous" in r.getMessage()]
    assert len(errors) == 1, errors
    assert "--metrics-key-file" in errors[0] and "does not match" in errors[0]
    assert file_tls(agent).reloads == reloads

    fixed = pki.server()
    volume.publish(pki.secret(fixed))
    await eventually(lambda: file_tls(agent).serial == serial(fixed), what="the fix")


@pytest.mark.parametrize(("breakage", "message"), [
    ("missing key", "--metrics-key-file {root}/tls.key: cannot read it: No such file"),
    ("garbage cert", "--metrics-cert-file {root}/tls.crt: no PEM certificate in it"),
    ("mismatched key", "--metrics-key-file {root}/tls.key does not match the certificate"),
    ("garbage ca", "--metrics-client-ca-file {root}/ca.crt: no PEM certificate in it"),
])
async def test_unusable_files_stop_the_start_with_the_flag_named(
        harness: Harness, pki: Pki, tmp_path: Path, breakage: str, message: str) -> None:
    root = tmp_path / "plain"
    root.mkdir()
    for name, content in pki.secret().items():
        (root / name).write_bytes(content)
    if breakage == "missing key":
        (root / "tls.key").unlink()
    elif breakage == "garbage cert":
        (root / "tls.crt").write_text("not a certificate\n")
    elif breakage == "mismatched key":
        (root / "tls.key").write_bytes(pem_key(pki.server().private_key))
    else:
        (root / "ca.crt").write_text("")
    settings = MetricsTlsSettings(mode="files", cert_file=root / "tls.crt",
                                  key_file=root / "tls.key", client_ca_file=root / "ca.crt")
    agent = Agent(harness.settings(metrics_tls=settings), follow_own_identity=False)
    with pytest.raises(ConfigError) as caught:
        await agent.start()
    assert str(caught.value).startswith(message.format(root=root)), str(caught.value)
    assert "\n" not in str(caught.value)
    assert not harness.settings().sds_socket.exists(), "the agent cleaned up"


def test_files_mode_needs_all_three_files() -> None:
    with pytest.raises(ConfigError, match="needs --metrics-key-file, --metrics-client-ca-file"):
        MetricsTlsSettings(mode="files", cert_file=Path("tls.crt")).validate()
