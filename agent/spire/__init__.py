"""The SPIRE side: Delegated Identity API client, back-off, conversion and SVID checks."""

from agent.spire.backoff import Backoff, BackoffPolicy
from agent.spire.client import (
    DEFAULT_MAX_RECEIVE_MESSAGE_BYTES,
    ClientObserver,
    ClientStatus,
    DelegatedIdentityClient,
    NoopObserver,
)
from agent.spire.validation import SvidGate, TrustBundles, VerifiedSvid, validate_x509_svid

__all__ = [
    "DEFAULT_MAX_RECEIVE_MESSAGE_BYTES",
    "Backoff",
    "BackoffPolicy",
    "ClientObserver",
    "ClientStatus",
    "DelegatedIdentityClient",
    "NoopObserver",
    "SvidGate",
    "TrustBundles",
    "VerifiedSvid",
    "validate_x509_svid",
]
