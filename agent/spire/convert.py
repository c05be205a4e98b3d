"""Pure conversions between Delegated Identity API protos and the model types."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from cryptography import x509

from agent._proto.spire.api.agent.delegatedidentity.v1 import delegatedidentity_pb2 as pb
from agent._proto.spire.api.types import jwtsvid_pb2, selector_pb2, spiffeid_pb2, x509svid_pb2
from agent.model import (
    JwtBundles,
    JwtSvid,
    Selector,
    X509Bundles,
    X509Svid,
    X509SvidUpdate,
    trust_domain_key,
)

__all__ = [
    "jwt_bundles_from_proto",
    "jwt_bundles_to_proto",
    "jwt_svid_from_proto",
    "jwt_svid_to_proto",
    "jwt_svids_from_proto",
    "jwt_svids_request",
    "jwt_svids_to_proto",
    "selector_to_proto",
    "spiffe_id_from_proto",
    "spiffe_id_to_proto",
    "split_der_certificates",
    "validate_selectors",
    "x509_bundle_certificates",
    "x509_bundles_by_trust_domain",
    "x509_bundles_from_proto",
    "x509_bundles_to_proto",
    "x509_svid_from_proto",
    "x509_svid_to_proto",
    "x509_svid_update_from_proto",
    "x509_svid_update_to_proto",
    "x509_svids_request",
]

_INT32_MAX = 2**31 - 1


# --- SPIFFE IDs and selectors ------------------------------------------------------------


def spiffe_id_from_proto(message: spiffeid_pb2.SPIFFEID) -> str:
    """``{trust_domain: "td", path: "/a"}`` -> ``spiffe://td/a``.

    Not validated here: a bad ID makes the SVID fail validation, which is reported with a
    reason, rather than breaking the whole stream.
    """
    path = message.path
    if path and not path.startswith("/"):
        path = "/" + path
    return f"spiffe://{message.trust_domain}{path}"


def spiffe_id_to_proto(spiffe_id: str) -> spiffeid_pb2.SPIFFEID:
    rest = spiffe_id.removeprefix("spiffe://")
    trust_domain, slash, path = rest.partition("/")
    return spiffeid_pb2.SPIFFEID(trust_domain=trust_domain, path=slash + path)


def selector_to_proto(selector: Selector) -> selector_pb2.Selector:
    return selector_pb2.Selector(type=selector.type, value=selector.value)


def validate_selectors(selectors: Sequence[Selector]) -> None:
    """Applies SPIRE's own selector rules, so a bad selector is our caller's ValueError
    instead of an INVALID_ARGUMENT from SPIRE ("could not parse provided selectors")."""
    if not selectors:
        raise ValueError("selectors must not be empty; give at least one type:value selector")
    for selector in selectors:
        if not selector.type or ":" in selector.type:
            raise ValueError(
                f"selector type {selector.type!r} must be non-empty and contain no ':' "
                f"(selector {selector})"
            )
        if not selector.value:
            raise ValueError(f"selector {selector} has an empty value")


def _workload_fields(
    pid: int | None, selectors: Sequence[Selector] | None
) -> tuple[int, list[selector_pb2.Selector]]:
    """Checks the "exactly one of pid or selectors" rule that the proto cannot express."""
    if (pid is None) == (selectors is None):
        raise ValueError(
            "name the workload by exactly one of pid= or selectors=, not both and not neither"
        )
    if pid is not None:
        if isinstance(pid, bool) or not isinstance(pid, int) or not 0 < pid <= _INT32_MAX:
            raise ValueError(f"pid must be a positive 32-bit process ID, got {pid!r}")
        return pid, []
    assert selectors is not None
    validate_selectors(selectors)
    return 0, [selector_to_proto(s) for s in selectors]


def x509_svids_request(
    *, pid: int | None = None, selectors: Sequence[Selector] | None = None
) -> pb.SubscribeToX509SVIDsRequest:
    pid_value, selector_protos = _workload_fields(pid, selectors)
    return pb.SubscribeToX509SVIDsRequest(pid=pid_value, selectors=selector_protos)


def jwt_svids_request(
    audience: Sequence[str], *, pid: int | None = None, selectors: Sequence[Selector] | None = None
) -> pb.FetchJWTSVIDsRequest:
    if isinstance(audience, str):
        raise ValueError("audience must be a sequence of strings, not a single string")
    if not audience or any(not a for a in audience):
        raise ValueError("audience must name at least one non-empty audience")
    pid_value, selector_protos = _workload_fields(pid, selectors)
    return pb.FetchJWTSVIDsRequest(
        audience=list(audience), pid=pid_value, selectors=selector_protos
    )


# --- X.509 -------------------------------------------------------------------------------


def split_der_certificates(data: bytes) -> tuple[bytes, ...]:
    """Splits concatenated DER certificates (SPIRE's bundle encoding) without re-encoding.

    Only the outer ASN.1 SEQUENCE framing is read; whether each piece is a certificate is
    for the caller to check. Raises ValueError on anything that is not well-formed DER
    framing (wrong tag, indefinite or non-minimal length, truncation).
    """
    certs: list[bytes] = []
    pos = 0
    while pos < len(data):
        start = pos
        if data[pos] != 0x30:
            raise ValueError(f"expected a DER SEQUENCE at offset {pos}, found tag {data[pos]:#04x}")
        pos += 1
        if pos >= len(data):
            raise ValueError(f"truncated DER length at offset {pos}")
        first = data[pos]
        pos += 1
        if first < 0x80:
            length = first
        else:
            count = first & 0x7F
            if count == 0 or count > 4:
                raise ValueError(f"unsupported DER length form {first:#04x} at offset {pos - 1}")
            if pos + count > len(data):
                raise ValueError(f"truncated DER length at offset {pos}")
            length = int.from_bytes(data[pos : pos + count], "big")
            if length < 0x80 or data[pos] == 0:
                raise ValueError(f"non-minimal DER length at offset {pos - 1}")
            pos += count
        end = pos + length
        if end > len(data):
            raise ValueError(
                f"DER certificate at offset {start} claims {length} bytes, "
                f"only {len(data) - pos} remain"
            )
        certs.append(data[start:end])
        pos = end
    return tuple(certs)


def x509_svid_from_proto(message: pb.X509SVIDWithKey) -> X509Svid:
    svid = message.x509_svid
    return X509Svid(
        spiffe_id=spiffe_id_from_proto(svid.id),
        cert_chain=tuple(svid.cert_chain),
        private_key=message.x509_svid_key,
        expires_at=svid.expires_at,
        hint=svid.hint,
    )


def x509_svid_to_proto(svid: X509Svid) -> pb.X509SVIDWithKey:
    return pb.X509SVIDWithKey(
        x509_svid=x509svid_pb2.X509SVID(
            cert_chain=list(svid.cert_chain),
            id=spiffe_id_to_proto(svid.spiffe_id),
            expires_at=svid.expires_at,
            hint=svid.hint,
        ),
        x509_svid_key=svid.private_key,
    )


def x509_svid_update_from_proto(message: pb.SubscribeToX509SVIDsResponse) -> X509SvidUpdate:
    return X509SvidUpdate(
        svids=tuple(x509_svid_from_proto(item) for item in message.x509_svids),
        federates_with=tuple(message.federates_with),
    )


def x509_svid_update_to_proto(update: X509SvidUpdate) -> pb.SubscribeToX509SVIDsResponse:
    return pb.SubscribeToX509SVIDsResponse(
        x509_svids=[x509_svid_to_proto(svid) for svid in update.svids],
        federates_with=list(update.federates_with),
    )


def x509_bundles_from_proto(message: pb.SubscribeToX509BundlesResponse) -> X509Bundles:
    """Keys are normalised to ``spiffe://<td>``: SPIRE sends that form although the proto
    comment says "trust domain name", so both are accepted."""
    bundles: dict[str, tuple[bytes, ...]] = {}
    for key, value in message.ca_certificates.items():
        try:
            bundles[trust_domain_key(key)] = split_der_certificates(value)
        except ValueError as exc:
            raise ValueError(f"X.509 bundle for {key!r} is not concatenated DER: {exc}") from exc
    return X509Bundles(bundles=bundles)


def x509_bundle_certificates(value: bytes) -> tuple[bytes, ...]:
    """One trust domain's bundle value -> its CA certificates (DER each), or ValueError.

    Stricter than the framing check alone: every piece must parse as an X.509 certificate
    and there must be at least one, because a bundle that verifies nothing is no bundle."""
    certs = split_der_certificates(value)
    if not certs:
        raise ValueError("no certificates")
    for index, der in enumerate(certs):
        try:
            x509.load_der_x509_certificate(der)
        except ValueError as exc:
            raise ValueError(f"certificate #{index} does not parse: {exc}") from None
    return certs


def x509_bundles_by_trust_domain(
    message: pb.SubscribeToX509BundlesResponse,
) -> tuple[X509Bundles, dict[str, str]]:
    """Like :func:`x509_bundles_from_proto`, one trust domain at a time: returns the
    bundles that parse and, separately, why each other trust domain's did not
    (``spiffe://td`` -> reason), so one bad federated bundle cannot sink the rest."""
    good: dict[str, tuple[bytes, ...]] = {}
    bad: dict[str, str] = {}
    for key, value in message.ca_certificates.items():
        try:
            good[trust_domain_key(key)] = x509_bundle_certificates(value)
        except ValueError as exc:
            bad[trust_domain_key(key)] = str(exc)
    return X509Bundles(bundles=good), bad


def x509_bundles_to_proto(bundles: X509Bundles) -> pb.SubscribeToX509BundlesResponse:
    return pb.SubscribeToX509BundlesResponse(
        ca_certificates={key: b"".join(certs) for key, certs in bundles.bundles.items()}
    )


# --- JWT ---------------------------------------------------------------------------------


def jwt_svid_from_proto(message: jwtsvid_pb2.JWTSVID) -> JwtSvid:
    return JwtSvid(
        token=message.token,
        spiffe_id=spiffe_id_from_proto(message.id),
        expires_at=message.expires_at,
        issued_at=message.issued_at,
        hint=message.hint,
    )


def jwt_svid_to_proto(svid: JwtSvid) -> jwtsvid_pb2.JWTSVID:
    return jwtsvid_pb2.JWTSVID(
        token=svid.token,
        id=spiffe_id_to_proto(svid.spiffe_id),
        expires_at=svid.expires_at,
        issued_at=svid.issued_at,
        hint=svid.hint,
    )


def jwt_svids_from_proto(message: pb.FetchJWTSVIDsResponse) -> list[JwtSvid]:
    return [jwt_svid_from_proto(item) for item in message.svids]


def jwt_svids_to_proto(svids: Iterable[JwtSvid]) -> pb.FetchJWTSVIDsResponse:
    return pb.FetchJWTSVIDsResponse(svids=[jwt_svid_to_proto(s) for s in svids])


def jwt_bundles_from_proto(message: pb.SubscribeToJWTBundlesResponse) -> JwtBundles:
    return JwtBundles(bundles={trust_domain_key(k): v for k, v in message.bundles.items()})


def jwt_bundles_to_proto(bundles: JwtBundles) -> pb.SubscribeToJWTBundlesResponse:
    return pb.SubscribeToJWTBundlesResponse(bundles=dict(bundles.bundles))
