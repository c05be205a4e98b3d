"""--data-dir: the local CA and JWT keys outlive a restart; SVIDs and entries do not."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import stat
import time
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509

from agent.cli import build_parser, dev_spire_settings
from agent.devspire.ca import CAState, TrustDomainCA
from agent.devspire.keystore import KEYS_FILE, KeyStore
from agent.errors import ConfigError

from .conftest import TD, FakeClock, Harness, MakeHarness, entry, exists, read, split_der

pytestmark = pytest.mark.skipif(os.getuid() != 0, reason="the entries name the caller by uid 0")

WEB = f"spiffe://{TD}/web"
WEB_ENTRY = entry(WEB, "unix:uid:4321")


async def wire_bundle(h: Harness) -> bytes:
    """The local bundle as a subscriber receives it."""
    stream = h.x509_bundles()
    try:
        bundle: bytes = (await read(stream)).ca_certificates[f"spiffe://{TD}"]
    finally:
        stream.cancel()
    return bundle


async def wire_svid(h: Harness) -> x509.Certificate:
    """The web entry's SVID leaf as a subscriber receives it."""
    stream = h.x509(selectors=("unix:uid:4321",))
    try:
        response = await read(stream)
    finally:
        stream.cancel()
    (item,) = response.x509_svids
    return x509.load_der_x509_certificate(item.x509_svid.cert_chain[0])


def kept(data: Path) -> dict[str, Any]:
    document: dict[str, Any] = json.loads((data / KEYS_FILE).read_text())
    return document


def same(a: CAState | None, b: CAState) -> bool:
    """Equal authorities (key objects do not compare by value, so their certificates and
    JWT key ids stand for them)."""
    def shape(state: CAState) -> list[tuple[int, bytes, str, float, float]]:
        return [(x.serial, x.der, x.jwt_kid, x.issued_at, x.not_after)
                for x in state.authorities()]
    return a is not None and (a.trust_domain, a.serial, shape(a)) == (
        b.trust_domain, b.serial, shape(b))


def roles(data: Path) -> list[tuple[str, int]]:
    return [(a["role"], a["serial"]) for a in kept(data)["authorities"]]


async def test_restart_keeps_the_ca_and_mints_fresh_svids_under_it(
        make_harness: MakeHarness, work_dir: Path) -> None:
    data = work_dir / "state" / "dev-spire"  # neither exists yet
    first = await make_harness([WEB_ENTRY], data_dir=str(data))
    bundle = await wire_bundle(first)
    jwks = first.dev.cache.local.jwks()
    old_leaf = await wire_svid(first)
    await first.dev.stop(grace=0)

    assert stat.S_IMODE(os.stat(data).st_mode) == 0o700
    assert stat.S_IMODE(os.stat(data / KEYS_FILE).st_mode) == 0o600
    assert os.listdir(data) == [KEYS_FILE], "no temporary file is left behind"

    second = await make_harness([WEB_ENTRY], data_dir=str(data))
    assert await wire_bundle(second) == bundle
    assert second.dev.bundle_der() == bundle
    assert second.dev.cache.local.jwks() == jwks
    new_leaf = await wire_svid(second)
    assert new_leaf.serial_number != old_leaf.serial_number, "SVIDs are not kept"
    (root,) = split_der(bundle)
    new_leaf.verify_directly_issued_by(root)


async def test_without_data_dir_a_restart_makes_a_new_ca(make_harness: MakeHarness) -> None:
    first = await make_harness()
    bundle = first.dev.bundle_der()
    await first.dev.stop(grace=0)
    second = await make_harness()
    assert second.dev.bundle_der() != bundle


