"""Checks X.509-SVIDs from SPIRE before anything downstream may see or serve them."""

from __future__ import annotations

import base64
import hashlib
import logging
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.verification import (
    Criticality,
    ExtensionPolicy,
    PolicyBuilder,
    Store,
    VerificationError,
)
from spiffe.errors import PySpiffeError
from spiffe.spiffe_id.spiffe_id import SpiffeId
from spiffe.svid.errors import InvalidIntermediateCertificateError, InvalidLeafCertificateError
from spiffe.svid.x509_svid import X509Svid as PySpiffeX509Svid
from spiffe.utils.errors import ParsePrivateKeyError

from agent.errors import SvidPending, SvidRejected
from agent.model import X509Bundles, X509Svid, X509SvidUpdate, trust_domain_key

__all__ = [
    "RECHECK_REASONS",
    "SvidGate",
    "TrustBundles",
    "VerifiedSvid",
    "utc_now",
    "validate_x509_svid",
]

# Rejections that a later bundle (or a later moment) can cure; other reasons are final for
# that certificate, and only a new one from SPIRE can replace it.
RECHECK_REASONS = frozenset({"untrusted_chain", "not_yet_valid"})


def utc_now() -> datetime:
    return datetime.now(UTC)


def _aware(moment: datetime) -> datetime:
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


def _fingerprint(svid: X509Svid) -> str:
    """Identifies one issued certificate in logs and de-duplication (never the key)."""
    leaf = svid.cert_chain[0] if svid.cert_chain else b""
    return hashlib.sha256(leaf).hexdigest()[:16]


@dataclass(frozen=True)
class TrustBundles:
    """X.509 bundles parsed once, ready to verify chains against (``spiffe://td`` keys)."""

    source: X509Bundles
    anchors: Mapping[str, tuple[x509.Certificate, ...]]
    # Certificates SPIRE sent that did not parse, per trust domain (logged by the gate).
    unparsable: Mapping[str, int] = field(default_factory=dict)

    @classmethod
    def parse(cls, bundles: X509Bundles) -> TrustBundles:
        anchors: dict[str, tuple[x509.Certificate, ...]] = {}
        unparsable: dict[str, int] = {}
        for key, ders in bundles.bundles.items():
            parsed: list[x509.Certificate] = []
            for der in ders:
                try:
                    parsed.append(x509.load_der_x509_certificate(der))
                except ValueError:
                    unparsable[key] = unparsable.get(key, 0) + 1
            anchors[trust_domain_key(key)] = tuple(parsed)
        return cls(source=bundles, anchors=anchors, unparsable=unparsable)

    def for_trust_domain(self, trust_domain: str) -> tuple[x509.Certificate, ...] | None:
        """The bundle's certificates, or None if there is no usable bundle for it."""
        certs = self.anchors.get(trust_domain_key(trust_domain))
        return certs if certs else None


@dataclass(frozen=True)
class VerifiedSvid:
    """An SVID that passed every check, with the facts the gate needs about it."""

    svid: X509Svid
    not_before: datetime
    not_after: datetime
    fingerprint: str

    def valid_at(self, now: datetime) -> bool:
        return self.not_before <= _aware(now) <= self.not_after


def _reject(svid: X509Svid, reason: str, detail: str) -> SvidRejected:
    return SvidRejected(f"X.509-SVID for {svid.spiffe_id!r} rejected: {detail}", reason)


def _ca_extension_policy() -> ExtensionPolicy:
    # The Web PKI CA profile insists on extensions (e.g. authorityKeyIdentifier) that the
    # SPIFFE X.509-SVID spec does not; the verifier itself still demands cA=TRUE on every
    # issuer, and py-spiffe checks keyCertSign on the intermediates in the chain.
    return ExtensionPolicy.permit_all().require_present(
        x509.BasicConstraints, Criticality.AGNOSTIC, None
    )


