"""deploy/kustomize, rendered offline (tests/deploy/kustomize.py, no kubectl) and checked:

- every built-in resource against the Kubernetes JSON schemas (kubernetes-validate, strict:
  unknown fields are errors); custom resources (ClusterSPIFFEID, ClusterStaticEntry,
  ServiceMonitor, cert-manager Certificate) are not in those schemas and are checked against
  hand-written structural schemas (checks.CRD_SCHEMAS);
- the agent's and the proxy's security properties, and the agent's environment through the
  agent's own option parser;
- that the pieces agree: socket paths on the node, ports, SPIFFE IDs, the copies of
  deploy/envoy and deploy/monitoring, and the node proxy's config under a real Envoy.
"""

from __future__ import annotations

import argparse
import http.server
import json
import os
import re
import shlex
import socket
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable
from functools import cache
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from agent.admin import entries, spire_config
from agent.cli import ENV_PREFIX, RUN_OPTIONS, agent_settings
from agent.cliopts import add_options
from agent.config import AgentSettings
from tests.deploy import checks
from tests.deploy.checks import container, env_of, find, host_path, pod_spec
from tests.deploy.kustomize import Resource, build, resource_id
from tests.envoyproc import validate_config

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
KUSTOMIZE = DEPLOY / "kustomize"
SPIRE = DEPLOY / "spire"
BASE, COMPONENTS = KUSTOMIZE / "base", KUSTOMIZE / "components"
OVERLAYS = ("default", "spiffe-metrics")
# Components no overlay uses, built on the base with what they need listed before them.
EXTRA_BUILDS = {"spire-helm-admin-socket": ("spire-entries", "spire-helm-admin-socket"),
                "health-loopback": ("health-loopback",)}
# Kubernetes versions to validate against: the oldest we claim, and the newest schemas.
K8S_VERSIONS = ("1.30", kubernetes_validate.latest_version())
CUSTOM_KINDS = {kind for _, kind in checks.CRD_SCHEMAS}

AGENT_NS, PROXY_NS = "spiffe-delegate", "zarf"
SCRAPER_ID = "spiffe://example.org/ns/monitoring/sa/prometheus-k8s"
HELM_ADMIN_SOCKET = "/run/spire/agent/sockets/csi.spiffe.io/admin/admin.sock"


def kustomizations() -> list[Path]:
    """Every directory whose kustomization is a Kustomization (not a Component)."""
    found = []
    for path in sorted(KUSTOMIZE.rglob("kustomization.yaml")):
        if yaml.safe_load(path.read_text()).get("kind", "Kustomization") == "Kustomization":
            found.append(path.parent)
    return found


KUSTOMIZATIONS = {str(p.relative_to(KUSTOMIZE)): p for p in kustomizations()}
BUILD_NAMES = [*KUSTOMIZATIONS, *(f"base+{name}" for name in EXTRA_BUILDS)]
AGENT_BUILDS = [name for name in BUILD_NAMES if name != "examples/registry-side"]


def write_extra_build(directory: Path, name: str) -> Path:
    """A kustomization in ``directory``: the base with EXTRA_BUILDS[name] (Kustomize wants
    relative paths)."""
    (directory / "kustomization.yaml").write_text(yaml.safe_dump({
        "resources": [os.path.relpath(BASE, directory)],
        "components": [os.path.relpath(COMPONENTS / c, directory) for c in EXTRA_BUILDS[name]],
    }))
    return directory


@cache
def _rendered(name: str) -> tuple[str, ...]:
    if name.startswith("base+"):
        with tempfile.TemporaryDirectory(prefix="kustomize-") as tmp:
            write_extra_build(Path(tmp), name.removeprefix("base+"))
            resources = build(tmp)
    else:
        resources = build(KUSTOMIZATIONS[name])
    return tuple(json.dumps(r) for r in resources)


def rendered(name: str) -> list[Resource]:
    """A fresh copy of a build (tests may mutate it)."""
    return [json.loads(r) for r in _rendered(name)]


def agent_of(resources: list[Resource]) -> Resource:
    return find(resources, "DaemonSet", "spiffe-delegate", AGENT_NS)


def proxy_of(resources: list[Resource]) -> Resource:
    return find(resources, "DaemonSet", "registry-proxy", PROXY_NS)


