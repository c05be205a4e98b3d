"""HTTP endpoints of the agent: health, readiness and Prometheus metrics."""
