"""The Secret builders and SPIRE's resource-name rules, without Envoy."""

from __future__ import annotations

import base64
import dataclasses
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from envoy.config.core.v3 import base_pb2
from envoy.extensions.transport_sockets.tls.v3 import tls_spiffe_validator_config_pb2
from google.protobuf import struct_pb2

from agent.errors import ConfigError
from agent.sds.names import NameKind, SdsNames, classify, workload_name
from agent.sds.resources import (
    SPIFFE_VALIDATOR_NAME,
    caller_bundles,
    pem_private_key,
    select_secrets,
    spiffe_validation_disabled,
    spiffe_validation_secret,
    supports_spiffe_validator,
    tls_certificate_secret,
    trusted_ca_secret,
    use_spiffe_validator,
)
from tests.sds.conftest import FEDERATED_TD, LOCAL_TD, ZULU_TD, Pki
from tests.sds.pki import leaf, make_ca, make_svid

POD = "5f0c4a3e-2b1d-4c6e-8f9a-0b1c2d3e4f5a"


# --- helpers ------------------------------------------------------------------------------

def pem_ders(pem: bytes) -> list[bytes]:
    return [c.public_bytes(serialization.Encoding.DER)
            for c in x509.load_pem_x509_certificates(pem)]


def spiffe_domains(secret: Any) -> list[tuple[str, list[bytes]]]:
    """(trust domain name, DER certs) of a SPIFFE-validator secret; fails on other shapes."""
    context = secret.validation_context
    assert not context.HasField("trusted_ca")
    custom = context.custom_validator_config
    assert custom.name == SPIFFE_VALIDATOR_NAME
    config = tls_spiffe_validator_config_pb2.SPIFFECertValidatorConfig()
    assert custom.typed_config.Unpack(config)
    return [(td.name, pem_ders(td.trust_bundle.inline_bytes)) for td in config.trust_domains]


def trusted_ca(secret: Any) -> list[bytes]:
    context = secret.validation_context
    assert context.HasField("trusted_ca")
    assert not context.HasField("custom_validator_config")
    return pem_ders(context.trusted_ca.inline_bytes)


def by_name(selection: Any) -> dict[str, Any]:
    return {secret.name: secret for secret in selection.secrets}


def node(major: int | None = None, minor: int = 0, **metadata: Any) -> Any:
    result = base_pb2.Node(id="n", cluster="c")
    if major is not None:
        result.user_agent_build_version.version.major_number = major
        result.user_agent_build_version.version.minor_number = minor
    if metadata:
        result.metadata.CopyFrom(struct_pb2.Struct())
        result.metadata.update(metadata)
    return result


# --- single secrets -------------------------------------------------------------------

def test_tls_certificate_secret_carries_pem_chain_and_pkcs8_key(pki: Pki) -> None:
    intermediate = make_ca(LOCAL_TD, parent=pki.local)
    svid = make_svid(intermediate, f"spiffe://{LOCAL_TD}/chained", intermediates=(intermediate,))

    secret = tls_certificate_secret("default", svid)

    assert secret.name == "default"
    assert secret.WhichOneof("type") == "tls_certificate"
    chain = secret.tls_certificate.certificate_chain.inline_bytes
    assert pem_ders(chain) == list(svid.cert_chain)            # leaf first, order kept
    key_pem = secret.tls_certificate.private_key.inline_bytes
    pkcs8_header = b"-----BEGIN " + b"PRIVATE KEY-----"  # split: no key-scanner false alarm
    assert key_pem.startswith(pkcs8_header)  # PKCS#8, not SEC1
    key = serialization.load_pem_private_key(key_pem, password=None)
    assert key.public_key() == leaf(svid).public_key()


def test_a_bad_key_is_refused_without_showing_it(pki: Pki) -> None:
    garbage = b"\x30\x82\x01\x00" + bytes(range(200))
    svid = dataclasses.replace(pki.proxy, private_key=garbage)

    with pytest.raises(ValueError) as caught:
        tls_certificate_secret("default", svid)

    message = str(caught.value)
    assert pki.proxy.spiffe_id in message
    assert caught.value.__cause__ is None and caught.value.__suppress_context__
    for leak in (garbage.hex(), base64.b64encode(garbage).decode()[:16], repr(garbage)[:20]):
        assert leak not in message
    with pytest.raises(ValueError):
        pem_private_key(pki.proxy.private_key[:-8])


def test_empty_chain_is_refused(pki: Pki) -> None:
    with pytest.raises(ValueError, match="empty certificate chain"):
        tls_certificate_secret("default", dataclasses.replace(pki.proxy, cert_chain=()))


