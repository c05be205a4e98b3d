"""Parsing rendered metrics, and spotting label values that must never be labels."""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from agent.config import HostPort
from agent.demo.pull import http_request
from agent.metrics import render

# A label value that is one of these is an identifier of something with unbounded (or
# secret) cardinality: a PID, an xDS nonce (8 hex), a certificate serial, a pod UID.
SUSPICIOUS = {
    "PID": re.compile(r"\d+"),
    "nonce": re.compile(r"[0-9a-f]{8}"),
    "serial": re.compile(r"(0x)?[0-9a-fA-F]{12,}|([0-9a-fA-F]{2}:){5,}[0-9a-fA-F]{2}"),
}
POD_UID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
# Label values that are numbers by nature: histogram bounds, and the interpreter version.
EXEMPT = {("*", "le"), ("python_info", "*")}


@dataclass(frozen=True)
class Scrape:
    """One rendered registry, parsed back: ``families`` by name (as the parser names them:
    counters without ``_total``)."""

    text: str
    content_type: str
    families: Mapping[str, list[Sample]]

    def samples(self, name: str) -> list[Sample]:
        """Every sample whose name is ``name`` (e.g. ``..._total``, ``..._count``)."""
        return [s for samples in self.families.values() for s in samples if s.name == name]

    def value(self, name: str, **labels: str) -> float:
        """The one sample ``name`` with exactly these labels (AssertionError otherwise)."""
        found = [s.value for s in self.samples(name) if s.labels == labels]
        assert len(found) == 1, f"{name}{labels}: {len(found)} samples in\n{self.text}"
        return found[0]

    def by_label(self, name: str, label: str) -> dict[str, float]:
        return {s.labels[label]: s.value for s in self.samples(name)}

    def total(self, name: str) -> float:
        return sum(s.value for s in self.samples(name))


def scrape(registry: CollectorRegistry) -> Scrape:
    body, content_type = render(registry)
    return parse_scrape(body.decode(), content_type)


def parse_scrape(text: str, content_type: str) -> Scrape:
    families = {family.name: list(family.samples)
                for family in text_string_to_metric_families(text)}
    return Scrape(text, content_type, families)


async def scrape_endpoint(address: HostPort) -> Scrape:
    """GET /metrics from a running agent's plain-HTTP metrics endpoint, as Prometheus."""
    host = f"[{address.host}]" if ":" in address.host else address.host
    response = await http_request(f"http://{host}:{address.port}/metrics")
    assert response.status == 200, response
    return parse_scrape(response.body.decode(), response.headers.get("content-type", ""))


def suspicious_labels(families: Mapping[str, Iterable[Sample]],
                      known: Iterable[str] = ()) -> list[str]:
    """Every label value that looks like a PID, nonce, serial or pod UID, or that contains
    one of ``known`` (identifiers seen in the test: PIDs, serials, pod UIDs, nonces)."""
    known = [k for k in known if k]
    problems = []
    for family, samples in families.items():
        for sample in samples:
            for label, value in sample.labels.items():
                if ("*", label) in EXEMPT or (family, "*") in EXEMPT:
                    continue
                where = f"{sample.name}{{{label}={value!r}}}"
                problems += [f"{where} looks like a {what}" for what, pattern
                             in SUSPICIOUS.items() if pattern.fullmatch(value)]
                if POD_UID.search(value):
                    problems.append(f"{where} contains a pod UID")
                problems += [f"{where} contains {k!r}" for k in known if k in value]
    return problems