def settings_of(agent: Resource) -> AgentSettings:
    """The agent's settings as `spiffe-delegate run` would parse its command line and env."""
    c = container(agent, "spiffe-delegate")
    assert c["command"] == ["spiffe-delegate"] and c["args"][0] == "run", c
    parser = argparse.ArgumentParser()
    env = env_of(c)
    unknown = {k for k in env if k.startswith(ENV_PREFIX)} - {
        o.env_name(ENV_PREFIX) for o in RUN_OPTIONS}
    assert not unknown, f"variables no option reads: {unknown}"
    add_options(parser, RUN_OPTIONS, ENV_PREFIX, environ=env)
    return agent_settings(parser.parse_args(c["args"][1:]))


# --- rendering and schemas --------------------------------------------------------------

def test_the_expected_kustomizations_exist() -> None:
    assert set(KUSTOMIZATIONS) == {"base", "overlays/default", "overlays/spiffe-metrics",
                                   "examples/registry-side"}


def test_every_component_is_built_by_some_test() -> None:
    used = set()
    for overlay in OVERLAYS:
        text = yaml.safe_load((KUSTOMIZE / "overlays" / overlay / "kustomization.yaml")
                              .read_text())
        used |= {Path(c).name for c in text.get("components", [])}
    for components in EXTRA_BUILDS.values():
        used |= set(components)
    assert used == {p.name for p in COMPONENTS.iterdir() if p.is_dir()}


@pytest.mark.parametrize("directory", sorted({p.parent for p in KUSTOMIZE.rglob(
    "kustomization.yaml")}), ids=lambda p: str(p.relative_to(KUSTOMIZE)))
def test_every_file_of_a_kustomization_is_used(directory: Path) -> None:
    """A YAML file next to a kustomization that it does not list is a forgotten resource."""
    kustomization = yaml.safe_load((directory / "kustomization.yaml").read_text())
    listed = set(kustomization.get("resources", []))
    listed |= {p["path"] for p in kustomization.get("patches", [])}
    for generator in kustomization.get("configMapGenerator", []):
        listed |= {f.partition("=")[2] or f for f in generator["files"]}
    files = {p.name for p in directory.iterdir() if p.is_file()} - {"kustomization.yaml"}
    assert files <= listed, f"not used by {directory}: {files - listed}"


@pytest.mark.parametrize("name", BUILD_NAMES)
def test_renders(name: str) -> None:
    resources = rendered(name)
    assert resources
    assert len({resource_id(r) for r in resources}) == len(resources)


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("name", BUILD_NAMES)
def test_resources_validate(name: str, version: str) -> None:
    problems = []
    for resource in rendered(name):
        what = "/".join(str(p) for p in resource_id(resource)[1:] if p)
        custom = checks.custom_resource_problems(resource)
        if custom is not None:
            problems += [f"{what}: {p}" for p in custom]
            continue
        try:
            kubernetes_validate.validate(resource, version, strict=True)
        except kubernetes_validate.SchemaNotFoundError:
            problems.append(f"{what}: {resource['apiVersion']} is neither in the Kubernetes "
                            "schemas nor in checks.CRD_SCHEMAS")
        except kubernetes_validate.ValidationError as exc:
            problems.append(f"{what}: {exc.message} at {'/'.join(map(str, exc.path))}")
    assert not problems, "\n".join(problems)


def test_the_validators_reject_mistakes() -> None:
    """The same validation fails on a misspelt field, a wrong type, a missing field."""
    agent = agent_of(rendered("overlays/default"))
    pod_spec(agent)["hostPid"] = True
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(agent, K8S_VERSIONS[0], strict=True)
    agent = agent_of(rendered("overlays/default"))
    container(agent, "spiffe-delegate")["env"][0]["value"] = 438  # an unquoted 0666
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(agent, K8S_VERSIONS[0], strict=True)
    resources = rendered("overlays/spiffe-metrics")
    entry = find(resources, "ClusterSPIFFEID", "spiffe-delegate-registry-proxy")
    entry["spec"]["spiffeIdTemplate"] = entry["spec"].pop("spiffeIDTemplate")
    assert checks.custom_resource_problems(entry)
    static = find(resources, "ClusterStaticEntry", "spiffe-delegate-agent")
    static["metadata"]["namespace"] = "spiffe-delegate"  # cluster-scoped
    del static["spec"]["parentID"]
    assert len(checks.custom_resource_problems(static) or []) == 2
    monitor = find(resources, "ServiceMonitor", "spiffe-delegate")
    monitor["spec"]["endpoints"][0]["tlsConfig"]["insecureSkipVerfy"] = True
    assert checks.custom_resource_problems(monitor)