def test_spiffe_validation_secret_sorts_trust_domains_and_drops_the_scheme(pki: Pki) -> None:
    rotated = make_ca(LOCAL_TD)
    bundles = {**pki.bundles, pki.local.key_name: (pki.local.der, rotated.der)}

    secret = spiffe_validation_secret("ALL", bundles)

    assert secret.name == "ALL"
    assert spiffe_domains(secret) == [
        (LOCAL_TD, [pki.local.der, rotated.der]),
        (FEDERATED_TD, [pki.federated.der]),
        (ZULU_TD, [pki.zulu.der]),
    ]


def test_trusted_ca_secret_is_plain_pem(pki: Pki) -> None:
    secret = trusted_ca_secret("ROOTCA", (pki.local.der, pki.federated.der))
    assert secret.name == "ROOTCA"
    assert trusted_ca(secret) == [pki.local.der, pki.federated.der]


# --- names ----------------------------------------------------------------------------

@pytest.mark.parametrize(("name", "kind", "value"), [
    ("default", NameKind.DEFAULT_SVID, ""),
    ("ROOTCA", NameKind.LOCAL_BUNDLE, ""),
    ("ALL", NameKind.ALL_BUNDLES, ""),
    ("spiffe://example.org", NameKind.TRUST_DOMAIN, "spiffe://example.org"),
    ("spiffe://example.org/ns/a", NameKind.SPIFFE_ID, "spiffe://example.org/ns/a"),
    (f"workload:{POD}", NameKind.WORKLOAD, POD),
    (f"workload:{POD.upper()}", NameKind.INVALID, ""),
    ("workload:", NameKind.INVALID, ""),
    ("spiffe://example.org/", NameKind.INVALID, ""),
    ("spiffe://", NameKind.INVALID, ""),
    ("rootca", NameKind.INVALID, ""),
])
def test_classify(name: str, kind: NameKind, value: str) -> None:
    asked = classify(name, SdsNames())
    assert (asked.kind, asked.value) == (kind, value)
    assert bool(asked.problem) == (kind is NameKind.INVALID)


def test_workload_name_round_trips() -> None:
    assert classify(workload_name(POD), SdsNames()).value == POD


def test_configured_names_replace_the_defaults() -> None:
    names = SdsNames(default_svid_name="me", default_bundle_name="ca",
                     default_all_bundles_name="every")
    assert classify("me", names).kind is NameKind.DEFAULT_SVID
    assert classify("ca", names).kind is NameKind.LOCAL_BUNDLE
    assert classify("every", names).kind is NameKind.ALL_BUNDLES
    assert classify("default", names).kind is NameKind.INVALID


def test_bundle_name_equal_to_all_name_ignores_all_as_spire_does() -> None:
    names = SdsNames(default_bundle_name="ALL", default_all_bundles_name="ALL")
    assert names.all_bundles_name is None
    assert classify("ALL", names).kind is NameKind.LOCAL_BUNDLE


@pytest.mark.parametrize("settings", [
    {"default_svid_name": ""},
    {"default_bundle_name": "spiffe://example.org"},
    {"default_all_bundles_name": "workload:x"},
    {"default_svid_name": "ROOTCA"},
    {"default_svid_name": "ALL"},
])
def test_unusable_names_are_config_errors(settings: dict[str, Any]) -> None:
    with pytest.raises(ConfigError):
        SdsNames(**settings)


# --- select_secrets -------------------------------------------------------------------

def select(pki: Pki, requested: list[str], *, spiffe: bool = True, **kwargs: Any) -> Any:
    return select_secrets(requested, [pki.proxy, pki.second], pki.bundles, LOCAL_TD,
                          spiffe_validator=spiffe, **kwargs)


def test_default_is_the_first_svid(pki: Pki) -> None:
    selection = select(pki, ["default"])
    assert selection.names == ("default",) and not selection.unmet
    chain = selection.secrets[0].tls_certificate.certificate_chain.inline_bytes
    assert pem_ders(chain) == list(pki.proxy.cert_chain)

    swapped = select_secrets(["default"], [pki.second, pki.proxy], pki.bundles, LOCAL_TD,
                             spiffe_validator=True)
    chain = swapped.secrets[0].tls_certificate.certificate_chain.inline_bytes
    assert pem_ders(chain) == list(pki.second.cert_chain)


def test_svids_are_served_by_spiffe_id(pki: Pki) -> None:
    selection = select(pki, [pki.second.spiffe_id])
    assert selection.names == (pki.second.spiffe_id,)
    chain = selection.secrets[0].tls_certificate.certificate_chain.inline_bytes
    assert pem_ders(chain) == list(pki.second.cert_chain)


