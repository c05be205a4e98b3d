# SPIRE agent settings for spiffe-delegate: merge into the `agent {}` block of the SPIRE
# agent's configuration (agent.conf; in the upstream Kubernetes manifests, the spire-agent
# ConfigMap). Placeholders: trust domain example.org.
#
# admin_socket_path turns on the admin API, which serves the Delegated Identity API; it is off
# by default. It must not be in the Workload API socket's directory nor under it (SPIRE
# refuses to start), and SPIRE makes it mode 0770, owned by the SPIRE agent's user and group.
# authorized_delegates lists the SPIFFE IDs allowed to use that API: spiffe-delegate's, from
# its registration entry (deploy/kustomize/components/spire-entries, spiffe-delegate-agent).
#
# The SPIRE agent's pod must share the socket's directory on the node: a hostPath volume for
# /run/spire/admin mounted at /run/spire/admin (spire-agent-daemonset-patch.yaml); the
# spiffe-delegate DaemonSet mounts the same host directory.
agent {
  admin_socket_path    = "/run/spire/admin/admin.sock"
  authorized_delegates = [
    "spiffe://example.org/ns/spiffe-delegate/sa/spiffe-delegate",
  ]
}
