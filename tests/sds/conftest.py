"""Fixtures for the SDS tests: a small PKI (two trust domains) and the real-Envoy factory."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from agent.model import X509Svid
from tests.envoyproc import envoy_factory
from tests.sds.pki import MintedCa, make_ca, make_svid

__all__ = ["Pki", "envoy_factory", "pki"]

LOCAL_TD = "example.org"
FEDERATED_TD = "partner.test"
ZULU_TD = "zulu.example"


@dataclass(frozen=True)
class Pki:
    local: MintedCa
    federated: MintedCa
    zulu: MintedCa
    proxy: X509Svid       # spiffe://example.org/ns/zarf/sa/registry-proxy
    second: X509Svid      # spiffe://example.org/ns/zarf/sa/second

    @property
    def bundles(self) -> dict[str, tuple[bytes, ...]]:
        # Deliberately not in sorted order: ALL must sort them.
        return {self.zulu.key_name: (self.zulu.der,),
                self.local.key_name: (self.local.der,),
                self.federated.key_name: (self.federated.der,)}


@pytest.fixture(scope="module")
def pki() -> Pki:
    local = make_ca(LOCAL_TD)
    return Pki(local=local, federated=make_ca(FEDERATED_TD), zulu=make_ca(ZULU_TD),
               proxy=make_svid(local, f"spiffe://{LOCAL_TD}/ns/zarf/sa/registry-proxy"),
               second=make_svid(local, f"spiffe://{LOCAL_TD}/ns/zarf/sa/second"))
