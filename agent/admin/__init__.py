"""Admin tooling behind the operator-facing subcommands of ``spiffe-delegate`` (doctor,
status, entries, spire-config): checks, snapshots and generated configuration."""
