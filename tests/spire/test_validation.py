"""SVID validation with certificates minted at test time, and the gate in front of the cache."""

from __future__ import annotations

import dataclasses
import datetime as dt
import logging

import pytest
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from agent.errors import SvidPending, SvidRejected
from agent.model import X509Bundles, X509Svid, X509SvidUpdate
from agent.spire import SvidGate, TrustBundles, validate_x509_svid

from .pki import HOUR, NOW, Ca


@pytest.fixture(scope="module")
def ca() -> Ca:
    return Ca.root()


@pytest.fixture(scope="module")
def trust(ca: Ca) -> TrustBundles:
    return TrustBundles.parse(ca.bundles())


def reason_of(svid: X509Svid, trust: TrustBundles | None, now: dt.datetime = NOW) -> str:
    with pytest.raises(SvidRejected) as caught:
        validate_x509_svid(svid, trust, now=now)
    return caught.value.reason


def test_valid_svid_passes(ca: Ca, trust: TrustBundles) -> None:
    svid = ca.svid("/web")
    verified = validate_x509_svid(svid, trust, now=NOW)
    assert verified.svid is svid
    assert verified.not_after == NOW + HOUR
    assert verified.valid_at(NOW) and not verified.valid_at(NOW + 2 * HOUR)


def test_chain_through_intermediates(ca: Ca, trust: TrustBundles) -> None:
    deep = ca.intermediate(name="one").intermediate(name="two")
    svid = deep.svid("/deep")
    assert len(svid.cert_chain) == 3
    validate_x509_svid(svid, trust, now=NOW)
    # Without the intermediates the path to the root cannot be built.
    assert reason_of(deep.svid(include_chain=False), trust) == "untrusted_chain"


def test_intermediate_that_is_not_a_ca(ca: Ca, trust: TrustBundles) -> None:
    assert reason_of(ca.intermediate(ca=False).svid(), trust) == "untrusted_chain"


def test_signed_by_another_ca_of_the_same_trust_domain(trust: TrustBundles) -> None:
    impostor = Ca.root("example.org", name="impostor")
    assert reason_of(impostor.svid(), trust) == "untrusted_chain"


def test_verifies_only_against_its_own_trust_domain(ca: Ca) -> None:
    # The signing CA is present, but filed under another trust domain's bundle.
    elsewhere = TrustBundles.parse(X509Bundles({"spiffe://other.org": (ca.der,)}))
    with pytest.raises(SvidPending, match=r"example\.org"):
        validate_x509_svid(ca.svid(), elsewhere, now=NOW)
    wrong = TrustBundles.parse(X509Bundles({"spiffe://example.org": (Ca.root().der,),
                                            "spiffe://other.org": (ca.der,)}))
    assert reason_of(ca.svid(), wrong) == "untrusted_chain"


def test_pending_without_any_bundle(ca: Ca) -> None:
    with pytest.raises(SvidPending):
        validate_x509_svid(ca.svid(), None, now=NOW)


def test_expired_and_not_yet_valid(ca: Ca, trust: TrustBundles) -> None:
    svid = ca.svid()
    assert reason_of(svid, trust, now=NOW + 2 * HOUR) == "expired"
    assert reason_of(svid, trust, now=NOW - 2 * HOUR) == "not_yet_valid"
    short = ca.intermediate(not_after=NOW - dt.timedelta(minutes=1))
    assert reason_of(short.svid(not_after=NOW + HOUR), trust) == "expired"


@pytest.mark.parametrize("uris", [
    ["spiffe://example.org/other"],
    [],
    ["spiffe://example.org/workload", "spiffe://example.org/second"],
])
def test_wrong_san(ca: Ca, trust: TrustBundles, uris: list[str]) -> None:
    assert reason_of(ca.svid("/workload", uris=uris), trust) == "wrong_san"


def test_id_field_must_match_the_certificate(ca: Ca, trust: TrustBundles) -> None:
    svid = dataclasses.replace(ca.svid("/a"), spiffe_id="spiffe://example.org/b")
    assert reason_of(svid, trust) == "wrong_san"


