"""AgentMetrics over scripted stats objects: every family, its type, labels and values, read
at scrape time; the event hooks; registries that share nothing."""

from __future__ import annotations

import datetime as dt
from collections import Counter
from dataclasses import dataclass, field

import pytest
from prometheus_client import REGISTRY, CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from agent.attest.verifier import ATTESTATION_RESULTS
from agent.cache.keys import Identity, ProcessKey, WorkloadUid
from agent.clock import ManualClock
from agent.metrics import AgentMetrics, SdsAckMetrics, SpireRpcMetrics, render
from agent.metrics.collector import kind_of
from agent.spire.client import ClientStatus
from agent.spire.validation import VerifiedSvid
from tests.metrics.fakes import FakeCache, FakeClient, FakeSds, FakeVerifier
from tests.metrics.labels import Scrape, scrape, suspicious_labels
from tests.spire.pki import NOW, Ca

POD_A = "aaaaaaaa-0000-4000-8000-000000000001"
POD_B = "bbbbbbbb-0000-4000-8000-000000000002"
WEB = "spiffe://example.org/ns/apps/sa/web"
PROXY = "spiffe://example.org/ns/zarf/sa/registry-proxy"
DB = "spiffe://example.org/ns/data/sa/db"

EVERY_FAMILY = {
    # name as the parser reports it -> type
    "spiffe_delegate_spire_connected": "gauge",
    "spiffe_delegate_spire_reconnects": "counter",
    "spiffe_delegate_spire_rpc_duration_seconds": "histogram",
    "spiffe_delegate_spire_rpc_errors": "counter",
    "spiffe_delegate_attestations": "counter",
    "spiffe_delegate_pid_reuse_detected": "counter",
    "spiffe_delegate_svids_cached": "gauge",
    "spiffe_delegate_svid_expiry_seconds": "gauge",
    "spiffe_delegate_svid_rotations": "counter",
    "spiffe_delegate_svids_rejected": "counter",
    "spiffe_delegate_sds_streams_open": "gauge",
    "spiffe_delegate_sds_streams_opened": "counter",
    "spiffe_delegate_sds_pushes": "counter",
    "spiffe_delegate_sds_acks": "counter",
    "spiffe_delegate_sds_nacks": "counter",
    "spiffe_delegate_sds_connections_rejected": "counter",
    "spiffe_delegate_sds_requests_over_limits": "counter",
    "spiffe_delegate_sds_push_ack_seconds": "histogram",
    "spiffe_delegate_asyncio_tasks": "gauge",
    "spiffe_delegate_threads": "gauge",
}


@dataclass
class Parts:
    client: FakeClient = field(default_factory=FakeClient)
    source: FakeVerifier = field(default_factory=FakeVerifier)
    cache: FakeCache = field(default_factory=FakeCache)
    sds: FakeSds = field(default_factory=FakeSds)
    clock: ManualClock = field(default_factory=lambda: ManualClock(NOW))
    registry: CollectorRegistry = field(
        default_factory=lambda: CollectorRegistry(auto_describe=True))
    metrics: AgentMetrics | None = None

    def __post_init__(self) -> None:
        self.metrics = AgentMetrics(self.registry, client=self.client, source=self.source,
                                    cache=self.cache, sds=self.sds, clock=self.clock)

    def scrape(self) -> Scrape:
        return scrape(self.registry)


def verified(ca: Ca, spiffe_id: str, not_after: dt.datetime) -> VerifiedSvid:
    svid = ca.svid(spiffe_id=spiffe_id, not_before=NOW - dt.timedelta(minutes=30),
                   not_after=not_after)
    return VerifiedSvid(svid, NOW - dt.timedelta(minutes=30), not_after, "f" * 16)


@pytest.fixture(scope="module")
def ca() -> Ca:
    return Ca.root()


