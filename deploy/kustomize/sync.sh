#!/usr/bin/env bash
# Refreshes the copies that the kustomizations carry of deploy/envoy and deploy/monitoring.
#
# Kustomize loads files only from inside a kustomization's own directory (a path that leaves
# it, and a symlink pointing out of it, fail with "security; file ... is not in or below ..."),
# so the kustomizations hold byte-for-byte copies of the canonical files, which the demo and
# the tests run. tests/deploy/test_manifests.py fails when a copy differs from its original;
# run this script after editing an original:
#
#   bash deploy/kustomize/sync.sh
#
# One `cp ORIGINAL COPY` line per copy, paths from the repository root: the test reads them.
set -euo pipefail
cd "$(dirname "$0")/../.."
cp deploy/envoy/node-proxy.yaml deploy/kustomize/base/node-proxy.yaml
cp deploy/envoy/registry-side.yaml deploy/kustomize/examples/registry-side/registry-side.yaml
cp deploy/monitoring/networkpolicy.yaml deploy/kustomize/components/metrics-files/networkpolicy.yaml
cp deploy/monitoring/servicemonitor-files.yaml deploy/kustomize/components/metrics-files/servicemonitor-files.yaml
cp deploy/monitoring/networkpolicy.yaml deploy/kustomize/components/metrics-spiffe/networkpolicy.yaml
cp deploy/monitoring/servicemonitor-spiffe.yaml deploy/kustomize/components/metrics-spiffe/servicemonitor-spiffe.yaml
