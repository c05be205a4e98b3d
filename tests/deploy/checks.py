"""Pure checks over rendered manifests: each returns the problems it finds (empty: fine), so
tests can show both that the real manifests pass and that a broken copy fails."""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import PurePosixPath
from typing import Any

import jsonschema

from tests.deploy.kustomize import Resource

DIGEST = re.compile(r"@sha256:[0-9a-f]{64}$")
ENV_REF = re.compile(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)")


def find(resources: Iterable[Resource], kind: str, name: str,
         namespace: str | None = None) -> Resource:
    matches = [r for r in resources if r["kind"] == kind and r["metadata"]["name"] == name
               and (namespace is None or r["metadata"].get("namespace") == namespace)]
    assert len(matches) == 1, f"{len(matches)} {kind}/{name} in the build"
    return matches[0]


def pod_spec(workload: Resource) -> dict[str, Any]:
    spec: dict[str, Any] = workload["spec"]["template"]["spec"]
    return spec


def container(workload: Resource, name: str) -> dict[str, Any]:
    [found] = [c for c in pod_spec(workload)["containers"] if c["name"] == name]
    return found


def env_of(c: dict[str, Any]) -> dict[str, str]:
    """The container's literal env values (valueFrom entries are left out)."""
    return {e["name"]: e["value"] for e in c.get("env", []) if "value" in e}


def host_path(workload: Resource, container_name: str, path: str) -> str | None:
    """Where ``path`` inside the container is on the node (None: not on a hostPath)."""
    pod = pod_spec(workload)
    volumes = {v["name"]: v for v in pod.get("volumes", [])}
    target = PurePosixPath(path)
    best = None
    for mount in container(workload, container_name).get("volumeMounts", []):
        mount_path = PurePosixPath(mount["mountPath"])
        if (mount_path == target or mount_path in target.parents) and (
                best is None or len(mount_path.parts) > len(PurePosixPath(
                    best["mountPath"]).parts)):
            best = mount
    if best is None or "hostPath" not in volumes[best["name"]]:
        return None
    rest = target.relative_to(best["mountPath"])
    return str(PurePosixPath(volumes[best["name"]]["hostPath"]["path"]) / rest)


def mount_for(workload: Resource, container_name: str, path: str) -> dict[str, Any]:
    for mount in container(workload, container_name).get("volumeMounts", []):
        if PurePosixPath(mount["mountPath"]) in (PurePosixPath(path),
                                                 *PurePosixPath(path).parents):
            return dict(mount)
    raise AssertionError(f"{path} is on no volume of {container_name}")


def named_port(c: dict[str, Any], port: int | str) -> int:
    if isinstance(port, int):
        return port
    [number] = [p["containerPort"] for p in c.get("ports", []) if p.get("name") == port]
    return int(number)


# --- hardening --------------------------------------------------------------------------

def container_hardening(c: dict[str, Any], pod: dict[str, Any]) -> list[str]:
    """What every container here must have: no capabilities, no escalation, read-only root,
    seccomp, requests and limits."""
    name, problems = c["name"], []
    security = c.get("securityContext") or {}
    if security.get("privileged"):
        problems.append(f"{name}: privileged")
    if security.get("allowPrivilegeEscalation") is not False:
        problems.append(f"{name}: allowPrivilegeEscalation is not false")
    if security.get("readOnlyRootFilesystem") is not True:
        problems.append(f"{name}: readOnlyRootFilesystem is not true")
    capabilities = security.get("capabilities") or {}
    if capabilities.get("drop") != ["ALL"]:
        problems.append(f"{name}: capabilities.drop is {capabilities.get('drop')}, not [ALL]")
    if capabilities.get("add"):
        problems.append(f"{name}: capabilities added: {capabilities['add']}")
    seccomp = (security.get("seccompProfile") or (pod.get("securityContext") or {}).get(
        "seccompProfile") or {}).get("type")
    if seccomp != "RuntimeDefault":
        problems.append(f"{name}: seccompProfile is {seccomp}, not RuntimeDefault")
    resources = c.get("resources") or {}
    for part in ("requests", "limits"):
        missing = {"cpu", "memory"} - set(resources.get(part) or {})
        if missing:
            problems.append(f"{name}: resources.{part} lacks {sorted(missing)}")
    if not DIGEST.search(c.get("image", "")):
        problems.append(f"{name}: image {c.get('image')} is not pinned by digest")
    problems += env_order(c)
    return problems