def test_rootca_is_the_callers_trust_domain(pki: Pki) -> None:
    selection = select(pki, ["ROOTCA"])
    assert spiffe_domains(by_name(selection)["ROOTCA"]) == [(LOCAL_TD, [pki.local.der])]

    partner = select_secrets(["ROOTCA"], [], pki.bundles, FEDERATED_TD, spiffe_validator=True)
    assert spiffe_domains(partner.secrets[0]) == [(FEDERATED_TD, [pki.federated.der])]


def test_all_holds_every_bundle_sorted(pki: Pki) -> None:
    selection = select(pki, ["ALL"])
    assert [td for td, _ in spiffe_domains(by_name(selection)["ALL"])] == [
        LOCAL_TD, FEDERATED_TD, ZULU_TD]


def test_trust_domain_names_give_that_bundle(pki: Pki) -> None:
    selection = select(pki, [pki.federated.key_name, pki.local.key_name])
    assert selection.names == (pki.federated.key_name, pki.local.key_name)  # request order
    secrets = by_name(selection)
    assert spiffe_domains(secrets[pki.federated.key_name]) == [(FEDERATED_TD, [pki.federated.der])]
    assert spiffe_domains(secrets[pki.local.key_name]) == [(LOCAL_TD, [pki.local.der])]


def test_rootca_and_all_together_both_served_unlike_spire(pki: Pki) -> None:
    selection = select(pki, ["ROOTCA", "ALL", pki.local.key_name])
    assert set(selection.names) == {"ROOTCA", "ALL", pki.local.key_name}
    assert not selection.unmet


def test_default_and_its_own_spiffe_id_together(pki: Pki) -> None:
    selection = select(pki, ["default", pki.proxy.spiffe_id])
    assert selection.names == ("default", pki.proxy.spiffe_id)
    assert not selection.unmet


def test_empty_request_is_everything(pki: Pki) -> None:
    for requested in ([], [""], ["", ""]):
        selection = select(pki, requested)
        assert selection.names == (pki.local.key_name, pki.federated.key_name,
                                   pki.zulu.key_name, pki.proxy.spiffe_id, pki.second.spiffe_id)
        assert not selection.unmet and not selection.workloads
        assert spiffe_domains(selection.secrets[0]) == [(LOCAL_TD, [pki.local.der])]


def test_everything_in_trusted_ca_mode(pki: Pki) -> None:
    selection = select(pki, [], spiffe=False)
    assert trusted_ca(by_name(selection)[pki.zulu.key_name]) == [pki.zulu.der]


def test_empty_names_are_ignored_and_duplicates_served_once(pki: Pki) -> None:
    selection = select(pki, ["", "default", "default", ""])
    assert selection.names == ("default",)


def test_duplicate_spiffe_ids_first_wins(pki: Pki) -> None:
    again = make_svid(pki.local, pki.proxy.spiffe_id)
    selection = select_secrets([], [pki.proxy, again], {}, LOCAL_TD, spiffe_validator=True)
    assert selection.names == (pki.proxy.spiffe_id,)
    chain = selection.secrets[0].tls_certificate.certificate_chain.inline_bytes
    assert pem_ders(chain) == list(pki.proxy.cert_chain)


def test_unmet_names_are_reported_with_reasons(pki: Pki) -> None:
    requested = ["default", "spiffe://example.org/not/mine", "spiffe://unknown.test",
                 "nonsense", "spiffe://bad/", f"workload:{POD}x"]
    selection = select(pki, requested)
    assert selection.names == ("default",)
    assert selection.unmet == frozenset(requested[1:])
    assert set(selection.reasons) == selection.unmet
    assert all(selection.reasons.values())


def test_without_svids_default_is_unmet(pki: Pki) -> None:
    selection = select_secrets(["default", "ROOTCA"], [], pki.bundles, LOCAL_TD,
                               spiffe_validator=True)
    assert selection.names == ("ROOTCA",)
    assert selection.unmet == {"default"}


def test_missing_local_bundle_leaves_rootca_unmet(pki: Pki) -> None:
    bundles = {pki.federated.key_name: (pki.federated.der,), pki.local.key_name: ()}
    selection = select_secrets(["ROOTCA", "ALL"], [pki.proxy], bundles, LOCAL_TD,
                               spiffe_validator=True)
    assert selection.unmet == {"ROOTCA"}
    assert [td for td, _ in spiffe_domains(by_name(selection)["ALL"])] == [FEDERATED_TD]


