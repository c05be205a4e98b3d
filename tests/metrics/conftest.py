"""Fixtures shared with the SDS server tests (real Envoys, dev-spire stacks, test PKI)."""

from __future__ import annotations

from tests.envoyproc import envoy_factory
from tests.sds_server.conftest import as_user, pki, work_dir

__all__ = ["as_user", "envoy_factory", "pki", "work_dir"]