# --- security properties ----------------------------------------------------------------

@pytest.mark.parametrize("name", AGENT_BUILDS)
def test_agent_and_proxy_are_hardened(name: str) -> None:
    resources = rendered(name)
    assert checks.agent_problems(agent_of(resources)) == []
    assert checks.proxy_problems(proxy_of(resources)) == []


def test_registry_example_is_hardened() -> None:
    [deployment] = [r for r in rendered("examples/registry-side") if r["kind"] == "Deployment"]
    pod = pod_spec(deployment)
    assert pod["securityContext"]["runAsNonRoot"] is True
    for c in pod["containers"]:
        assert checks.container_hardening(c, pod) == [], c["name"]


def _set(path: str, value: Any) -> Callable[[Resource], None]:
    def mutate(daemonset: Resource) -> None:
        target: Any = daemonset
        *parents, last = path.split(".")
        for part in parents:
            target = target[int(part)] if part.isdigit() else target[part]
        if value is _DELETE:
            del target[last]
        else:
            target[last] = value
    return mutate


_DELETE = object()
_POD = "spec.template.spec"
_AGENT = f"{_POD}.containers.0"
AGENT_BREAKAGES = {
    "no hostPID": _set(f"{_POD}.hostPID", False),
    "hostNetwork": _set(f"{_POD}.hostNetwork", True),
    "writable root": _set(f"{_AGENT}.securityContext.readOnlyRootFilesystem", False),
    "escalation": _set(f"{_AGENT}.securityContext.allowPrivilegeEscalation", True),
    "a capability": _set(f"{_AGENT}.securityContext.capabilities.add", ["SYS_PTRACE"]),
    "drop less": _set(f"{_AGENT}.securityContext.capabilities.drop", ["NET_RAW"]),
    "privileged": _set(f"{_AGENT}.securityContext.privileged", True),
    "no limits": _set(f"{_AGENT}.resources.limits", _DELETE),
    "no cpu request": _set(f"{_AGENT}.resources.requests.cpu", _DELETE),
    "liveness on /readyz": _set(f"{_AGENT}.livenessProbe.httpGet.path", "/readyz"),
    "no readiness": _set(f"{_AGENT}.readinessProbe", _DELETE),
    "probe of the node's loopback": _set(f"{_AGENT}.readinessProbe.httpGet.host",
                                         "127.0.0.1"),
    "no seccomp": _set(f"{_POD}.securityContext.seccompProfile", _DELETE),
    "a token": _set(f"{_POD}.automountServiceAccountToken", True),
    "image by tag": _set(f"{_AGENT}.image", "registry.example.org/spiffe-delegate:0.1.0"),
    "env order": _set(f"{_AGENT}.env.0.value", "$(POD_IP):9086"),
}


@pytest.mark.parametrize("breakage", AGENT_BREAKAGES)
def test_agent_check_catches(breakage: str) -> None:
    agent = agent_of(rendered("overlays/default"))
    AGENT_BREAKAGES[breakage](agent)
    assert checks.agent_problems(agent), breakage


@pytest.mark.parametrize("breakage", ["no hostNetwork", "default DNS", "root", "hostPID"])
def test_proxy_check_catches(breakage: str) -> None:
    proxy = proxy_of(rendered("base"))
    {"no hostNetwork": _set(f"{_POD}.hostNetwork", False),
     "default DNS": _set(f"{_POD}.dnsPolicy", "ClusterFirst"),
     "root": _set(f"{_POD}.securityContext.runAsUser", 0),
     "hostPID": _set(f"{_POD}.hostPID", True)}[breakage](proxy)
    assert checks.proxy_problems(proxy), breakage


def test_namespaces_admit_the_pods_and_only_privileged_does() -> None:
    resources = rendered("base")
    for namespace in (AGENT_NS, PROXY_NS):
        labels = find(resources, "Namespace", namespace)["metadata"]["labels"]
        assert labels["pod-security.kubernetes.io/enforce"] == "privileged", namespace
    # Why privileged: baseline forbids what these pods need.
    assert pod_spec(agent_of(resources))["hostPID"] is True
    assert pod_spec(proxy_of(resources))["hostNetwork"] is True
    host_volumes = {v["name"] for v in pod_spec(agent_of(resources))["volumes"]
                    if "hostPath" in v}
    assert host_volumes == {"spire-admin", "sds"}


