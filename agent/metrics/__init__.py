"""Prometheus metrics of the agent: SPIRE connection, attestation, the SVID cache and SDS.

    registry = CollectorRegistry()                  # one per agent: Agent.metrics_registry
    rpc, acks = SpireRpcMetrics(), SdsAckMetrics()  # hooks, handed to client and SDS server
    metrics = AgentMetrics(registry, client=client, source=source, cache=cache, sds=sds,
                           clock=clock, spire_rpc=rpc, sds_acks=acks)
    body, content_type = render(registry)           # what a /metrics endpoint serves

Counters that the parts keep anyway are read at scrape time (:mod:`.collector`); only
latencies are measured as they happen (:mod:`.events`). Every metric and label is listed
in docs/metrics.md.
"""

from agent.metrics.collector import AgentCollector
from agent.metrics.events import SdsAckMetrics, SpireRpcMetrics
from agent.metrics.registry import AgentMetrics, render
from agent.metrics.runtime import RuntimeCollector

__all__ = ["AgentCollector", "AgentMetrics", "RuntimeCollector", "SdsAckMetrics",
           "SpireRpcMetrics", "render"]