def _verify_chain(
    svid: X509Svid,
    leaf: x509.Certificate,
    intermediates: list[x509.Certificate],
    anchors: tuple[x509.Certificate, ...],
    now: datetime,
) -> None:
    """Path validation (signatures, validity, CA flags, name constraints) to a bundle root.

    A client verifier with a permissive end-entity policy accepts URI-only SANs; the
    SPIFFE-specific leaf rules are checked separately, by py-spiffe and by us.
    """
    verifier = (
        PolicyBuilder()
        .store(Store(list(anchors)))
        .time(now)
        .extension_policies(
            ca_policy=_ca_extension_policy(), ee_policy=ExtensionPolicy.permit_all()
        )
        .build_client_verifier()
    )
    try:
        verifier.verify(leaf, intermediates)
    except VerificationError as exc:
        raise _reject(
            svid,
            "untrusted_chain",
            f"certificate chain does not verify to the bundle of trust domain "
            f"{svid.trust_domain!r}: {exc}",
        ) from None


# Key types Envoy's TLS stack takes for a certificate (measured with Envoy 1.40: RSA-1024
# and secp256k1 pass X.509 checks but Envoy NACKs them).
_ENVOY_CURVES = (ec.SECP256R1, ec.SECP384R1, ec.SECP521R1)
_MIN_RSA_BITS = 2048


def _pem_chain(chain: list[x509.Certificate]) -> bytes:
    return b"".join(cert.public_bytes(serialization.Encoding.PEM) for cert in chain)


def _pem_private_key(pkcs8_der: bytes) -> bytes:
    """The PKCS#8 DER key in a PEM block, in memory only (never logged)."""
    return (b"-----BEGIN PRIVATE KEY-----\n" + base64.encodebytes(pkcs8_der)
            + b"-----END PRIVATE KEY-----\n")


def _weak_key(key: object) -> str:
    """Why Envoy would refuse the leaf's key, or "" when it takes it."""
    if isinstance(key, rsa.RSAPublicKey) and key.key_size < _MIN_RSA_BITS:
        return f"RSA key of {key.key_size} bits (at least {_MIN_RSA_BITS} needed)"
    if isinstance(key, ec.EllipticCurvePublicKey) and not isinstance(key.curve, _ENVOY_CURVES):
        return f"elliptic curve {key.curve.name} (P-256, P-384 or P-521 needed)"
    return ""