def test_agent_network_is_isolated() -> None:
    resources = rendered("base")
    [policy] = [r for r in resources if r["kind"] == "NetworkPolicy"]
    agent = agent_of(resources)
    assert policy["metadata"]["namespace"] == AGENT_NS
    assert policy["spec"]["podSelector"]["matchLabels"].items() <= (
        agent["spec"]["template"]["metadata"]["labels"].items())
    assert sorted(policy["spec"]["policyTypes"]) == ["Egress", "Ingress"]
    assert "ingress" not in policy["spec"] and "egress" not in policy["spec"]
    proxy_labels = proxy_of(resources)["spec"]["template"]["metadata"]["labels"]
    assert not policy["spec"]["podSelector"]["matchLabels"].items() <= proxy_labels.items()


def _serve_once(status: int) -> tuple[int, threading.Thread]:
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(status)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.handle_request, daemon=True)
    thread.start()
    return int(server.server_address[1]), thread


@pytest.mark.parametrize("probe", ["livenessProbe", "readinessProbe"])
def test_exec_probes_fail_on_anything_but_success(probe: str) -> None:
    """The health-loopback component's probe commands, run against a stand-in listener:
    exit 0 on 200, non-zero on 503 and when nothing listens."""
    agent = agent_of(rendered("base+health-loopback"))
    command = container(agent, "spiffe-delegate")[probe]["exec"]["command"]
    assert command[0] == "python3"
    results = {}
    for status in (200, 503):
        port, thread = _serve_once(status)
        argv = [sys.executable, *(a.replace(":8086/", f":{port}/") for a in command[1:])]
        results[status] = subprocess.run(argv, capture_output=True, timeout=30).returncode
        thread.join(timeout=5)
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        port = unused.getsockname()[1]
        argv = [sys.executable, *(a.replace(":8086/", f":{port}/") for a in command[1:])]
        results[0] = subprocess.run(argv, capture_output=True, timeout=30).returncode
    assert results[200] == 0 and results[503] != 0 and results[0] != 0, results


# --- the agent's settings ---------------------------------------------------------------

@pytest.mark.parametrize("name", AGENT_BUILDS)
def test_agent_environment_parses_and_health_is_probed(name: str) -> None:
    agent = agent_of(rendered(name))
    settings = settings_of(agent)
    c = container(agent, "spiffe-delegate")
    health = settings.health_address
    assert health is not None
    for probe in ("livenessProbe", "readinessProbe"):
        if "httpGet" in c[probe]:
            # kubelet probes the pod IP: the health listener must not be on loopback.
            assert health.host in ("0.0.0.0", "::"), health
            assert checks.named_port(c, c[probe]["httpGet"]["port"]) == health.port, probe
        else:
            # An exec probe runs inside the pod and asks the listener on loopback.
            assert health.host == "127.0.0.1", health
            url = checks.probe_url(c[probe])
            assert url is not None and url.startswith(f"http://{health}/"), url
    assert settings.trust_domain == "example.org"
    assert settings.sds_socket_mode == 0o666  # Envoy runs as another user


@pytest.mark.parametrize("name", AGENT_BUILDS)
def test_agent_can_write_where_it_must(name: str) -> None:
    """The root filesystem is read-only: the SDS socket's directory and the temporary
    directory (the SDS relay's private gRPC socket, agent/uds/relay.py) must be volumes."""
    agent = agent_of(rendered(name))
    settings = settings_of(agent)
    tmpdir = env_of(container(agent, "spiffe-delegate")).get("TMPDIR", "/tmp")
    for path in (str(settings.sds_socket.parent), tmpdir):
        mount = checks.mount_for(agent, "spiffe-delegate", path)
        assert mount.get("readOnly") is not True, path


def test_base_keeps_metrics_on_loopback() -> None:
    settings = settings_of(agent_of(rendered("base")))
    assert settings.metrics_address is not None
    assert settings.metrics_address.host == "127.0.0.1"
    assert settings.metrics_tls.mode == "none"


def _metrics_wiring(resources: list[Resource]) -> AgentSettings:
    """The port the agent serves /metrics on is the one the Service, the ServiceMonitor and
    the NetworkPolicy use."""
    agent = agent_of(resources)
    settings = settings_of(agent)
    assert settings.metrics_address is not None
    assert settings.metrics_address.host in ("0.0.0.0", "::")
    port = settings.metrics_address.port
    service = find(resources, "Service", "spiffe-delegate-metrics", AGENT_NS)
    [service_port] = service["spec"]["ports"]
    assert service_port["targetPort"] == port
    assert service["spec"]["selector"].items() <= (
        agent["spec"]["template"]["metadata"]["labels"].items())
    monitor = find(resources, "ServiceMonitor", "spiffe-delegate")
    assert monitor["spec"]["endpoints"][0]["port"] == service_port["name"]
    policy = find(resources, "NetworkPolicy", "spiffe-delegate-metrics", AGENT_NS)
    assert policy["spec"]["ingress"][0]["ports"] == [{"protocol": "TCP", "port": port}]
    assert port in {p["containerPort"] for p in container(agent, "spiffe-delegate")["ports"]}
    return settings


