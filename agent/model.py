"""Plain value objects shared by every module: SVIDs, bundles, JWT material."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class X509Svid:
    """One X.509-SVID with its key, as SPIRE delivered it (DER throughout).

    The key never appears in ``repr`` so that logging an SVID cannot leak it.
    """

    spiffe_id: str
    cert_chain: tuple[bytes, ...]
    private_key: bytes = field(repr=False)
    expires_at: int
    hint: str = ""

    @property
    def trust_domain(self) -> str:
        return self.spiffe_id.removeprefix("spiffe://").split("/", 1)[0]


@dataclass(frozen=True)
class X509SvidUpdate:
    """One state-of-the-world answer of SubscribeToX509SVIDs."""

    svids: tuple[X509Svid, ...]
    federates_with: tuple[str, ...] = ()


@dataclass(frozen=True)
class X509Bundles:
    """Every X.509 bundle SPIRE tracks: ``spiffe://<td>`` -> CA certificates (DER each)."""

    bundles: dict[str, tuple[bytes, ...]]

    def for_trust_domain(self, trust_domain: str) -> tuple[bytes, ...] | None:
        return self.bundles.get(trust_domain_key(trust_domain))


@dataclass(frozen=True)
class JwtSvid:
    token: str = field(repr=False)
    spiffe_id: str
    expires_at: int
    issued_at: int
    hint: str = ""


@dataclass(frozen=True)
class JwtBundles:
    """Every JWT bundle SPIRE tracks: ``spiffe://<td>`` -> JWKS document (JSON bytes)."""

    bundles: dict[str, bytes]


@dataclass(frozen=True)
class Selector:
    type: str
    value: str

    @classmethod
    def parse(cls, text: str) -> Selector:
        """Parses ``type:value`` (the value may itself contain colons)."""
        kind, sep, value = text.partition(":")
        if not sep or not kind or not value:
            raise ValueError(
                f"selector {text!r} is not of the form type:value, e.g. k8s:ns:default")
        return cls(kind, value)

    def __str__(self) -> str:
        return f"{self.type}:{self.value}"


def trust_domain_key(trust_domain: str) -> str:
    """``example.org`` or ``spiffe://example.org`` -> ``spiffe://example.org``."""
    return trust_domain if trust_domain.startswith("spiffe://") else f"spiffe://{trust_domain}"