def test_key_mismatch(ca: Ca, trust: TrustBundles) -> None:
    assert reason_of(ca.svid(wrong_key=True), trust) == "key_mismatch"


def test_leaf_must_not_be_a_ca(ca: Ca, trust: TrustBundles) -> None:
    assert reason_of(ca.svid(is_ca=True), trust) == "is_ca"


@pytest.mark.parametrize("breakage", ["cert", "key", "id", "empty"])
def test_malformed(ca: Ca, trust: TrustBundles, breakage: str) -> None:
    svid = ca.svid()
    if breakage == "cert":
        svid = dataclasses.replace(svid, cert_chain=(b"\x30\x03\x01\x02\x03",))
    elif breakage == "key":
        svid = dataclasses.replace(svid, private_key=b"not a key")
    elif breakage == "id":
        svid = dataclasses.replace(svid, spiffe_id="https://example.org/workload")
    else:
        svid = dataclasses.replace(svid, cert_chain=())
    with pytest.raises(SvidRejected) as caught:
        validate_x509_svid(svid, trust, now=NOW)
    assert caught.value.reason == "malformed"
    assert "not a key" not in str(caught.value)


# --- the gate -----------------------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = NOW

    def __call__(self) -> dt.datetime:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def gate(clock: Clock) -> SvidGate:
    return SvidGate(clock=clock, label="test")


def test_gate_accepts_and_replaces(gate: SvidGate, ca: Ca) -> None:
    gate.update_bundles(ca.bundles())
    first, second, other = ca.svid("/a"), ca.svid("/a"), ca.svid("/b")
    assert gate.update_svids(X509SvidUpdate((first, other), ("spiffe://x.org",))) == \
        X509SvidUpdate((first, other), ("spiffe://x.org",))
    assert gate.update_svids(X509SvidUpdate((other, second))).svids == (other, second)
    assert not gate.rejections


def test_gate_keeps_previous_good_svid_on_rejection(
    gate: SvidGate, ca: Ca, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="spiffe_delegate.spire")
    gate.update_bundles(ca.bundles())
    good = ca.svid("/a")
    bad = ca.svid("/a", wrong_key=True)
    gate.update_svids(X509SvidUpdate((good,)))
    assert gate.update_svids(X509SvidUpdate((bad,))).svids == (good,)
    assert gate.update_svids(X509SvidUpdate((bad,))).svids == (good,)  # SPIRE re-sends
    assert gate.rejections == {"key_mismatch": 1}
    logged = [r for r in caplog.records if "key_mismatch" in r.getMessage()]
    assert len(logged) == 1
    assert "keeping the previous SVID" in logged[0].getMessage()
    assert bad.private_key.hex()[:40] not in caplog.text
    assert repr(bad.private_key)[:40] not in caplog.text


def test_gate_kept_svid_expires(gate: SvidGate, clock: Clock, ca: Ca) -> None:
    gate.update_bundles(ca.bundles())
    good = ca.svid("/a", not_after=NOW + HOUR)
    expired_replacement = ca.svid("/a", not_after=NOW - dt.timedelta(minutes=1))
    gate.update_svids(X509SvidUpdate((good,)))
    assert gate.update_svids(X509SvidUpdate((expired_replacement,))).svids == (good,)
    assert gate.rejections == {"expired": 1}
    clock.now = NOW + 2 * HOUR
    assert gate.accepted().svids == ()
    assert "spiffe://example.org/a" not in gate.in_use


def test_gate_holds_back_until_the_bundle_arrives(gate: SvidGate, ca: Ca) -> None:
    svid = ca.svid("/a")
    assert gate.update_svids(X509SvidUpdate((svid,))).svids == ()
    assert gate.pending == {"spiffe://example.org/a"}
    assert gate.update_bundles(Ca.root("other.org").bundles()).svids == ()  # wrong domain
    assert gate.update_bundles(ca.bundles()).svids == (svid,)
    assert gate.pending == frozenset()
    assert not gate.rejections