def validate_x509_svid(
    svid: X509Svid,
    bundles: TrustBundles | None,
    *,
    now: datetime,
    trust_domain: str | None = None,
) -> VerifiedSvid:
    """Checks one SVID; returns it verified or raises SvidRejected / SvidPending.

    ``trust_domain``: the agent's own trust domain, when known; a SPIRE agent issues SVIDs
    of its own trust domain only, so any other is refused (``wrong_trust_domain``) rather
    than held back waiting for a bundle of that trust domain.

    Order matters only for which reason is reported when several apply: structure first,
    then identity, key, time, and last the chain (the only check that needs a bundle).
    """
    now = _aware(now)
    if not svid.cert_chain:
        raise _reject(svid, "malformed", "empty certificate chain")
    try:
        chain = [x509.load_der_x509_certificate(der) for der in svid.cert_chain]
    except ValueError as exc:
        raise _reject(svid, "malformed", f"certificate does not parse: {exc}") from None
    leaf = chain[0]

    try:
        expected_id = SpiffeId(svid.spiffe_id)
    except PySpiffeError as exc:
        raise _reject(svid, "malformed", f"id field is not a SPIFFE ID: {exc}") from None

    if trust_domain is not None and (
        trust_domain_key(expected_id.trust_domain.name) != trust_domain_key(trust_domain)
    ):
        raise _reject(
            svid,
            "wrong_trust_domain",
            f"SPIFFE ID is in trust domain {expected_id.trust_domain.name!r}, not the "
            f"agent's {trust_domain.removeprefix('spiffe://')!r}",
        )

    try:
        sans = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        uris = sans.get_values_for_type(x509.UniformResourceIdentifier)
    except x509.ExtensionNotFound:
        uris = []
    if uris != [str(expected_id)]:
        raise _reject(
            svid,
            "wrong_san",
            f"leaf must carry exactly one URI SAN equal to {str(expected_id)!r}, has {uris!r}",
        )

    try:
        constraints = leaf.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        constraints = None
    if constraints is not None and constraints.ca:
        raise _reject(svid, "is_ca", "leaf certificate is a CA (basicConstraints cA=TRUE)")

    # py-spiffe applies the rest of the X.509-SVID profile: key usage on the leaf, cA and
    # keyCertSign on intermediates, a non-root path, and parses the PKCS#8 key. Its PEM
    # entry point is handed the certificates parsed above: the DER one (parse_raw) splits
    # the chain with pyasn1, decoding and re-encoding every certificate against the whole
    # RFC 5280 schema, which was 1.1 ms of the 2 ms this function took per SVID, on every
    # rotation (docs/profiles/rotation-agent-validate.txt); the checks are the same.
    try:
        parsed = PySpiffeX509Svid.parse(_pem_chain(chain), _pem_private_key(svid.private_key))
    except InvalidIntermediateCertificateError as exc:
        raise _reject(svid, "untrusted_chain", f"intermediate certificate: {exc}") from None
    except InvalidLeafCertificateError as exc:
        raise _reject(svid, "malformed", f"leaf is not a valid X.509-SVID: {exc}") from None
    except ParsePrivateKeyError:
        # The parser's own message is generic; never include the key material.
        raise _reject(svid, "malformed", "private key is not a parsable PKCS#8 DER key") from None
    except PySpiffeError as exc:
        raise _reject(svid, "malformed", str(exc)) from None

    spki = serialization.PublicFormat.SubjectPublicKeyInfo
    der = serialization.Encoding.DER
    if parsed.private_key.public_key().public_bytes(der, spki) != leaf.public_key().public_bytes(
        der, spki
    ):
        raise _reject(svid, "key_mismatch", "private key does not match the leaf certificate")

    weakness = _weak_key(leaf.public_key())
    if weakness:
        raise _reject(svid, "weak_key", f"{weakness}; Envoy refuses it (NACK)")

    for position, cert in enumerate(chain):
        which = "leaf" if position == 0 else f"chain certificate #{position}"
        if now < cert.not_valid_before_utc:
            raise _reject(
                svid,
                "not_yet_valid",
                f"{which} is not valid before {cert.not_valid_before_utc.isoformat()} "
                f"(now {now.isoformat()}; check clock skew)",
            )
        if now > cert.not_valid_after_utc:
            raise _reject(
                svid,
                "expired",
                f"{which} expired at {cert.not_valid_after_utc.isoformat()}",
            )

    anchors = bundles.for_trust_domain(svid.trust_domain) if bundles is not None else None
    if anchors is None:
        raise SvidPending(
            f"X.509-SVID for {svid.spiffe_id!r} held back: no bundle for trust domain "
            f"{svid.trust_domain!r} yet",
            "it is served once SPIRE sends that trust domain's bundle",
        )
    _verify_chain(svid, leaf, chain[1:], anchors, now)
    return VerifiedSvid(
        svid=svid,
        not_before=leaf.not_valid_before_utc,
        not_after=leaf.not_valid_after_utc,
        fingerprint=_fingerprint(svid),
    )


def _valid_from(svid: X509Svid) -> datetime | None:
    """The moment every certificate of the chain has become valid (None: unparsable)."""
    try:
        chain = [x509.load_der_x509_certificate(der) for der in svid.cert_chain]
    except ValueError:
        return None
    return max((cert.not_valid_before_utc for cert in chain), default=None)