def env_order(c: dict[str, Any]) -> list[str]:
    """Kubernetes expands $(VAR) only from variables defined earlier in the list (and a
    Kustomize patch puts its variables first)."""
    problems, defined = [], set()
    for entry in c.get("env", []):
        for ref in ENV_REF.findall(entry.get("value", "")):
            if ref not in defined:
                problems.append(f"{c['name']}: {entry['name']} uses $({ref}) before it is "
                                "defined")
        defined.add(entry["name"])
    return problems


def agent_problems(daemonset: Resource) -> list[str]:
    """The agent DaemonSet: hostPID without hostNetwork, hardened, probed on /healthz and
    /readyz through the pod IP."""
    pod, problems = pod_spec(daemonset), []
    if pod.get("hostPID") is not True:
        problems.append("hostPID is not true")
    if pod.get("hostNetwork"):
        problems.append("hostNetwork is set")
    if pod.get("hostIPC"):
        problems.append("hostIPC is set")
    if pod.get("automountServiceAccountToken") is not False:
        problems.append("a service account token is mounted")
    for c in pod["containers"]:
        problems += container_hardening(c, pod)
        for probe, path in (("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")):
            handler = c.get(probe) or {}
            if "httpGet" in handler:
                http = handler["httpGet"]
                if http.get("path") != path:
                    problems.append(f"{c['name']}: {probe} does not ask {path}")
                if "host" in http:
                    # Without hostNetwork the probe's host is reached from the node, not
                    # from inside the pod.
                    problems.append(f"{c['name']}: {probe} sets host {http['host']}")
            elif "exec" in handler:
                url = probe_url(handler)
                if url is None or not url.startswith("http://127.0.0.1:") or not url.endswith(
                        path):
                    problems.append(f"{c['name']}: {probe} does not ask {path} on loopback")
            else:
                problems.append(f"{c['name']}: no HTTP or exec {probe}")
    return problems


def probe_url(handler: dict[str, Any]) -> str | None:
    """The URL an exec probe fetches (the one http:// URL in its command), if any."""
    urls = [u for arg in handler["exec"]["command"] for u in re.findall(r"http://[^'\" ]+",
                                                                         arg)]
    return urls[0] if len(urls) == 1 else None


def proxy_problems(daemonset: Resource) -> list[str]:
    """The node registry proxy: hostNetwork (the node's loopback) with cluster DNS, non-root,
    hardened, not in the host PID namespace."""
    pod, problems = pod_spec(daemonset), []
    if pod.get("hostNetwork") is not True:
        problems.append("hostNetwork is not true")
    if pod.get("dnsPolicy") != "ClusterFirstWithHostNet":
        problems.append("dnsPolicy is not ClusterFirstWithHostNet (cluster names would not "
                        "resolve)")
    if pod.get("hostPID"):
        problems.append("hostPID is set")
    if pod.get("automountServiceAccountToken") is not False:
        problems.append("a service account token is mounted")
    for c in pod["containers"]:
        problems += container_hardening(c, pod)
        context = {**(pod.get("securityContext") or {}), **(c.get("securityContext") or {})}
        if context.get("runAsNonRoot") is not True or not context.get("runAsUser"):
            problems.append(f"{c['name']}: not run as a non-root user")
        for probe in ("livenessProbe", "readinessProbe"):
            if not c.get(probe):
                problems.append(f"{c['name']}: no {probe}")
    return problems


