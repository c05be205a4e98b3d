"""Tests of dev-spire, the SPIRE-agent-compatible development server."""
