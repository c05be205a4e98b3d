"""Pure functions that turn SVIDs and bundles into Envoy SDS Secrets, shaped as SPIRE's are.

Nothing here does I/O or keeps state, but for one memo: an SVID's PEM chain and key,
kept for as long as that SVID object lives (a rotation to 1,000 streams converts each
SVID once, not once per stream). Key bytes are never logged and never put in an
exception message: errors name the SVID by its SPIFFE ID only.

Deliberate differences from SPIRE's ``buildResponse`` (``pkg/agent/endpoints/sdsv3``):

* SPIRE picks at most one of {``spiffe://<local td>``, ``ROOTCA``, ``ALL``} per response (a
  ``switch``), so asking for two of them leaves one unmet and fails the stream. Here each
  requested name is served on its own: ``ROOTCA`` and ``ALL`` together work.
* SPIRE serves identity 0 once, under its SPIFFE ID if that was asked for and only
  otherwise as ``default``; asking for both leaves ``default`` unmet. Here both are served.
* Two SVIDs with the same SPIFFE ID: the first wins, so Envoy never gets two resources with
  one name.
* ``workload:<pod uid>`` names are recognised (SPIRE has none); they are returned as a
  separate category for the caller to serve.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from types import MappingProxyType
from weakref import WeakKeyDictionary

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from envoy.config.core.v3 import base_pb2, extension_pb2
from envoy.extensions.transport_sockets.tls.v3 import (
    common_pb2,
    secret_pb2,
    tls_spiffe_validator_config_pb2,
)

from agent.model import X509Svid, trust_domain_key
from agent.sds.names import NameKind, SdsNames, classify

__all__ = [
    "DISABLE_SPIFFE_CERT_VALIDATION_KEY",
    "SECRET_TYPE_URL",
    "SPIFFE_VALIDATOR_NAME",
    "SecretSelection",
    "caller_bundles",
    "pem_certificates",
    "pem_private_key",
    "select_secrets",
    "spiffe_validation_disabled",
    "spiffe_validation_secret",
    "supports_spiffe_validator",
    "svid_pem",
    "tls_certificate_secret",
    "trusted_ca_secret",
    "use_spiffe_validator",
]

SECRET_TYPE_URL = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret"
SPIFFE_VALIDATOR_NAME = "envoy.tls.cert_validator.spiffe"
DISABLE_SPIFFE_CERT_VALIDATION_KEY = "disable_spiffe_cert_validation"

Bundles = Mapping[str, Sequence[bytes]]

# Go's strconv.ParseBool, which SPIRE uses for the node metadata override.
_GO_TRUE = frozenset({"1", "t", "T", "TRUE", "true", "True"})
_GO_FALSE = frozenset({"0", "f", "F", "FALSE", "false", "False"})


# --- PEM --------------------------------------------------------------------------------

def pem_certificates(ders: Iterable[bytes], what: str = "certificate") -> bytes:
    """DER certificates -> concatenated PEM, in order. ValueError names ``what`` and the index."""
    out = []
    for index, der in enumerate(ders):
        try:
            cert = x509.load_der_x509_certificate(der)
        except ValueError:
            raise ValueError(f"{what} #{index} is not a DER X.509 certificate") from None
        out.append(cert.public_bytes(serialization.Encoding.PEM))
    return b"".join(out)


def pem_private_key(pkcs8_der: bytes, owner: str = "SVID") -> bytes:
    """PKCS#8 DER -> PKCS#8 PEM (unencrypted). The error names ``owner``, never the bytes."""
    try:
        key = serialization.load_der_private_key(pkcs8_der, password=None)
        return key.private_bytes(serialization.Encoding.PEM,
                                 serialization.PrivateFormat.PKCS8,
                                 serialization.NoEncryption())
    except (ValueError, TypeError, UnsupportedAlgorithm):
        # ``from None``: the underlying error must not carry key material along.
        raise ValueError(f"the private key of {owner} is not a usable PKCS#8 DER key") from None


# --- single Secrets ---------------------------------------------------------------------

def _inline(data: bytes) -> base_pb2.DataSource:
    return base_pb2.DataSource(inline_bytes=data)


# PEM (chain, key) per SVID object, dropped with it: the SVIDs of the cache's states are
# shared by every stream that serves them. Only successful conversions are kept.
_PEM_BY_SVID: WeakKeyDictionary[X509Svid, tuple[bytes, bytes]] = WeakKeyDictionary()


