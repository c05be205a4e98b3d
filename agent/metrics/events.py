"""Metrics measured at the moment something happens: SPIRE RPC latency and errors, SDS push-to-ACK.

Everything else is read from the existing counters at scrape time (:mod:`.collector`).
The metric objects here are created unregistered (``registry=None``) and registered into
the agent's own registry by :class:`~agent.metrics.registry.AgentMetrics`; never into
prometheus_client's global one.
"""

from __future__ import annotations

from prometheus_client import Counter, Histogram

__all__ = ["RPC_BUCKETS", "SDS_ACK_BUCKETS", "SdsAckMetrics", "SpireRpcMetrics"]

# A stream's "latency" is the time to its first message, and SPIRE holds that back until
# every matching entry has a minted SVID: seconds, sometimes tens of them.
RPC_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
               60.0)
# Envoy on the same node ACKs within milliseconds; seconds mean it is stuck or overloaded.
SDS_ACK_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
                   5.0, 10.0)


class SpireRpcMetrics:
    """A :class:`~agent.spire.client.ClientObserver`: RPC latency and errors by method and
    gRPC code (both bounded: four methods, seventeen codes)."""

    def __init__(self) -> None:
        self.duration = Histogram(
            "spiffe_delegate_spire_rpc_duration_seconds",
            "Latency of Delegated Identity API calls: a unary call until its answer, a "
            "stream until its first message (or its failure)",
            ("method", "code"), registry=None, buckets=RPC_BUCKETS)
        self.errors = Counter(
            "spiffe_delegate_spire_rpc_errors",
            "Delegated Identity API calls that failed, and streams that broke after "
            "delivering messages, by method and gRPC status code",
            ("method", "code"), registry=None)

    def on_call(self, method: str, code: str, seconds: float) -> None:
        self.duration.labels(method, code).observe(max(seconds, 0.0))
        if code != "OK":
            self.errors.labels(method, code).inc()

    def on_stream_error(self, method: str, code: str, seconds: float) -> None:
        # ``seconds`` is how long the stream lived, not a latency: only the error counts.
        self.errors.labels(method, code).inc()

    def on_retry(self, method: str, code: str, attempt: int, delay: float) -> None:
        pass  # reconnects are counted by the client itself (ClientStatus.reconnects)


class SdsAckMetrics:
    """An :class:`~agent.sds.stats.SdsObserver`: the time from a push to its ACK."""

    def __init__(self) -> None:
        self.push_ack = Histogram(
            "spiffe_delegate_sds_push_ack_seconds",
            "Time from sending an SDS response to the client's ACK of it",
            registry=None, buckets=SDS_ACK_BUCKETS)

    def on_ack(self, seconds: float) -> None:
        self.push_ack.observe(max(seconds, 0.0))