def test_every_family_is_there_with_its_type_before_anything_happened() -> None:
    parts = Parts()
    result = parts.scrape()
    types = {f.name: f.type for f in text_string_to_metric_families(result.text)}
    for name, kind in EVERY_FAMILY.items():
        assert types.get(name) == kind, f"{name}: {types.get(name)} in\n{result.text}"
    assert result.content_type.startswith("text/plain; version=")
    # Zeros for the fixed label sets, so rate() works from the first scrape.
    assert result.by_label("spiffe_delegate_attestations_total", "result") == {
        result_name: 0 for result_name in ATTESTATION_RESULTS}
    assert result.by_label("spiffe_delegate_svids_cached", "kind") == {
        "workload": 0, "identity": 0, "process": 0}
    assert result.by_label("spiffe_delegate_sds_streams_opened_total", "api") == {
        "sotw": 0, "delta": 0}
    assert set(result.by_label("spiffe_delegate_sds_pushes_total", "resource")) == {
        "default", "ROOTCA", "ALL", "trust_domain", "spiffe_id", "workload"}
    assert result.by_label("spiffe_delegate_sds_connections_rejected_total", "reason") == {
        "http1": 0, "tls": 0, "not_http2": 0, "handshake_timeout": 0,
        "too_many_connections": 0}
    assert result.value("spiffe_delegate_sds_requests_over_limits_total") == 0
    assert result.samples("spiffe_delegate_svid_expiry_seconds") == []
    # The standard process metrics ride along in the same registry.
    assert result.value("process_open_fds") > 0
    assert "python_info" in types


def test_names_follow_prometheus_conventions() -> None:
    text = Parts().scrape().text
    # prometheus_client adds a ``<name>_created`` gauge beside its own metric objects.
    ours = [f for f in text_string_to_metric_families(text)
            if f.name.startswith("spiffe_delegate_") and not f.name.endswith("_created")]
    assert {f.name for f in ours} == set(EVERY_FAMILY)
    for family in ours:
        if family.type == "counter":
            assert f"# TYPE {family.name}_total counter" in text, family.name
        if family.type == "histogram":
            assert family.name.endswith("_seconds"), family.name
        assert not family.name.endswith(("_milliseconds", "_ms", "_minutes")), family.name
        assert family.documentation, family.name


def test_spire_connection_attestation_and_reuse_are_read_at_scrape_time() -> None:
    parts = Parts()
    assert parts.scrape().value("spiffe_delegate_spire_connected") == 0
    parts.client.status = ClientStatus("/s", connected=True, reconnects=3, active_streams=2,
                                       last_error=None, last_error_code=None)
    parts.source.stats.attestations.update({"ok": 5, "unmatched": 1, "process_gone": 2})
    parts.source.stats.pid_reuse_detected = 4
    result = parts.scrape()
    assert result.value("spiffe_delegate_spire_connected") == 1
    assert result.value("spiffe_delegate_spire_reconnects_total") == 3
    assert result.by_label("spiffe_delegate_attestations_total", "result") == {
        "ok": 5, "unmatched": 1, "process_gone": 2, "failed": 0, "spire_error": 0}
    assert result.value("spiffe_delegate_pid_reuse_detected_total") == 4
    # A counter object keeps counting; the next scrape sees it.
    parts.source.stats.attestations["ok"] += 1
    assert parts.scrape().value("spiffe_delegate_attestations_total", result="ok") == 6


def test_cached_svids_by_kind_and_expiry_by_spiffe_id(ca: Ca) -> None:
    parts = Parts()
    in_10m, in_20m, in_1h = (NOW + dt.timedelta(minutes=m) for m in (10, 20, 60))
    parts.cache.entries = {
        WorkloadUid(POD_A): {WEB: verified(ca, WEB, in_20m), PROXY: verified(ca, PROXY, in_1h)},
        WorkloadUid(POD_B): {WEB: verified(ca, WEB, in_10m)},  # the same ID in another pod
        ProcessKey(4242, 99): {PROXY: verified(ca, PROXY, in_1h)},
        Identity.of(DB): {DB: verified(ca, DB, in_1h)},
        WorkloadUid("cccccccc-0000-4000-8000-000000000003"): {},  # unmatched: no SVID
    }
    parts.clock.advance(60)
    result = parts.scrape()
    assert result.by_label("spiffe_delegate_svids_cached", "kind") == {
        "workload": 3, "process": 1, "identity": 1}
    # Labelled by SPIFFE ID only: the soonest expiry of that ID, from the injected clock.
    assert result.by_label("spiffe_delegate_svid_expiry_seconds", "spiffe_id") == {
        WEB: 10 * 60 - 60, PROXY: 60 * 60 - 60, DB: 60 * 60 - 60}
    parts.cache.entries = {}
    assert parts.scrape().samples("spiffe_delegate_svid_expiry_seconds") == []