def test_gate_pending_keeps_previous(gate: SvidGate, ca: Ca) -> None:
    gate.update_bundles(ca.bundles())
    good = ca.svid("/a")
    gate.update_svids(X509SvidUpdate((good,)))
    # A new federated identity arrives before its trust domain's bundle does.
    foreign = Ca.root("other.org")
    assert gate.update_svids(X509SvidUpdate((good, foreign.svid("/b")))).svids == (good,)
    assert gate.pending == {"spiffe://other.org/b"}


def test_gate_drops_ids_absent_from_an_update(gate: SvidGate, ca: Ca) -> None:
    gate.update_bundles(ca.bundles())
    a, b = ca.svid("/a"), ca.svid("/b")
    gate.update_svids(X509SvidUpdate((a, b)))
    assert gate.update_svids(X509SvidUpdate((b,))).svids == (b,)
    assert gate.update_svids(X509SvidUpdate(())).svids == ()
    assert gate.in_use == {}


def test_gate_rechecks_untrusted_chain_when_bundles_change(gate: SvidGate, ca: Ca) -> None:
    # CA rotation where the new SVID overtakes the bundle that carries its new root.
    gate.update_bundles(ca.bundles())
    old = ca.svid("/a")
    gate.update_svids(X509SvidUpdate((old,)))
    new_root = Ca.root(name="rotated")
    rotated = new_root.svid("/a")
    assert gate.update_svids(X509SvidUpdate((rotated,))).svids == (old,)
    assert gate.rejections == {"untrusted_chain": 1}
    assert gate.update_bundles(ca.bundles(new_root)).svids == (rotated,)


def test_gate_says_when_the_svid_in_use_no_longer_chains(
    gate: SvidGate, ca: Ca, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="spiffe_delegate.spire")
    gate.update_bundles(ca.bundles())
    svid = ca.svid("/a")
    gate.update_svids(X509SvidUpdate((svid,)))
    new_root = Ca.root(name="rotated")
    assert gate.update_bundles(new_root.bundles()).svids == (svid,)  # still served
    gate.update_bundles(new_root.bundles())
    warnings = [r for r in caplog.records if "no longer verifies" in r.getMessage()]
    assert len(warnings) == 1
    assert "spiffe://example.org/a" in warnings[0].getMessage()


def test_gate_first_valid_svid_wins_for_duplicate_ids(gate: SvidGate, ca: Ca) -> None:
    gate.update_bundles(ca.bundles())
    broken = ca.svid("/a", is_ca=True)
    fine = ca.svid("/a")
    assert gate.update_svids(X509SvidUpdate((broken, fine))).svids == (fine,)
    assert gate.rejections == {"is_ca": 1}


def test_gate_counts_each_reason(gate: SvidGate, ca: Ca) -> None:
    gate.update_bundles(ca.bundles())
    update = X509SvidUpdate((
        ca.svid("/1", wrong_key=True),
        ca.svid("/2", is_ca=True),
        ca.svid("/3", uris=["spiffe://example.org/elsewhere"]),
        ca.svid("/4", not_after=NOW - dt.timedelta(seconds=1)),
        ca.svid("/5", not_before=NOW + HOUR, not_after=NOW + 2 * HOUR),
        Ca.root(name="stranger").svid("/6"),
        dataclasses.replace(ca.svid("/7"), private_key=b"junk"),
    ))
    assert gate.update_svids(update).svids == ()
    assert gate.rejections == {
        "key_mismatch": 1, "is_ca": 1, "wrong_san": 1, "expired": 1, "not_yet_valid": 1,
        "untrusted_chain": 1, "malformed": 1,
    }


def test_same_key_reused_is_fine(gate: SvidGate, ca: Ca) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    gate.update_bundles(ca.bundles())
    first, second = ca.svid("/a", key=key), ca.svid("/a", key=key)
    gate.update_svids(X509SvidUpdate((first,)))
    assert gate.update_svids(X509SvidUpdate((second,))).svids == (second,)


