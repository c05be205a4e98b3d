"""SDS resource names: the settings that name them and what a requested name refers to."""

from __future__ import annotations

import enum
from dataclasses import dataclass

from agent.attest.cgroups import is_pod_uid
from agent.errors import ConfigError

__all__ = [
    "RESOURCE_KINDS",
    "SPIFFE_SCHEME",
    "WORKLOAD_PREFIX",
    "NameKind",
    "RequestedName",
    "SdsNames",
    "classify",
    "resource_kind",
    "workload_name",
]

SPIFFE_SCHEME = "spiffe://"
# Our own addition to SPIRE's names: a trusted proxy asks for another pod's SVID by pod UID.
WORKLOAD_PREFIX = "workload:"


@dataclass(frozen=True)
class SdsNames:
    """The names SPIRE's ``sds { ... }`` block configures, with SPIRE's defaults.

    When the bundle name and the all-bundles name are equal, SPIRE warns and ignores the
    all-bundles name; so does ``all_bundles_name`` here (the warning is the caller's).
    """

    default_svid_name: str = "default"
    default_bundle_name: str = "ROOTCA"
    default_all_bundles_name: str = "ALL"
    disable_spiffe_cert_validation: bool = False

    def __post_init__(self) -> None:
        for setting, value in (("default_svid_name", self.default_svid_name),
                               ("default_bundle_name", self.default_bundle_name),
                               ("default_all_bundles_name", self.default_all_bundles_name)):
            if not value:
                raise ConfigError(f"SDS {setting} is empty", "give it a name, e.g. the default")
            if value.startswith((SPIFFE_SCHEME, WORKLOAD_PREFIX)):
                raise ConfigError(
                    f"SDS {setting} {value!r} starts with {value.split(':', 1)[0]}:",
                    "that prefix is reserved for trust domains, SPIFFE IDs and pod UIDs")
        if self.default_svid_name in (self.default_bundle_name, self.default_all_bundles_name):
            raise ConfigError(
                f"SDS default_svid_name {self.default_svid_name!r} is also a bundle name",
                "an SVID and a bundle cannot share a resource name")

    @property
    def all_bundles_name(self) -> str | None:
        """The all-bundles name in effect: None when it equals the bundle name (as SPIRE)."""
        if self.default_all_bundles_name == self.default_bundle_name:
            return None
        return self.default_all_bundles_name


class NameKind(enum.Enum):
    DEFAULT_SVID = "default SVID"
    LOCAL_BUNDLE = "local trust domain bundle"
    ALL_BUNDLES = "all bundles"
    TRUST_DOMAIN = "trust domain bundle"
    SPIFFE_ID = "SVID by SPIFFE ID"
    WORKLOAD = "SVID of a pod"
    INVALID = "not a name this server knows"


@dataclass(frozen=True)
class RequestedName:
    """One requested resource name and what it refers to.

    ``value`` is ``spiffe://<td>`` for TRUST_DOMAIN, the SPIFFE ID for SPIFFE_ID, the pod
    UID for WORKLOAD, and empty otherwise; ``problem`` says why an INVALID name is invalid.
    """

    name: str
    kind: NameKind
    value: str = ""
    problem: str = ""


def workload_name(pod_uid: str) -> str:
    """The resource name under which a trusted proxy asks for a pod's SVID."""
    return WORKLOAD_PREFIX + pod_uid


def classify(name: str, names: SdsNames) -> RequestedName:
    """Says what ``name`` asks for. Names are matched exactly, as SPIRE matches them."""
    if name == names.default_svid_name:
        return RequestedName(name, NameKind.DEFAULT_SVID)
    if name == names.default_bundle_name:
        return RequestedName(name, NameKind.LOCAL_BUNDLE)
    if name == names.all_bundles_name:
        return RequestedName(name, NameKind.ALL_BUNDLES)
    if name.startswith(WORKLOAD_PREFIX):
        uid = name.removeprefix(WORKLOAD_PREFIX)
        if is_pod_uid(uid):
            return RequestedName(name, NameKind.WORKLOAD, uid)
        return RequestedName(name, NameKind.INVALID, problem=(
            "not a pod UID after 'workload:' (lower-case 8-4-4-4-12 hex with dashes)"))
    if name.startswith(SPIFFE_SCHEME):
        # Imported here, not at the top: `spiffe`'s package __init__ loads grpc and its
        # Workload API client (~130 ms), and this module is on the path `run` takes before
        # it binds the SDS socket.
        from spiffe.spiffe_id.spiffe_id import SpiffeId, SpiffeIdError

        try:
            spiffe_id = SpiffeId(name)
        except SpiffeIdError as error:
            return RequestedName(name, NameKind.INVALID, problem=str(error))
        if spiffe_id.path:
            return RequestedName(name, NameKind.SPIFFE_ID, name)
        return RequestedName(name, NameKind.TRUST_DOMAIN, name)
    return RequestedName(name, NameKind.INVALID, problem=(
        f"expected {names.default_svid_name!r}, {names.default_bundle_name!r}, "
        + (f"{names.all_bundles_name!r}, " if names.all_bundles_name else "")
        + "spiffe://<trust domain>, a SPIFFE ID or workload:<pod uid>"))


_KIND_LABELS = {
    NameKind.DEFAULT_SVID: "default",
    NameKind.LOCAL_BUNDLE: "ROOTCA",
    NameKind.ALL_BUNDLES: "ALL",
    NameKind.TRUST_DOMAIN: "trust_domain",
    NameKind.SPIFFE_ID: "spiffe_id",
    NameKind.WORKLOAD: "workload",
    NameKind.INVALID: "invalid",
}

RESOURCE_KINDS = tuple(_KIND_LABELS.values())
"""Every value :func:`resource_kind` returns."""


def resource_kind(name: str, names: SdsNames) -> str:
    """A bounded label for ``name`` (metrics): SPIRE's default name for the three
    configured names, whatever they are configured to; ``spiffe_id``, ``trust_domain`` or
    ``workload`` for the others (never the SPIFFE ID or pod UID itself)."""
    return _KIND_LABELS[classify(name, names).kind]