# --- custom resources -------------------------------------------------------------------
# Hand-written from the CRDs' field tables (SPIRE Controller Manager api/v1alpha1, Prometheus
# Operator monitoring.coreos.com/v1, cert-manager.io/v1), limited to the fields these
# manifests may use; unknown fields are errors, as kubernetes-validate's strict mode does for
# built-in kinds (whose schemas do not cover custom resources).

_STRINGS = {"type": "array", "items": {"type": "string"}}
_SELECTOR = {
    "type": "object", "additionalProperties": False,
    "properties": {
        "matchLabels": {"type": "object", "additionalProperties": {"type": "string"}},
        "matchExpressions": {"type": "array", "items": {
            "type": "object", "required": ["key", "operator"], "additionalProperties": False,
            "properties": {"key": {"type": "string"},
                           "operator": {"enum": ["In", "NotIn", "Exists", "DoesNotExist"]},
                           "values": _STRINGS}}},
    },
}
_DURATION = {"type": "string", "pattern": r"^([0-9]+(\.[0-9]+)?(ns|us|µs|ms|s|m|h))+$"}
_SPIFFE_ID = {"type": "string", "pattern": r"^spiffe://[a-z0-9._-]+(/[A-Za-z0-9._~!$&'()*+,;=:@%-]+)+$"}
_SELECTOR_STRING = {"type": "string", "pattern": r"^[a-z0-9_]+:.+$"}
_CLUSTER_SCOPED_META = {
    "type": "object", "required": ["name"], "not": {"required": ["namespace"]},
    "properties": {"name": {"type": "string", "pattern": r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$"}},
}
_NAMESPACED_META = {"type": "object", "required": ["name", "namespace"]}
_SECRET_KEY = {"type": "object", "required": ["name", "key"], "additionalProperties": False,
               "properties": {"name": {"type": "string"}, "key": {"type": "string"}}}
_SECRET_OR_CONFIGMAP = {"type": "object", "additionalProperties": False,
                        "properties": {"secret": _SECRET_KEY, "configMap": _SECRET_KEY}}


def _crd(api_version: str, kind: str, metadata: dict[str, Any], spec: dict[str, Any]
         ) -> dict[str, Any]:
    return {
        "type": "object", "required": ["apiVersion", "kind", "metadata", "spec"],
        "additionalProperties": False,
        "properties": {"apiVersion": {"const": api_version}, "kind": {"const": kind},
                       "metadata": metadata, "spec": spec},
    }


CRD_SCHEMAS: dict[tuple[str, str], dict[str, Any]] = {
    ("spire.spiffe.io/v1alpha1", "ClusterSPIFFEID"): _crd(
        "spire.spiffe.io/v1alpha1", "ClusterSPIFFEID", _CLUSTER_SCOPED_META, {
            "type": "object", "required": ["spiffeIDTemplate"], "additionalProperties": False,
            "properties": {
                "spiffeIDTemplate": {"type": "string", "pattern": "^spiffe://"},
                "ttl": _DURATION, "jwtTtl": _DURATION,
                "dnsNameTemplates": _STRINGS,
                "workloadSelectorTemplates": {"type": "array", "items": _SELECTOR_STRING},
                "federatesWith": _STRINGS,
                "namespaceSelector": _SELECTOR, "podSelector": _SELECTOR,
                "admin": {"type": "boolean"}, "downstream": {"type": "boolean"},
                "autoPopulateDNSNames": {"type": "boolean"}, "className": {"type": "string"},
                "fallback": {"type": "boolean"}, "hint": {"type": "string"},
            }}),
    ("spire.spiffe.io/v1alpha1", "ClusterStaticEntry"): _crd(
        "spire.spiffe.io/v1alpha1", "ClusterStaticEntry", _CLUSTER_SCOPED_META, {
            "type": "object", "required": ["spiffeID", "parentID", "selectors"],
            "additionalProperties": False,
            "properties": {
                "spiffeID": _SPIFFE_ID, "parentID": _SPIFFE_ID,
                "selectors": {"type": "array", "minItems": 1, "items": _SELECTOR_STRING},
                "federatesWith": _STRINGS, "x509SVIDTTL": _DURATION, "jwtSVIDTTL": _DURATION,
                "dnsNames": _STRINGS, "hint": {"type": "string"},
                "admin": {"type": "boolean"}, "downstream": {"type": "boolean"},
                "className": {"type": "string"},
            }}),
    ("monitoring.coreos.com/v1", "ServiceMonitor"): _crd(
        "monitoring.coreos.com/v1", "ServiceMonitor", _NAMESPACED_META, {
            "type": "object", "required": ["selector", "endpoints"],
            "additionalProperties": False,
            "properties": {
                "selector": _SELECTOR,
                "namespaceSelector": {"type": "object", "additionalProperties": False,
                                      "properties": {"matchNames": _STRINGS,
                                                     "any": {"type": "boolean"}}},
                "jobLabel": {"type": "string"},
                "endpoints": {"type": "array", "minItems": 1, "items": {
                    "type": "object", "additionalProperties": False,
                    "properties": {
                        "port": {"type": "string"}, "scheme": {"enum": ["http", "https"]},
                        "path": {"type": "string"}, "interval": _DURATION,
                        "scrapeTimeout": _DURATION,
                        "tlsConfig": {"type": "object", "additionalProperties": False,
                                      "properties": {
                                          "ca": _SECRET_OR_CONFIGMAP,
                                          "cert": _SECRET_OR_CONFIGMAP,
                                          "keySecret": _SECRET_KEY,
                                          "caFile": {"type": "string"},
                                          "certFile": {"type": "string"},
                                          "keyFile": {"type": "string"},
                                          "serverName": {"type": "string"},
                                          "insecureSkipVerify": {"type": "boolean"}}},
                    }}},
            }}),
    ("cert-manager.io/v1", "Certificate"): _crd(
        "cert-manager.io/v1", "Certificate", _NAMESPACED_META, {
            "type": "object", "required": ["secretName", "issuerRef"],
            "additionalProperties": False,
            "properties": {
                "secretName": {"type": "string"}, "commonName": {"type": "string"},
                "dnsNames": _STRINGS, "uris": _STRINGS, "ipAddresses": _STRINGS,
                "duration": _DURATION, "renewBefore": _DURATION,
                "usages": {"type": "array", "items": {"enum": [
                    "signing", "digital signature", "content commitment", "key encipherment",
                    "key agreement", "data encipherment", "cert sign", "crl sign",
                    "encipher only", "decipher only", "any", "server auth", "client auth",
                    "code signing", "email protection", "s/mime", "ipsec end system",
                    "ipsec tunnel", "ipsec user", "timestamping", "ocsp signing",
                    "microsoft sgc", "netscape sgc"]}},
                "privateKey": {"type": "object", "additionalProperties": False, "properties": {
                    "algorithm": {"enum": ["RSA", "ECDSA", "Ed25519"]},
                    "size": {"type": "integer"}, "encoding": {"enum": ["PKCS1", "PKCS8"]},
                    "rotationPolicy": {"enum": ["Never", "Always"]}}},
                "issuerRef": {"type": "object", "required": ["name"],
                              "additionalProperties": False, "properties": {
                                  "name": {"type": "string"},
                                  "kind": {"enum": ["Issuer", "ClusterIssuer"]},
                                  "group": {"type": "string"}}},
            }}),
}


def custom_resource_problems(resource: Resource) -> list[str] | None:
    """Structural problems of a custom resource; None if its kind is not one of ours."""
    schema = CRD_SCHEMAS.get((resource.get("apiVersion", ""), resource.get("kind", "")))
    if schema is None:
        return None
    validator = jsonschema.Draft202012Validator(schema)
    return [f"{'/'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}"
            for e in validator.iter_errors(resource)]