def test_gate_rechecks_not_yet_valid_when_asked(gate: SvidGate, clock: Clock, ca: Ca) -> None:
    gate.update_bundles(TrustBundles.parse(ca.bundles()))  # a shared, pre-parsed bundle set
    early = ca.svid("/a", not_before=NOW + dt.timedelta(seconds=30))
    assert gate.update_svids(X509SvidUpdate((early,))).svids == ()
    assert gate.rejections == {"not_yet_valid": 1}
    assert gate.recheck().svids == ()
    clock.now = NOW + dt.timedelta(seconds=31)
    assert gate.recheck().svids == (early,)
    assert gate.rejections == {"not_yet_valid": 1}


@pytest.mark.parametrize(("make_key", "accepted"), [
    (lambda: ec.generate_private_key(ec.SECP256K1()), False),
    (lambda: rsa.generate_private_key(public_exponent=65537, key_size=1024), False),
    (lambda: rsa.generate_private_key(public_exponent=65537, key_size=2048), True),
    (lambda: ec.generate_private_key(ec.SECP384R1()), True),
], ids=["secp256k1", "rsa1024", "rsa2048", "p384"])
def test_keys_envoy_would_refuse_are_rejected(ca: Ca, trust: TrustBundles, make_key: object,
                                              accepted: bool) -> None:
    """Envoy 1.40 NACKs RSA-1024 and secp256k1 leaves that pass every X.509 check."""
    svid = ca.svid(key=make_key())  # type: ignore[operator]
    if accepted:
        validate_x509_svid(svid, trust, now=NOW)
    else:
        assert reason_of(svid, trust) == "weak_key"


def test_an_svid_of_another_trust_domain_is_refused_when_ours_is_known(ca: Ca) -> None:
    foreign = Ca.root("other.org")
    both = TrustBundles.parse(X509Bundles({**ca.bundles().bundles,
                                           **foreign.bundles().bundles}))
    with pytest.raises(SvidRejected) as caught:
        validate_x509_svid(foreign.svid(), both, now=NOW, trust_domain="example.org")
    assert caught.value.reason == "wrong_trust_domain"
    assert "other.org" in str(caught.value)
    # Unknown trust domain of our own: no opinion (it chains to its bundle).
    validate_x509_svid(foreign.svid(), both, now=NOW)
    validate_x509_svid(ca.svid(), both, now=NOW, trust_domain="spiffe://example.org")


def test_gate_refuses_foreign_svids_instead_of_holding_them(clock: Clock, ca: Ca) -> None:
    gate = SvidGate(clock=clock, trust_domain=lambda: "example.org")
    gate.update_bundles(ca.bundles())
    good = ca.svid("/a")
    gate.update_svids(X509SvidUpdate((good,)))
    foreign = Ca.root("other.org").svid("/a")
    assert gate.update_svids(X509SvidUpdate((good, foreign))).svids == (good,)
    assert gate.rejections == {"wrong_trust_domain": 1}
    assert gate.pending == frozenset()


def test_gate_names_when_a_not_yet_valid_svid_becomes_valid(clock: Clock, ca: Ca) -> None:
    counted: list[str] = []
    gate = SvidGate(clock=clock, on_reject=counted.append)
    gate.update_bundles(ca.bundles())
    good = ca.svid("/a")
    later = ca.svid("/a", not_before=NOW + dt.timedelta(minutes=5))
    gate.update_svids(X509SvidUpdate((good,)))
    assert gate.next_recheck() is None
    assert gate.update_svids(X509SvidUpdate((later,))).svids == (good,)
    assert gate.next_recheck() == (NOW + dt.timedelta(minutes=5)).replace(microsecond=0)
    assert counted == ["not_yet_valid"]
    clock.now = NOW + dt.timedelta(minutes=6)
    assert gate.recheck().svids == (later,)
    assert gate.next_recheck() is None