def test_default_overlay_serves_metrics_with_cert_manager_files() -> None:
    resources = rendered("overlays/default")
    settings = _metrics_wiring(resources)
    tls = settings.metrics_tls
    assert tls.mode == "files" and tls.allowed_ids == (SCRAPER_ID,)
    agent = agent_of(resources)
    certificate = find(resources, "Certificate", "spiffe-delegate-metrics", AGENT_NS)
    volumes = {v["name"]: v for v in pod_spec(agent)["volumes"]}
    for path in (tls.cert_file, tls.key_file, tls.client_ca_file):
        assert path is not None
        mount = checks.mount_for(agent, "spiffe-delegate", str(path))
        assert mount["readOnly"] is True
        secret = volumes[mount["name"]]["secret"]
        assert secret["secretName"] == certificate["spec"]["secretName"]
    client = find(resources, "Certificate", "prometheus-metrics-client", "monitoring")
    assert client["spec"]["uris"] == [SCRAPER_ID]


def test_spiffe_metrics_overlay_admits_the_scraper_by_its_entry() -> None:
    resources = rendered("overlays/spiffe-metrics")
    settings = _metrics_wiring(resources)
    assert settings.metrics_tls.mode == "spiffe"
    scraper = find(resources, "ClusterStaticEntry", "spiffe-delegate-metrics-scraper")
    assert settings.metrics_tls.allowed_ids == (scraper["spec"]["spiffeID"],)
    # Prometheus checks the host name: the agent's SVID must carry it.
    monitor = find(resources, "ServiceMonitor", "spiffe-delegate")
    server_name = monitor["spec"]["endpoints"][0]["tlsConfig"]["serverName"]
    agent_entry = find(resources, "ClusterStaticEntry", "spiffe-delegate-agent")
    assert agent_entry["spec"]["dnsNames"] == [server_name]
    # The scraper's entry is deploy/monitoring/scraper-entries.json, as a custom resource.
    [entry] = json.loads((DEPLOY / "monitoring" / "scraper-entries.json").read_text())[
        "entries"]
    assert scraper["spec"]["spiffeID"] == entry["spiffe_id"]
    assert scraper["spec"]["parentID"] == entry["parent_id"]
    assert scraper["spec"]["selectors"] == [f"{s['type']}:{s['value']}"
                                            for s in entry["selectors"]]
    assert scraper["spec"]["x509SVIDTTL"] == "1h" and entry["x509_svid_ttl"] == 3600


# --- sockets on the node ----------------------------------------------------------------

def _pipe_paths(envoy_config: str) -> list[str]:
    config = yaml.safe_load(envoy_config)
    paths = []
    for cluster in config["static_resources"]["clusters"]:
        for endpoints in cluster["load_assignment"]["endpoints"]:
            for lb in endpoints["lb_endpoints"]:
                pipe = lb["endpoint"]["address"].get("pipe")
                if pipe:
                    paths.append(pipe["path"])
    return paths


@pytest.mark.parametrize("name", ["base", "overlays/default", "overlays/spiffe-metrics"])
def test_proxy_reaches_the_agents_sds_socket_through_the_node(name: str) -> None:
    resources = rendered(name)
    agent, proxy = agent_of(resources), proxy_of(resources)
    sds = settings_of(agent).sds_socket
    node_socket = host_path(agent, "spiffe-delegate", str(sds))
    assert node_socket == "/run/spiffe-delegate/sds.sock"
    assert checks.mount_for(agent, "spiffe-delegate", str(sds)).get("readOnly") is not True
    [config_map] = [r for r in resources if r["kind"] == "ConfigMap"
                    and r["metadata"]["namespace"] == PROXY_NS]
    [pipe] = _pipe_paths(config_map["data"]["envoy.yaml"])
    assert host_path(proxy, "envoy", pipe) == node_socket
    # Connecting needs write permission on the socket file, not a writable mount.
    assert checks.mount_for(proxy, "envoy", pipe)["readOnly"] is True