def test_trusted_ca_mode(pki: Pki) -> None:
    selection = select(pki, ["ROOTCA", pki.federated.key_name, "ALL"], spiffe=False)
    secrets = by_name(selection)
    assert trusted_ca(secrets["ROOTCA"]) == [pki.local.der]
    assert trusted_ca(secrets[pki.federated.key_name]) == [pki.federated.der]
    # ALL needs the SPIFFE validator (SPIRE fails the stream with Internal here).
    assert selection.unmet == {"ALL"}
    assert "SPIFFE validator" in selection.reasons["ALL"]


def test_workload_names_are_a_separate_category(pki: Pki) -> None:
    other = "0b1c2d3e-4f5a-4c6e-8f9a-5f0c4a3e2b1d"
    selection = select(pki, ["default", workload_name(POD), workload_name(other)])
    assert selection.names == ("default",)
    assert dict(selection.workloads) == {workload_name(POD): POD, workload_name(other): other}
    assert not selection.unmet


def test_a_broken_svid_is_unmet_not_fatal(pki: Pki) -> None:
    broken = dataclasses.replace(pki.second, private_key=b"not a key")
    selection = select_secrets([], [pki.proxy, broken], pki.bundles, LOCAL_TD,
                               spiffe_validator=True)
    assert pki.proxy.spiffe_id in selection.names
    assert selection.unmet == {broken.spiffe_id}
    assert "not a key" not in selection.reasons[broken.spiffe_id]


def test_a_broken_bundle_is_unmet_not_fatal(pki: Pki) -> None:
    bundles = {**pki.bundles, pki.zulu.key_name: (b"garbage",)}
    selection = select_secrets(["ROOTCA", pki.zulu.key_name, "ALL"], [], bundles, LOCAL_TD,
                               spiffe_validator=True)
    assert selection.names == ("ROOTCA",)
    assert selection.unmet == {pki.zulu.key_name, "ALL"}
    assert ZULU_TD in selection.reasons["ALL"]


def test_custom_names(pki: Pki) -> None:
    names = SdsNames(default_svid_name="me", default_bundle_name="ca",
                     default_all_bundles_name="every")
    selection = select(pki, ["me", "ca", "every", "default"], names=names)
    assert selection.names == ("me", "ca", "every")
    assert selection.unmet == {"default"}


def test_caller_bundles_are_own_plus_federated(pki: Pki) -> None:
    seen = caller_bundles(pki.bundles, LOCAL_TD, [f"spiffe://{ZULU_TD}", "missing.test"])
    assert seen == {pki.local.key_name: (pki.local.der,), pki.zulu.key_name: (pki.zulu.der,)}
    assert list(caller_bundles(pki.bundles, f"spiffe://{LOCAL_TD}", [ZULU_TD, LOCAL_TD])) == [
        pki.local.key_name, pki.zulu.key_name]


# --- which validator ------------------------------------------------------------------

@pytest.mark.parametrize(("the_node", "expected"), [
    (None, True),
    (node(), True),                 # no build version: supported
    (node(1, 17), False),
    (node(1, 18), True),
    (node(1, 40), True),
    (node(2, 0), True),
    (node(0, 99), False),
])
def test_supports_spiffe_validator_by_version(the_node: Any, expected: bool) -> None:
    assert supports_spiffe_validator(the_node) is expected


@pytest.mark.parametrize(("value", "configured", "expected"), [
    (True, False, True),
    (False, True, False),
    ("true", False, True),
    ("false", True, False),
    ("1", False, True),
    ("T", False, True),
    ("FALSE", True, False),
    ("yes", False, False),       # not a Go bool: ignored, the setting stands
    ("yes", True, True),
    (1.0, False, False),         # numbers are ignored too
])
def test_node_metadata_overrides_disable_setting(value: Any, configured: bool,
                                                 expected: bool) -> None:
    names = SdsNames(disable_spiffe_cert_validation=configured)
    the_node = node(1, 40, disable_spiffe_cert_validation=value)
    assert spiffe_validation_disabled(the_node, names) is expected
    assert use_spiffe_validator(the_node, names) is (not expected)


def test_use_spiffe_validator_combines_version_and_setting() -> None:
    assert use_spiffe_validator(node(1, 40), SdsNames())
    assert not use_spiffe_validator(node(1, 40), SdsNames(disable_spiffe_cert_validation=True))
    assert not use_spiffe_validator(node(1, 17), SdsNames())
    # Old Envoy: metadata cannot switch the validator on.
    assert not use_spiffe_validator(node(1, 17, disable_spiffe_cert_validation=False),
                                    SdsNames())
