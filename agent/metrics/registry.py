"""AgentMetrics: every metric of one agent, registered into that agent's own registry."""

from __future__ import annotations

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
)

from agent.clock import Clock, SystemClock
from agent.metrics.collector import (
    AgentCollector,
    CacheSource,
    ClientSource,
    SdsSource,
    VerifierSource,
)
from agent.metrics.events import SdsAckMetrics, SpireRpcMetrics
from agent.metrics.runtime import RuntimeCollector

__all__ = ["AgentMetrics", "render"]


class AgentMetrics:
    """Registers the agent's metrics into ``registry`` (the agent's, never the global one).

    ``spire_rpc`` and ``sds_acks`` are the event hooks that were handed to the client
    (``observer=``) and the SDS server (``observer=``) when they were built; pass the same
    objects here so that what they measure is exposed. ``process``: also the standard
    ``process_*`` and ``python_info`` metrics of this process, and its asyncio tasks and
    OS threads (:class:`~agent.metrics.runtime.RuntimeCollector`).
    """

    def __init__(self, registry: CollectorRegistry, *, client: ClientSource,
                 source: VerifierSource, cache: CacheSource, sds: SdsSource,
                 clock: Clock | None = None, spire_rpc: SpireRpcMetrics | None = None,
                 sds_acks: SdsAckMetrics | None = None, process: bool = True) -> None:
        self.registry = registry
        self.spire_rpc = spire_rpc if spire_rpc is not None else SpireRpcMetrics()
        self.sds_acks = sds_acks if sds_acks is not None else SdsAckMetrics()
        self.collector = AgentCollector(client=client, source=source, cache=cache, sds=sds,
                                        clock=clock if clock is not None else SystemClock())
        registry.register(self.collector)
        registry.register(self.spire_rpc.duration)
        registry.register(self.spire_rpc.errors)
        registry.register(self.sds_acks.push_ack)
        if process:
            ProcessCollector(registry=registry)
            PlatformCollector(registry=registry)
            registry.register(RuntimeCollector())


def render(registry: CollectorRegistry) -> tuple[bytes, str]:
    """The registry in the Prometheus text format: (body, Content-Type).

    Call it on the agent's event loop: the collector reads the cache's live state."""
    return generate_latest(registry), CONTENT_TYPE_LATEST