def _hcl_admin_socket() -> tuple[str, list[str]]:
    text = (SPIRE / "agent.conf.hcl").read_text()
    [path] = re.findall(r'^\s*admin_socket_path\s*=\s*"([^"]+)"', text, re.M)
    [block] = re.findall(r"authorized_delegates\s*=\s*\[(.*?)\]", text, re.S)
    return path, re.findall(r'"([^"]+)"', block)


@pytest.mark.parametrize("name", ["base", "overlays/default", "overlays/spiffe-metrics"])
def test_agent_reaches_the_spire_admin_socket_of_agent_conf(name: str) -> None:
    agent = agent_of(rendered(name))
    admin = str(settings_of(agent).spire_admin_socket)
    hcl_path, _ = _hcl_admin_socket()
    # SPIRE (patched as spire-agent-daemonset-patch.yaml) mounts the host directory at the
    # same path, so its admin_socket_path is also the node's path.
    assert host_path(agent, "spiffe-delegate", admin) == hcl_path
    mount = checks.mount_for(agent, "spiffe-delegate", admin)
    assert mount["readOnly"] is True  # connect(2) works through a read-only mount


def test_helm_component_points_the_agent_at_the_charts_admin_socket() -> None:
    agent = agent_of(rendered("base+spire-helm-admin-socket"))
    admin = str(settings_of(agent).spire_admin_socket)
    assert host_path(agent, "spiffe-delegate", admin) == HELM_ADMIN_SOCKET
    values = yaml.safe_load((SPIRE / "helm-values.yaml").read_text())["spire-agent"]
    assert values["sockets"]["admin"] == {"enabled": True, "mountOnHost": True}
    base = values["sockets"]["hostBasePath"]
    assert f"{base}/csi.spiffe.io/admin/admin.sock" == HELM_ADMIN_SOCKET


def test_spire_agent_patch_shares_the_admin_directory(tmp_path: Path) -> None:
    """The patch for plain SPIRE manifests, applied to a minimal SPIRE agent DaemonSet."""
    skeleton = {
        "apiVersion": "apps/v1", "kind": "DaemonSet",
        "metadata": {"name": "spire-agent", "namespace": "spire"},
        "spec": {"selector": {"matchLabels": {"app": "spire-agent"}}, "template": {
            "metadata": {"labels": {"app": "spire-agent"}},
            "spec": {"hostPID": True, "containers": [{
                "name": "spire-agent", "image": "ghcr.io/spiffe/spire-agent:1.12.0",
                "volumeMounts": [{"name": "spire-config", "mountPath": "/run/spire/config"}]}],
                "volumes": [{"name": "spire-config", "configMap": {"name": "spire-agent"}}]}}},
    }
    (tmp_path / "spire-agent.yaml").write_text(yaml.safe_dump(skeleton))
    (tmp_path / "patch.yaml").write_bytes((SPIRE / "spire-agent-daemonset-patch.yaml")
                                          .read_bytes())
    (tmp_path / "kustomization.yaml").write_text(yaml.safe_dump(
        {"resources": ["spire-agent.yaml"], "patches": [{"path": "patch.yaml"}]}))
    [spire_agent] = build(tmp_path)
    kubernetes_validate.validate(spire_agent, K8S_VERSIONS[0], strict=True)
    hcl_path, _ = _hcl_admin_socket()
    assert host_path(spire_agent, "spire-agent", hcl_path) == hcl_path
    assert checks.mount_for(spire_agent, "spire-agent", hcl_path).get("readOnly") is not True
    assert len(container(spire_agent, "spire-agent")["volumeMounts"]) == 2


# --- SPIFFE IDs -------------------------------------------------------------------------

def _selected(entry: Resource, workload: Resource) -> bool:
    """Whether a ClusterSPIFFEID selects a workload's pods, and its selectors match them."""
    spec, pod = entry["spec"], workload["spec"]["template"]
    namespace = workload["metadata"]["namespace"]
    ns_labels = {"kubernetes.io/metadata.name": namespace}
    if not spec["namespaceSelector"]["matchLabels"].items() <= ns_labels.items():
        return False
    if not (spec.get("podSelector") or {}).get("matchLabels", {}).items() <= (
            pod["metadata"]["labels"].items()):
        return False
    selectors = {f"k8s:ns:{namespace}", f"k8s:sa:{pod['spec']['serviceAccountName']}"}
    return set(spec["workloadSelectorTemplates"]) <= selectors