def test_rotations_and_rejections_by_reason() -> None:
    parts = Parts()
    parts.cache.stats.rotations = 7
    parts.cache.stats.svids_rejected.update({"key_mismatch": 2, "expired": 1})
    result = parts.scrape()
    assert result.value("spiffe_delegate_svid_rotations_total") == 7
    assert result.by_label("spiffe_delegate_svids_rejected_total", "reason") == {
        "key_mismatch": 2, "expired": 1}


def test_sds_counters_by_api_and_resource_kind() -> None:
    parts = Parts()
    stats = parts.sds.stats
    stats.streams_active, stats.streams_opened, stats.delta_streams_opened = 3, 5, 2
    stats.pushes_by_kind.update({"default": 4, "ROOTCA": 4, "workload": 2})
    stats.acks_by_kind.update({"default": 3, "ROOTCA": 4})
    stats.nacks_by_kind.update({"default": 1})
    result = parts.scrape()
    assert result.value("spiffe_delegate_sds_streams_open") == 3
    assert result.by_label("spiffe_delegate_sds_streams_opened_total", "api") == {
        "sotw": 5, "delta": 2}
    pushes = result.by_label("spiffe_delegate_sds_pushes_total", "resource")
    assert (pushes["default"], pushes["ROOTCA"], pushes["workload"], pushes["ALL"]) == (
        4, 4, 2, 0)
    assert result.value("spiffe_delegate_sds_acks_total", resource="default") == 3
    assert result.value("spiffe_delegate_sds_nacks_total", resource="default") == 1
    assert result.value("spiffe_delegate_sds_nacks_total", resource="ROOTCA") == 0


def test_spire_rpc_hooks_measure_latency_and_count_errors() -> None:
    rpc = SpireRpcMetrics()
    parts = Parts()
    registry = CollectorRegistry(auto_describe=True)
    AgentMetrics(registry, client=parts.client, source=parts.source, cache=parts.cache,
                 sds=parts.sds, spire_rpc=rpc, process=False)
    rpc.on_call("SubscribeToX509SVIDs", "OK", 0.02)
    rpc.on_call("SubscribeToX509SVIDs", "OK", 3.0)
    rpc.on_call("FetchJWTSVIDs", "PERMISSION_DENIED", 0.001)
    rpc.on_stream_error("SubscribeToX509Bundles", "UNAVAILABLE", 120.0)
    rpc.on_retry("SubscribeToX509Bundles", "UNAVAILABLE", 1, 0.1)
    result = scrape(registry)
    name = "spiffe_delegate_spire_rpc_duration_seconds"
    assert result.value(f"{name}_count", method="SubscribeToX509SVIDs", code="OK") == 2
    assert result.value(f"{name}_sum", method="SubscribeToX509SVIDs", code="OK") == \
        pytest.approx(3.02)
    assert result.value(f"{name}_bucket", method="SubscribeToX509SVIDs", code="OK",
                        le="0.025") == 1
    assert result.value(f"{name}_count", method="FetchJWTSVIDs", code="PERMISSION_DENIED") == 1
    # A stream's lifetime is not a latency: no observation for it.
    assert not [s for s in result.samples(f"{name}_count")
                if s.labels["method"] == "SubscribeToX509Bundles"]
    errors = {(s.labels["method"], s.labels["code"]): s.value
              for s in result.samples("spiffe_delegate_spire_rpc_errors_total")}
    assert errors == {("FetchJWTSVIDs", "PERMISSION_DENIED"): 1,
                      ("SubscribeToX509Bundles", "UNAVAILABLE"): 1}
    assert "process_open_fds" not in result.families  # process=False


