"""deploy/monitoring: the manifests parse, agree with each other and with the agent's
defaults, and the scraper's entry loads as `spire-server entry create -data` JSON."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from agent.config import AgentSettings, MetricsTlsSettings
from agent.devspire.entries import load_entries

MONITORING = Path(__file__).resolve().parents[2] / "deploy" / "monitoring"
SCRAPER_ID = "spiffe://example.org/ns/monitoring/sa/prometheus-k8s"
SERVER_NAME = "spiffe-delegate-metrics.spiffe-delegate.svc"


def documents(name: str) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all((MONITORING / name).read_text()) if d]


def of_kind(docs: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    [doc] = [d for d in docs if d["kind"] == kind]
    return doc


def test_servicemonitors_scrape_the_metrics_port_over_tls() -> None:
    default_port = AgentSettings().metrics_address
    assert default_port is not None
    for name in ("servicemonitor-spiffe.yaml", "servicemonitor-files.yaml"):
        docs = documents(name)
        service, monitor = of_kind(docs, "Service"), of_kind(docs, "ServiceMonitor")
        [port] = service["spec"]["ports"]
        assert port["port"] == port["targetPort"] == default_port.port, name
        labels = service["metadata"]["labels"]
        assert monitor["spec"]["selector"]["matchLabels"].items() <= labels.items(), name
        assert monitor["spec"]["namespaceSelector"]["matchNames"] == [
            service["metadata"]["namespace"]], name
        [endpoint] = monitor["spec"]["endpoints"]
        assert (endpoint["port"], endpoint["scheme"], endpoint["path"]) == (
            port["name"], "https", "/metrics"), name
        tls = endpoint["tlsConfig"]
        assert tls["serverName"] == SERVER_NAME and tls["insecureSkipVerify"] is False, name
        assert {"ca", "caFile"} & tls.keys() and {"cert", "certFile"} & tls.keys(), name
        assert {"keySecret", "keyFile"} & tls.keys(), name
        text = (MONITORING / name).read_text()
        assert "--metrics-tls-mode=" in text and SCRAPER_ID in text, name


def test_files_mode_secret_keys_match_the_flags() -> None:
    docs = documents("servicemonitor-files.yaml")
    certs = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Certificate"}
    server = certs["spiffe-delegate-metrics"]["spec"]
    client = certs["prometheus-metrics-client"]["spec"]
    assert server["dnsNames"] == [SERVER_NAME] and "server auth" in server["usages"]
    assert client["uris"] == [SCRAPER_ID] and "client auth" in client["usages"]
    text = (MONITORING / "servicemonitor-files.yaml").read_text()
    for flag, key in (("cert", "tls.crt"), ("key", "tls.key"), ("client-ca", "ca.crt")):
        assert f"--metrics-{flag}-file=/etc/spiffe-delegate/metrics-tls/{key}" in text


def test_network_policy_admits_monitoring_to_the_metrics_port_only() -> None:
    [policy] = documents("networkpolicy.yaml")
    assert policy["spec"]["policyTypes"] == ["Ingress"]
    [rule] = policy["spec"]["ingress"]
    [source] = rule["from"]
    assert source["namespaceSelector"]["matchLabels"] == {
        "kubernetes.io/metadata.name": "monitoring"}
    assert rule["ports"] == [{"protocol": "TCP", "port": 9086}]


def test_scraper_entry_loads_and_is_allowed() -> None:
    [entry] = load_entries(MONITORING / "scraper-entries.json", "example.org")
    assert entry.spiffe_id == SCRAPER_ID
    assert {str(s) for s in entry.selectors} == {"k8s:ns:monitoring", "k8s:sa:prometheus-k8s"}
    MetricsTlsSettings(mode="spiffe", allowed_ids=(SCRAPER_ID,)).validate("example.org")