@pytest.mark.parametrize("name", ["overlays/default", "overlays/spiffe-metrics"])
def test_entries_give_each_workload_the_id_the_other_files_name(name: str) -> None:
    resources = rendered(name)
    agent, proxy = agent_of(resources), proxy_of(resources)
    alias = find(resources, "ClusterStaticEntry", "spiffe-delegate-node-alias")
    statics = [r for r in resources if r["kind"] == "ClusterStaticEntry" and r is not alias]
    assert statics and all(s["spec"]["parentID"] == alias["spec"]["spiffeID"]
                           for s in statics)
    # The agent: a static entry for its namespace and service account, listed as delegate.
    agent_entry = find(resources, "ClusterStaticEntry", "spiffe-delegate-agent")["spec"]
    assert set(agent_entry["selectors"]) == {
        f"k8s:ns:{AGENT_NS}", f"k8s:sa:{pod_spec(agent)['serviceAccountName']}"}
    _, delegates = _hcl_admin_socket()
    assert delegates == [agent_entry["spiffeID"]]
    values = yaml.safe_load((SPIRE / "helm-values.yaml").read_text())["spire-agent"]
    assert values["authorizedDelegates"] == [agent_entry["spiffeID"]]
    ids = {r["metadata"]["name"]: r for r in resources if r["kind"] == "ClusterSPIFFEID"}
    # The proxy: selected, with the ID the registry side's RBAC allows to pull.
    proxy_entry = ids["spiffe-delegate-registry-proxy"]
    assert _selected(proxy_entry, proxy)
    assert not _selected(proxy_entry, agent)
    registry_side = (DEPLOY / "envoy" / "registry-side.yaml").read_text()
    rbac = yaml.safe_load(registry_side)["static_resources"]["listeners"][0][
        "filter_chains"][0]["filters"][0]["typed_config"]["http_filters"][0]["typed_config"][
        "rules"]["policies"]
    principals = {policy: p["principals"][0]["authenticated"]["principal_name"]["exact"]
                  for policy, p in rbac.items()}
    assert principals["node-proxies-pull"] == proxy_entry["spec"]["spiffeIDTemplate"]
    assert principals["ci-everything"] == ids["spiffe-delegate-ci"]["spec"]["spiffeIDTemplate"]
    # The registry: the ID the node proxy pins, given to the example's pods.
    node_proxy = yaml.safe_load((DEPLOY / "envoy" / "node-proxy.yaml").read_text())
    [registry_cluster] = [c for c in node_proxy["static_resources"]["clusters"]
                          if c["name"] == "registry"]
    [pin] = registry_cluster["transport_socket"]["typed_config"]["common_tls_context"][
        "combined_validation_context"]["default_validation_context"][
        "match_typed_subject_alt_names"]
    registry_entry = ids["spiffe-delegate-registry"]
    assert pin["matcher"]["exact"] == registry_entry["spec"]["spiffeIDTemplate"]
    [example] = [r for r in rendered("examples/registry-side") if r["kind"] == "Deployment"]
    assert _selected(registry_entry, example)
    assert not _selected(registry_entry, proxy)
    for entry in ids.values():
        assert entry["spec"]["ttl"] == "1h"


def test_entries_and_spire_settings_are_what_the_admin_commands_print() -> None:
    """`spiffe-delegate entries --format crd` and `spiffe-delegate spire-config` print the same
    resources and settings (with the proxy's pod label): the two must not drift apart."""
    settings = entries.EntriesSettings(
        pod_labels=(("registry-proxy", "app.kubernetes.io/name", "registry-proxy"),))
    printed = [d for d in yaml.safe_load_all(entries.render(settings, "crd")) if d]
    ours = [d for d in yaml.safe_load_all(
        (COMPONENTS / "spire-entries" / "entries.yaml").read_text()) if d]
    assert ours == printed
    config = spire_config.SpireConfigSettings()
    assert yaml.safe_load((SPIRE / "helm-values.yaml").read_text()) == yaml.safe_load(
        spire_config.render(config, "helm"))

    def agent_block(text: str) -> str:
        [block] = re.findall(r"^agent \{$.*?^\}$", text, re.M | re.S)
        return block

    assert agent_block((SPIRE / "agent.conf.hcl").read_text()) == agent_block(
        spire_config.render(config, "hcl"))


# --- Envoy configs and copies -----------------------------------------------------------