def svid_pem(svid: X509Svid) -> tuple[bytes, bytes]:
    """The SVID's PEM chain (leaf first) and PEM PKCS#8 key; ValueError names the SVID."""
    try:
        return _PEM_BY_SVID[svid]
    except KeyError:
        pass
    if not svid.cert_chain:
        raise ValueError(f"SVID {svid.spiffe_id} has an empty certificate chain")
    pem = (pem_certificates(svid.cert_chain, f"certificate of SVID {svid.spiffe_id}"),
           pem_private_key(svid.private_key, f"SVID {svid.spiffe_id}"))
    _PEM_BY_SVID[svid] = pem
    return pem


def tls_certificate_secret(name: str, svid: X509Svid) -> secret_pb2.Secret:
    """A ``tls_certificate`` Secret: PEM chain (leaf first) and PEM PKCS#8 key."""
    chain, key = svid_pem(svid)
    return secret_pb2.Secret(name=name, tls_certificate=common_pb2.TlsCertificate(
        certificate_chain=_inline(chain), private_key=_inline(key)))


def _trust_domain_name(key: str) -> str:
    return key.removeprefix("spiffe://")


def spiffe_validation_secret(name: str, bundles: Bundles) -> secret_pb2.Secret:
    """A validation context using Envoy's SPIFFE validator, one trust domain per bundle.

    ``bundles`` maps ``spiffe://<td>`` (or a bare ``<td>``) to DER CA certificates; the
    trust domains are written without the scheme and sorted by name.
    """
    by_name = {_trust_domain_name(key): certs for key, certs in bundles.items()}
    domains = []
    for td, certs in sorted(by_name.items()):
        domains.append(tls_spiffe_validator_config_pb2.SPIFFECertValidatorConfig.TrustDomain(
            name=td, trust_bundle=_inline(pem_certificates(certs, f"CA of {td}"))))
    validator = tls_spiffe_validator_config_pb2.SPIFFECertValidatorConfig(trust_domains=domains)
    custom = extension_pb2.TypedExtensionConfig(name=SPIFFE_VALIDATOR_NAME)
    custom.typed_config.Pack(validator)
    return secret_pb2.Secret(name=name, validation_context=common_pb2.CertificateValidationContext(
        custom_validator_config=custom))


def trusted_ca_secret(name: str, certs: Sequence[bytes]) -> secret_pb2.Secret:
    """A plain ``trusted_ca`` validation context (for ``disable_spiffe_cert_validation``)."""
    return secret_pb2.Secret(name=name, validation_context=common_pb2.CertificateValidationContext(
        trusted_ca=_inline(pem_certificates(certs, f"CA certificate of {name}"))))


# --- which validator --------------------------------------------------------------------

def supports_spiffe_validator(node: base_pb2.Node | None) -> bool:
    """Whether this Envoy has the SPIFFE validator: 1.18 or newer; no version counts as yes."""
    if node is None or not node.HasField("user_agent_build_version"):
        return True
    version = node.user_agent_build_version.version
    major, minor = version.major_number, version.minor_number
    return bool((major == 1 and minor > 17) or major > 1)


def spiffe_validation_disabled(node: base_pb2.Node | None, names: SdsNames) -> bool:
    """The configured setting, overridden per Envoy by node metadata
    ``disable_spiffe_cert_validation`` (a bool, or a string Go's ParseBool accepts);
    any other value is ignored, as SPIRE ignores it."""
    disabled = names.disable_spiffe_cert_validation
    if node is None or DISABLE_SPIFFE_CERT_VALIDATION_KEY not in node.metadata.fields:
        return disabled
    value = node.metadata.fields[DISABLE_SPIFFE_CERT_VALIDATION_KEY]
    kind = value.WhichOneof("kind")
    if kind == "bool_value":
        return bool(value.bool_value)
    if kind == "string_value":
        if value.string_value in _GO_TRUE:
            return True
        if value.string_value in _GO_FALSE:
            return False
    return disabled


def use_spiffe_validator(node: base_pb2.Node | None, names: SdsNames) -> bool:
    """SPIFFE validator unless disabled (config or node metadata) or Envoy is too old."""
    return supports_spiffe_validator(node) and not spiffe_validation_disabled(node, names)


# --- which bundles a caller sees --------------------------------------------------------

def caller_bundles(bundles: Bundles, trust_domain: str,
                   federates_with: Iterable[str]) -> dict[str, tuple[bytes, ...]]:
    """The bundles a caller may see, as SPIRE gives them: its own trust domain's and those
    its identities federate with (``spiffe://<td>`` or bare names); absent ones are skipped."""
    wanted = [trust_domain_key(trust_domain), *(trust_domain_key(td) for td in federates_with)]
    return {key: tuple(bundles[key]) for key in dict.fromkeys(wanted) if key in bundles}