class SvidGate:
    """Lets only verified SVIDs of one subscription through, keeping the last good ones.

    Feed it every X509SvidUpdate of one SubscribeToX509SVIDs stream and every bundle
    update; each call returns the accepted state of the world, in SPIRE's order:

    - a valid new SVID replaces the one in use for its SPIFFE ID;
    - a rejected one is logged and counted once (``rejections`` by reason), and the
      previous good SVID for that ID stays in use while it is still valid;
    - a pending one (no bundle for its trust domain yet) also keeps the previous one and is
      checked again when bundles arrive, as are chain and not-yet-valid rejections;
    - SPIFFE IDs missing from a new update are dropped.

    One gate per SVID subscription; bundles usually come from one shared bundle stream
    (pass the same ``TrustBundles`` to many gates to parse them once). Not thread-safe.
    """

    def __init__(
        self,
        *,
        clock: Callable[[], datetime] = utc_now,
        label: str = "",
        logger: logging.Logger | None = None,
        unchained_level: int = logging.WARNING,
        on_reject: Callable[[str], None] | None = None,
        trust_domain: Callable[[], str | None] | None = None,
    ) -> None:
        """``unchained_level``: the level of "the SVID in use no longer verifies against
        the new bundle" (an owner that reports that episode itself lowers it);
        ``on_reject(reason)``: called for each rejection as it is counted;
        ``trust_domain()``: the agent's trust domain when known (SVIDs of others are
        refused)."""
        self._clock = clock
        self._label = f"[{label}] " if label else ""
        self._log = logger if logger is not None else logging.getLogger("spiffe_delegate.spire")
        self._unchained_level = unchained_level
        self._on_reject = on_reject
        self._trust_domain = trust_domain
        self.rejections: Counter[str] = Counter()
        # spiffe id -> when its held-back, not-yet-valid SVID becomes valid.
        self._not_before: dict[str, datetime] = {}
        self._bundles: TrustBundles | None = None
        self._order: tuple[str, ...] = ()
        self._federates_with: tuple[str, ...] = ()
        self._in_use: dict[str, VerifiedSvid] = {}
        self._candidates: dict[str, X509Svid] = {}
        # spiffe id -> (fingerprint, outcome) last reported, so each is logged once.
        self._reported: dict[str, tuple[str, str]] = {}
        self._unchained: set[tuple[str, str]] = set()

    @property
    def in_use(self) -> Mapping[str, VerifiedSvid]:
        """Every SVID currently accepted, by SPIFFE ID (may include expired ones until the
        next call to ``accepted``)."""
        return dict(self._in_use)

    @property
    def pending(self) -> frozenset[str]:
        """SPIFFE IDs whose newest SVID is held back and will be re-checked on new bundles."""
        return frozenset(self._candidates)

    @property
    def bundles(self) -> TrustBundles | None:
        return self._bundles

    def update_svids(self, update: X509SvidUpdate) -> X509SvidUpdate:
        """Consumes one state-of-the-world update; returns the accepted state."""
        now = _aware(self._clock())
        order: list[str] = []
        newest: dict[str, list[X509Svid]] = {}
        for svid in update.svids:
            if svid.spiffe_id not in newest:
                order.append(svid.spiffe_id)
                newest[svid.spiffe_id] = []
            newest[svid.spiffe_id].append(svid)
        self._order = tuple(order)
        self._federates_with = update.federates_with

        for gone in (set(self._in_use) | set(self._candidates) | set(self._reported)) - set(
            newest
        ):
            if gone in self._in_use:
                self._log.info(
                    "%sSPIFFE ID %s no longer issued by SPIRE; dropped", self._label, gone
                )
            self._forget(gone)

        for svids in newest.values():
            # Two registration entries may give the same SPIFFE ID; the first one that
            # passes wins, as SPIRE's own SDS server serves the first.
            for svid in svids:
                if self._consider(svid, now):
                    break
        return self.accepted()

    def update_bundles(self, bundles: X509Bundles | TrustBundles) -> X509SvidUpdate:
        """Consumes a new bundle set; re-checks held-back SVIDs and the ones in use."""
        parsed = bundles if isinstance(bundles, TrustBundles) else TrustBundles.parse(bundles)
        for key, count in parsed.unparsable.items():
            self._log.warning(
                "%sX.509 bundle for %s contains %d certificate(s) that do not parse; ignored",
                self._label,
                key,
                count,
            )
        self._bundles = parsed
        now = _aware(self._clock())
        for svid in list(self._candidates.values()):
            self._consider(svid, now)
        for spiffe_id, verified in self._in_use.items():
            self._check_still_chains(spiffe_id, verified, now)
        return self.accepted()

    def next_recheck(self) -> datetime | None:
        """When the earliest held-back, not-yet-valid SVID becomes valid (call
        :meth:`recheck` then), or None when no SVID waits for a moment."""
        return min(self._not_before.values(), default=None)

    def recheck(self) -> X509SvidUpdate:
        """Re-validates held-back SVIDs now (e.g. on a timer, for a not-yet-valid one)."""
        now = _aware(self._clock())
        for svid in list(self._candidates.values()):
            self._consider(svid, now)
        return self.accepted()

    def accepted(self) -> X509SvidUpdate:
        """The SVIDs to serve now; kept SVIDs that have since expired are dropped here."""
        now = _aware(self._clock())
        for spiffe_id, verified in list(self._in_use.items()):
            if now > verified.not_after:
                self._log.warning(
                    "%sX.509-SVID for %s (cert %s) expired at %s with no valid replacement "
                    "from SPIRE; no longer served",
                    self._label,
                    spiffe_id,
                    verified.fingerprint,
                    verified.not_after.isoformat(),
                )
                del self._in_use[spiffe_id]
        svids = tuple(
            self._in_use[sid].svid
            for sid in self._order
            if sid in self._in_use and self._in_use[sid].valid_at(now)
        )
        return X509SvidUpdate(svids=svids, federates_with=self._federates_with)

    # --- internals ------------------------------------------------------------------------

    def _forget(self, spiffe_id: str) -> None:
        self._in_use.pop(spiffe_id, None)
        self._candidates.pop(spiffe_id, None)
        self._reported.pop(spiffe_id, None)
        self._not_before.pop(spiffe_id, None)
        self._unchained = {item for item in self._unchained if item[0] != spiffe_id}

    def _consider(self, svid: X509Svid, now: datetime) -> bool:
        """Validates one SVID and updates state; True if it is now the one in use."""
        spiffe_id = svid.spiffe_id
        fingerprint = _fingerprint(svid)
        current = self._in_use.get(spiffe_id)
        self._not_before.pop(spiffe_id, None)
        if current is not None and current.svid == svid:
            # SPIRE re-sends unchanged SVIDs (e.g. on any own-bundle change).
            self._candidates.pop(spiffe_id, None)
            return True
        previous = (
            f"keeping the previous SVID (cert {current.fingerprint}, valid until "
            f"{current.not_after.isoformat()})"
            if current is not None and current.valid_at(now)
            else "nothing is served for it"
        )
        trust_domain = self._trust_domain() if self._trust_domain is not None else None
        try:
            verified = validate_x509_svid(svid, self._bundles, now=now,
                                          trust_domain=trust_domain)
        except SvidPending as exc:
            self._candidates[spiffe_id] = svid
            if self._reported.get(spiffe_id) != (fingerprint, "pending"):
                self._reported[spiffe_id] = (fingerprint, "pending")
                self._log.info("%s%s; %s", self._label, exc.message, previous)
            return False
        except SvidRejected as exc:
            if exc.reason in RECHECK_REASONS:
                self._candidates[spiffe_id] = svid
            else:
                self._candidates.pop(spiffe_id, None)
            if exc.reason == "not_yet_valid":
                valid_from = _valid_from(svid)
                if valid_from is not None:
                    self._not_before[spiffe_id] = valid_from
            if self._reported.get(spiffe_id) != (fingerprint, exc.reason):
                self._reported[spiffe_id] = (fingerprint, exc.reason)
                self.rejections[exc.reason] += 1
                if self._on_reject is not None:
                    self._on_reject(exc.reason)
                self._log.warning(
                    "%s%s (reason=%s, cert %s); %s",
                    self._label,
                    exc.message,
                    exc.reason,
                    fingerprint,
                    previous,
                )
            return False
        self._candidates.pop(spiffe_id, None)
        if self._reported.pop(spiffe_id, None) is not None:
            self._log.info(
                "%sX.509-SVID for %s (cert %s) now verifies; serving it",
                self._label,
                spiffe_id,
                fingerprint,
            )
        else:
            self._log.debug(
                "%saccepted X.509-SVID for %s (cert %s, valid until %s)",
                self._label,
                spiffe_id,
                fingerprint,
                verified.not_after.isoformat(),
            )
        self._in_use[spiffe_id] = verified
        return True

    def _check_still_chains(self, spiffe_id: str, verified: VerifiedSvid, now: datetime) -> None:
        key = (spiffe_id, verified.fingerprint)
        try:
            validate_x509_svid(verified.svid, self._bundles, now=now)
        except SvidRejected as exc:
            if exc.reason != "untrusted_chain":
                return  # e.g. expired: ``accepted`` reports and drops it
            self._report_unchained(key, verified, exc.message)
        except SvidPending as exc:
            self._report_unchained(key, verified, exc.message)
        else:
            if key in self._unchained:
                self._unchained.discard(key)
                self._log.info(
                    "%sthe X.509-SVID in use for %s verifies against the bundle again",
                    self._label,
                    spiffe_id,
                )

    def _report_unchained(self, key: tuple[str, str], verified: VerifiedSvid, why: str) -> None:
        if key not in self._unchained:
            self._unchained.add(key)
            self._log.log(
                self._unchained_level,
                "%sbundle update: the X.509-SVID in use for %s (cert %s) no longer "
                "verifies (%s); still serving it until SPIRE sends a replacement or it "
                "expires at %s",
                self._label,
                key[0],
                verified.fingerprint,
                why,
                verified.not_after.isoformat(),
            )
