"""Generated from protos/ by python -m agent.protogen."""