# --- a whole request --------------------------------------------------------------------

@dataclass(frozen=True)
class SecretSelection:
    """What a set of requested names comes to.

    ``secrets``: the Secrets served, each named as requested (for an empty request: the
    local bundle, the federated bundles sorted, then each SVID by SPIFFE ID).
    ``unmet``: requested names that could not be served; ``reasons`` says why for each.
    ``workloads``: ``workload:<pod uid>`` names -> pod UID, left for the caller to serve.
    """

    secrets: tuple[secret_pb2.Secret, ...]
    unmet: frozenset[str] = frozenset()
    reasons: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))
    workloads: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(str(secret.name) for secret in self.secrets)


def select_secrets(requested: Iterable[str], svids: Sequence[X509Svid], bundles: Bundles,
                   trust_domain: str, *, spiffe_validator: bool,
                   names: SdsNames | None = None) -> SecretSelection:
    """Builds the Secrets for ``requested`` the way SPIRE's SDS server does.

    ``svids`` are the caller's, in order (``default`` is the first); ``bundles`` maps
    ``spiffe://<td>`` to DER CAs and holds what the caller may see (see ``caller_bundles``);
    ``trust_domain`` is the caller's (the agent's) trust domain, for ``ROOTCA``;
    ``spiffe_validator`` chooses the SPIFFE validator over ``trusted_ca`` (see
    ``use_spiffe_validator``). Empty names are ignored; no names at all means everything.
    """
    names = names or SdsNames()
    local = trust_domain_key(trust_domain)
    wanted = [name for name in dict.fromkeys(requested) if name]

    secrets: list[secret_pb2.Secret] = []
    unmet: dict[str, str] = {}
    workloads: dict[str, str] = {}

    def add(name: str, build: Callable[[], secret_pb2.Secret]) -> None:
        # A malformed SVID or bundle makes its own name unmet, not the whole request fail.
        try:
            secrets.append(build())
        except ValueError as error:
            unmet[name] = str(error)

    def validation(name: str, td_key: str) -> None:
        certs = bundles.get(td_key)
        if not certs:
            unmet[name] = f"no bundle for trust domain {td_key}"
        elif spiffe_validator:
            add(name, partial(spiffe_validation_secret, name, {td_key: certs}))
        else:
            add(name, partial(trusted_ca_secret, name, certs))

    def certificate(name: str, svid: X509Svid) -> None:
        add(name, partial(tls_certificate_secret, name, svid))

    first_by_id: dict[str, X509Svid] = {}
    for svid in svids:
        first_by_id.setdefault(svid.spiffe_id, svid)

    if not wanted:
        if bundles.get(local):
            validation(local, local)
        for key in sorted(bundles):
            if key != local and bundles[key]:
                validation(key, key)
        for spiffe_id, svid in first_by_id.items():
            certificate(spiffe_id, svid)
        return _selection(secrets, unmet, workloads)

    for name in wanted:
        asked = classify(name, names)
        if asked.kind is NameKind.DEFAULT_SVID:
            if svids:
                certificate(name, svids[0])
            else:
                unmet[name] = "the caller has no SVID"
        elif asked.kind is NameKind.SPIFFE_ID:
            if asked.value in first_by_id:
                certificate(name, first_by_id[asked.value])
            else:
                unmet[name] = "the caller has no SVID with this SPIFFE ID"
        elif asked.kind is NameKind.LOCAL_BUNDLE:
            validation(name, local)
        elif asked.kind is NameKind.TRUST_DOMAIN:
            validation(name, asked.value)
        elif asked.kind is NameKind.ALL_BUNDLES:
            usable = {key: certs for key, certs in bundles.items() if certs}
            if not spiffe_validator:
                unmet[name] = ("all bundles in one validation context need the SPIFFE "
                               "validator, which is disabled or unsupported for this Envoy")
            elif not usable:
                unmet[name] = "there are no bundles"
            else:
                add(name, partial(spiffe_validation_secret, name, usable))
        elif asked.kind is NameKind.WORKLOAD:
            workloads[name] = asked.value
        else:
            unmet[name] = asked.problem
    return _selection(secrets, unmet, workloads)


def _selection(secrets: list[secret_pb2.Secret], unmet: dict[str, str],
               workloads: dict[str, str]) -> SecretSelection:
    return SecretSelection(secrets=tuple(secrets), unmet=frozenset(unmet),
                           reasons=MappingProxyType(dict(unmet)),
                           workloads=MappingProxyType(dict(workloads)))