async def test_an_expired_ca_is_replaced_and_the_file_rewritten(
        make_harness: MakeHarness, work_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    data = work_dir / "data"
    past = FakeClock(time.time() - 1000)
    first = await make_harness(data_dir=str(data), clock=past, ca_ttl=600)
    old_bundle = first.dev.bundle_der()
    old_file = kept(data)
    await first.dev.stop(grace=0)

    with caplog.at_level(logging.INFO, logger="spiffe_delegate.devspire"):
        second = await make_harness([WEB_ENTRY], data_dir=str(data), ca_ttl=600)
    assert f"{data / KEYS_FILE}: CA expired at " in caplog.text
    assert "minting a new CA" in caplog.text
    new_bundle = second.dev.bundle_der()
    assert new_bundle != old_bundle
    (root,) = split_der(new_bundle)
    assert kept(data) != old_file
    assert same(KeyStore(data).load(), second.dev.cache.local.state())
    (await wire_svid(second)).verify_directly_issued_by(root)


def _swap_keys(doc: dict[str, Any]) -> None:
    a = doc["authorities"][0]
    a["x509_key"], a["jwt_key"] = a["jwt_key"], a["x509_key"]


def _no_active(doc: dict[str, Any]) -> None:
    doc["authorities"][0]["role"] = "retired"


def _bad_base64(doc: dict[str, Any]) -> None:
    doc["authorities"][0]["x509_ca"] = "not base64!"


def _missing_field(doc: dict[str, Any]) -> None:
    del doc["authorities"][0]["not_after"]


@pytest.mark.parametrize(("damage", "message"), [
    (None, "is corrupt, not JSON: Unterminated string"),
    (_swap_keys, r"authorities\[0\]\.x509_key: does not belong to the certificate"),
    (_no_active, "0 active and 0 next"),
    (_bad_base64, r"authorities\[0\]\.x509_ca: not base64"),
    (_missing_field, r"authorities\[0\]\.not_after: missing"),
])
async def test_a_corrupt_file_stops_start_up_with_a_config_error(
        make_harness: MakeHarness, work_dir: Path, damage: Any, message: str) -> None:
    data = work_dir / "data"
    KeyStore(data).save(TrustDomainCA(TD, ca_ttl=3600, clock=time.time).state())
    path = data / KEYS_FILE
    if damage is None:
        path.write_text('{"version": 1, "trust_')
    else:
        doc = kept(data)
        damage(doc)
        path.write_text(json.dumps(doc))
    before = path.read_bytes()
    with pytest.raises(ConfigError, match=message) as info:
        await make_harness(data_dir=str(data))
    assert str(path) in str(info.value)
    assert "delete it" in str(info.value)
    assert path.read_bytes() == before, "a corrupt file is left for the operator to look at"
    assert not exists(work_dir / "admin0.sock")


async def test_rotate_ca_is_kept_and_a_restart_resumes_it(
        make_harness: MakeHarness, work_dir: Path) -> None:
    data = work_dir / "data"
    first = await make_harness([WEB_ENTRY], data_dir=str(data))
    assert roles(data) == [("active", 1)]
    await first.dev.rotate_ca_now()
    assert roles(data) == [("retired", 1), ("active", 2)]
    bundle = first.dev.bundle_der()
    assert len(split_der(bundle)) == 2
    await first.dev.stop(grace=0)

    second = await make_harness([WEB_ENTRY], data_dir=str(data))
    assert await wire_bundle(second) == bundle
    assert second.dev.cache.local.active.serial == 2
    _, signer = split_der(bundle)
    (await wire_svid(second)).verify_directly_issued_by(signer)
    await second.dev.rotate_ca_now()
    assert roles(data) == [("retired", 1), ("retired", 2), ("active", 3)], "serials go on"


async def test_scheduled_rotation_is_kept(make_harness: MakeHarness, work_dir: Path) -> None:
    data = work_dir / "data"
    clock = FakeClock(time.time())
    h = await make_harness(data_dir=str(data), clock=clock, ca_ttl=600)
    clock.advance(301)  # past half of the CA's life: the successor is published
    await h.dev.tick()
    assert roles(data) == [("active", 1), ("next", 2)]
    clock.advance(200)  # past five sixths: the successor signs
    await h.dev.tick()
    assert roles(data) == [("retired", 1), ("active", 2)]
    assert same(KeyStore(data).load(), h.dev.cache.local.state())


async def test_another_trust_domain_in_the_file_gets_a_new_ca(
        make_harness: MakeHarness, work_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    data = work_dir / "data"
    foreign = TrustDomainCA("other.org", ca_ttl=3600, clock=time.time)
    KeyStore(data).save(foreign.state())
    with caplog.at_level(logging.INFO, logger="spiffe_delegate.devspire"):
        h = await make_harness(data_dir=str(data))
    assert "holds trust domain other.org, not example.org; minting a new CA" in caplog.text
    assert h.dev.bundle_der() != foreign.bundle_der()
    assert kept(data)["trust_domain"] == TD
    assert same(KeyStore(data).load(), h.dev.cache.local.state())


async def test_another_key_type_gets_a_new_ca(make_harness: MakeHarness, work_dir: Path,
                                              caplog: pytest.LogCaptureFixture) -> None:
    data = work_dir / "data"
    KeyStore(data).save(TrustDomainCA(TD, ca_ttl=3600, clock=time.time).state())
    with caplog.at_level(logging.INFO, logger="spiffe_delegate.devspire"):
        h = await make_harness(data_dir=str(data), key_type="ec-p384")
    assert "CA key is ec-p256, not ec-p384; minting a new CA" in caplog.text
    assert same(KeyStore(data).load(), h.dev.cache.local.state())


async def test_expired_retired_cas_are_not_served_after_a_restart(
        make_harness: MakeHarness, work_dir: Path) -> None:
    data = work_dir / "data"
    clock = FakeClock(time.time())
    first = await make_harness(data_dir=str(data), clock=clock, ca_ttl=600)
    clock.advance(100)
    await first.dev.rotate_ca_now()
    await first.dev.stop(grace=0)
    clock.advance(501)  # CA 1 has expired, CA 2 (made at the rotation) has not
    second = await make_harness(data_dir=str(data), clock=clock, ca_ttl=600)
    assert [a.serial for a in second.dev.cache.local.authorities()] == [2]


def test_data_dir_option_and_environment_variable(monkeypatch: pytest.MonkeyPatch,
                                                  tmp_path: Path) -> None:
    argv = ["dev-spire", "--socket", "s", "--entries", "e"]
    assert dev_spire_settings(build_parser().parse_args(argv)).data_dir is None
    monkeypatch.setenv("SPIFFE_DELEGATE_DEV_SPIRE_DATA_DIR", str(tmp_path / "env"))
    assert dev_spire_settings(build_parser().parse_args(argv)).data_dir == str(tmp_path / "env")
    flagged = build_parser().parse_args([*argv, "--data-dir", str(tmp_path / "flag")])
    assert dev_spire_settings(flagged).data_dir == str(tmp_path / "flag")
    (tmp_path / "file").write_text("")
    with pytest.raises(ConfigError, match="is not a directory"):
        dev_spire_settings(build_parser().parse_args([*argv, "--data-dir",
                                                      str(tmp_path / "file")]))


async def test_stop_right_after_a_ca_rotation_does_not_hang(make_harness: MakeHarness) -> None:
    # A rotation wakes the rotation loop as stop() cancels it; Python 3.11's asyncio.wait_for
    # used to swallow that cancellation, and stop() then waited forever.
    for _ in range(5):
        h = await make_harness()
        stream = h.x509_bundles()
        await read(stream)
        await h.dev.rotate_ca_now()
        await h.channel.close(None)
        await asyncio.wait_for(h.dev.stop(grace=0), 5)
