"""The SDS side of the agent: Envoy asks for Secrets by name over a Unix socket."""
