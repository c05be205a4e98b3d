"""Tests of the SDS resources and the real-Envoy harness."""