def _copies() -> list[tuple[Path, Path]]:
    lines = (KUSTOMIZE / "sync.sh").read_text().splitlines()
    pairs = [shlex.split(line)[1:] for line in lines if line.startswith("cp ")]
    assert pairs and all(len(p) == 2 for p in pairs)
    return [(ROOT / a, ROOT / b) for a, b in pairs]


def test_copies_are_byte_identical_to_the_originals() -> None:
    for original, copied in _copies():
        assert copied.read_bytes() == original.read_bytes(), (
            f"{copied.relative_to(ROOT)} differs from {original.relative_to(ROOT)}: "
            "run bash deploy/kustomize/sync.sh")


def test_every_copy_is_listed_in_sync_sh() -> None:
    originals = [*(DEPLOY / "envoy").glob("*.yaml"), *(DEPLOY / "monitoring").glob("*.yaml")]
    names = {p.name for p in originals}
    on_disk = {p for p in KUSTOMIZE.rglob("*.yaml") if p.name in names}
    listed = {copied for _, copied in _copies()}
    assert on_disk == listed
    assert all(original.parent.parent == DEPLOY for original, _ in _copies())


@pytest.mark.parametrize(("name", "namespace", "original", "workload"), [
    ("overlays/default", PROXY_NS, "node-proxy.yaml", ("DaemonSet", "registry-proxy")),
    ("examples/registry-side", PROXY_NS, "registry-side.yaml",
     ("Deployment", "zarf-registry-example")),
])
def test_envoy_config_map_is_the_deploy_config_and_envoy_accepts_it(
        name: str, namespace: str, original: str, workload: tuple[str, str],
        tmp_path: Path) -> None:
    resources = rendered(name)
    [config_map] = [r for r in resources if r["kind"] == "ConfigMap"
                    and r["metadata"]["namespace"] == namespace]
    text = config_map["data"]["envoy.yaml"]
    assert text.encode() == (DEPLOY / "envoy" / original).read_bytes()
    # Mounted where Envoy is told to read it, under the generated (hashed) name.
    envoy_workload = find(resources, *workload, namespace)
    envoy = container(envoy_workload, "envoy")
    config_path = envoy["args"][envoy["args"].index("--config-path") + 1]
    mount = checks.mount_for(envoy_workload, "envoy", config_path)
    volume = {v["name"]: v for v in pod_spec(envoy_workload)["volumes"]}[mount["name"]]
    assert volume["configMap"]["name"] == config_map["metadata"]["name"]
    assert re.fullmatch(r".+-[a-z0-9]{10}", config_map["metadata"]["name"])
    assert Path(config_path).relative_to(mount["mountPath"]) == Path("envoy.yaml")
    result = validate_config(text, tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "OK" in result.stdout + result.stderr


def test_a_changed_envoy_config_changes_the_config_map_name(tmp_path: Path) -> None:
    """The hash suffix is what rolls the DaemonSet when node-proxy.yaml changes."""
    for source in BASE.iterdir():
        (tmp_path / source.name).write_bytes(source.read_bytes())
    (tmp_path / "node-proxy.yaml").write_text(
        (BASE / "node-proxy.yaml").read_text().replace("stream_idle_timeout: 300s",
                                                       "stream_idle_timeout: 301s"))
    before = proxy_of(rendered("base"))
    after = proxy_of(build(tmp_path))

    def config_name(daemonset: Resource) -> str:
        [name] = [v["configMap"]["name"] for v in pod_spec(daemonset)["volumes"]
                  if "configMap" in v]
        return str(name)

    assert config_name(before) != config_name(after)
    assert config_name(before).rsplit("-", 1)[0] == config_name(after).rsplit("-", 1)[0]


# --- documentation ----------------------------------------------------------------------

def test_readme_names_every_overlay_and_component() -> None:
    readme = (DEPLOY / "README.md").read_text()
    assert "kubectl apply -k deploy/kustomize/overlays/default" in readme
    for path in [*(KUSTOMIZE / "overlays").iterdir(), *COMPONENTS.iterdir(),
                 *(KUSTOMIZE / "examples").iterdir(), *SPIRE.iterdir()]:
        assert path.name in readme, path


def test_every_custom_kind_with_a_schema_is_rendered() -> None:
    kinds = {r["kind"] for name in BUILD_NAMES for r in rendered(name)}
    assert kinds >= CUSTOM_KINDS == {"ClusterSPIFFEID", "ClusterStaticEntry",
                                     "ServiceMonitor", "Certificate"}