def test_sds_ack_hook_feeds_the_push_ack_histogram() -> None:
    acks = SdsAckMetrics()
    parts = Parts()
    registry = CollectorRegistry(auto_describe=True)
    AgentMetrics(registry, client=parts.client, source=parts.source, cache=parts.cache,
                 sds=parts.sds, sds_acks=acks, process=False)
    for seconds in (0.0004, 0.003, 0.2, -0.001):  # a clock step must not go negative
        acks.on_ack(seconds)
    result = scrape(registry)
    name = "spiffe_delegate_sds_push_ack_seconds"
    assert result.value(f"{name}_count") == 4
    assert result.value(f"{name}_bucket", le="0.0005") == 2
    assert result.value(f"{name}_bucket", le="0.005") == 3
    assert result.value(f"{name}_sum") == pytest.approx(0.2034)


def test_two_agents_share_nothing_and_the_global_registry_stays_clean() -> None:
    first, second = Parts(), Parts()
    first.sds.stats.streams_active = 2
    assert first.scrape().value("spiffe_delegate_sds_streams_open") == 2
    assert second.scrape().value("spiffe_delegate_sds_streams_open") == 0
    assert first.metrics is not None and second.metrics is not None
    first.metrics.spire_rpc.on_call("FetchJWTSVIDs", "INTERNAL", 0.1)
    assert second.scrape().samples("spiffe_delegate_spire_rpc_errors_total") == []
    global_names = {f.name for f in REGISTRY.collect()}
    assert not {n for n in global_names if n.startswith("spiffe_delegate_")}


def test_kind_of_each_composite_id() -> None:
    assert kind_of(WorkloadUid(POD_A)) == "workload"
    assert kind_of(ProcessKey(1, 1)) == "process"
    assert kind_of(Identity.of(WEB)) == "identity"
    with pytest.raises(TypeError):
        kind_of("spiffe://example.org/x")  # type: ignore[arg-type]


def test_label_check_flags_pids_nonces_serials_and_pod_uids() -> None:
    """The check the end-to-end test relies on can fail: each kind of identifier is found."""
    from prometheus_client.samples import Sample

    def family(**labels: str) -> dict[str, list[Sample]]:
        return {"spiffe_delegate_x": [Sample("spiffe_delegate_x_total", labels, 1.0)]}

    assert suspicious_labels(family(resource="default", spiffe_id=WEB)) == []
    assert suspicious_labels(family(pid="4242"))
    assert suspicious_labels(family(nonce="0badc0de"))
    assert suspicious_labels(family(serial="3f2a9c0d11e4b7a85c"))
    assert suspicious_labels(family(serial="3f:2a:9c:0d:11:e4:b7"))
    assert suspicious_labels(family(resource=f"workload:{POD_A}"))
    assert suspicious_labels(family(caller="envoy as uid 2101"), known=["2101"])
    # Histogram bounds and the interpreter's version are numbers by nature.
    assert suspicious_labels({"h": [Sample("h_bucket", {"le": "10.0"}, 1.0)]}) == []
    assert suspicious_labels({"python_info": [Sample("python_info", {"major": "3"}, 1.0)]}) == []


def test_a_scrape_with_everything_set_has_no_identifier_in_a_label(ca: Ca) -> None:
    parts = Parts()
    parts.cache.entries = {WorkloadUid(POD_A): {WEB: verified(ca, WEB, NOW + dt.timedelta(
        hours=1))}, ProcessKey(4242, 99): {PROXY: verified(ca, PROXY, NOW)}}
    parts.source.stats.attestations.update(Counter(ATTESTATION_RESULTS))
    parts.cache.stats.svids_rejected["untrusted_chain"] += 1
    parts.sds.stats.pushes_by_kind["workload"] += 1
    assert parts.metrics is not None
    parts.metrics.spire_rpc.on_call("SubscribeToX509SVIDs", "UNAVAILABLE", 0.1)
    result = parts.scrape()
    assert suspicious_labels(result.families, known=[POD_A, "4242"]) == []


def test_render_returns_the_text_format() -> None:
    parts = Parts()
    body, content_type = render(parts.registry)
    assert isinstance(body, bytes)
    assert b"# TYPE spiffe_delegate_spire_connected gauge" in body
    assert content_type.startswith("text/plain")
