"""`spiffe-delegate entries`: the same entries as commands, -data JSON and controller CRDs."""

from __future__ import annotations

import json
import os
import re
import secrets
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml

from agent._proto.spire.api.agent.delegatedidentity.v1 import delegatedidentity_pb2 as pb
from agent._proto.spire.api.agent.delegatedidentity.v1 import delegatedidentity_pb2_grpc as pb_grpc
from agent.admin.entries import (
    CRD_API_VERSION,
    EntriesSettings,
    ServiceAccount,
    build_entries,
    go_duration,
    pod_label,
    render,
    render_commands,
    render_crd,
    render_data,
    service_account,
    ttl_seconds,
)
from agent.devspire import DevSpire, DevSpireSettings
from agent.devspire.entries import load_entries, parse_entries
from agent.errors import ConfigError
from tests.devspire.conftest import Stream, read
from tests.devspire.test_attestor import make_proc
from tests.waiting import eventually

REPO = Path(__file__).resolve().parents[2]
TD = "example.org"
AGENT = f"spiffe://{TD}/ns/spiffe-delegate/sa/spiffe-delegate"
PROXY = f"spiffe://{TD}/ns/zarf/sa/registry-proxy"
REGISTRY = f"spiffe://{TD}/ns/zarf/sa/zarf-registry"
CI = f"spiffe://{TD}/ns/ci/sa/image-publisher"
ALIAS = f"spiffe://{TD}/ns/spire/sa/spire-agent"
WORKLOAD_IDS = [AGENT, PROXY, REGISTRY, CI]
SELECTORS = {
    AGENT: ["k8s:ns:spiffe-delegate", "k8s:sa:spiffe-delegate"],
    PROXY: ["k8s:ns:zarf", "k8s:sa:registry-proxy"],
    REGISTRY: ["k8s:ns:zarf", "k8s:sa:zarf-registry"],
    CI: ["k8s:ns:ci", "k8s:sa:image-publisher"],
}
# spire-server entry create's flags (cmd/spire-server/cli/entry/create.go): the boolean ones
# take no value, every other one takes exactly one.
BOOL_FLAGS = {"-node", "-admin", "-downstream", "-storeSVID", "-disableX509SVIDPrefetch",
              "-jwtSVIDIncludeJTI"}
VALUE_FLAGS = {"-entryID", "-parentID", "-spiffeID", "-selector", "-federatesWith",
               "-x509SVIDTTL", "-jwtSVIDTTL", "-entryExpiry", "-dns", "-hint", "-data",
               "-socketPath"}


def parse_command(tokens: list[str]) -> dict[str, list[str]]:
    """The flags of one `entry create` invocation, as Go's flag package would read them."""
    flags: dict[str, list[str]] = {}
    rest = iter(tokens)
    for token in rest:
        if token in BOOL_FLAGS:
            flags.setdefault(token, []).append("true")
        elif token in VALUE_FLAGS:
            flags.setdefault(token, []).append(next(rest))
        else:
            raise AssertionError(f"spire-server entry create has no flag {token!r}")
    return flags


def commands(text: str, prefix: list[str] | None = None) -> list[dict[str, list[str]]]:
    prefix = prefix or ["spire-server"]
    parsed = []
    for line in text.splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        tokens = shlex.split(line)
        head = [*prefix, "entry", "create"]
        assert tokens[: len(head)] == head, line
        parsed.append(parse_command(tokens[len(head):]))
    return parsed


def test_commands_form_has_one_spire_server_command_per_entry() -> None:
    text = render_commands(EntriesSettings())
    parsed = commands(text)
    assert len(parsed) == 5
    alias, *workloads = parsed
    assert alias == {
        "-node": ["true"], "-spiffeID": [ALIAS],
        "-selector": ["k8s_psat:cluster:example-cluster", "k8s_psat:agent_ns:spire",
                      "k8s_psat:agent_sa:spire-agent"]}
    assert [w["-spiffeID"] for w in workloads] == [[i] for i in WORKLOAD_IDS]
    for flags in workloads:
        (spiffe_id,) = flags["-spiffeID"]
        assert flags == {"-parentID": [ALIAS], "-spiffeID": [spiffe_id],
                         "-selector": SELECTORS[spiffe_id], "-x509SVIDTTL": ["3600"]}
    # Each command follows a comment saying what it registers; the header says the agent's
    # ID must be an authorized delegate too, with the command that prints that setting.
    assert "authorized_delegates" in text
    assert f"#   {AGENT}" in text.splitlines()
    hint = [line for line in text.splitlines() if "spiffe-delegate spire-config" in line]
    assert hint and shlex.split(hint[0].lstrip("# "))[1:] == [
        "spire-config", "--trust-domain", TD, "--delegate-id", AGENT]
    lines = text.splitlines()
    for index, line in enumerate(lines):
        if line.startswith("spire-server "):
            assert lines[index - 1].startswith("#")


def test_commands_use_the_given_spire_server_command_and_quote_values() -> None:
    settings = EntriesSettings(
        spire_server_command="kubectl exec -n spire spire-server-0 -- /opt/spire/bin/spire-server",
        svid_ttl=600)
    prefix = ["kubectl", "exec", "-n", "spire", "spire-server-0", "--",
              "/opt/spire/bin/spire-server"]
    parsed = commands(render_commands(settings), prefix)
    assert [p["-x509SVIDTTL"] for p in parsed[1:]] == [["600"]] * 4


def test_k8s_psat_style_writes_each_workload_once_per_node() -> None:
    nodes = ("0d3c4a2e-0000-4000-8000-000000000001", "0d3c4a2e-0000-4000-8000-000000000002")
    settings = EntriesSettings(node_selector_style="k8s_psat", node_uids=nodes,
                               cluster="prod")
    parsed = commands(render_commands(settings))
    assert all("-node" not in p for p in parsed)  # no alias in this style
    pairs = sorted((p["-spiffeID"][0], p["-parentID"][0]) for p in parsed)
    assert pairs == sorted(
        (spiffe_id, f"spiffe://{TD}/spire/agent/k8s_psat/prod/{node}")
        for spiffe_id in WORKLOAD_IDS for node in nodes)


def test_parent_id_style_uses_an_existing_parent_and_writes_no_alias() -> None:
    parent = f"spiffe://{TD}/k8s-cluster/prod"
    parsed = commands(render_commands(EntriesSettings(node_selector_style="parent-id",
                                                      parent_id=parent)))
    assert [p["-spiffeID"][0] for p in parsed] == WORKLOAD_IDS
    assert {p["-parentID"][0] for p in parsed} == {parent}


def test_alias_style_with_a_given_alias_id() -> None:
    alias = f"spiffe://{TD}/k8s-cluster/prod"
    entries = build_entries(EntriesSettings(parent_id=alias, cluster="prod",
                                            spire_agent=ServiceAccount("spire-system", "agent")))
    assert entries[0].node and entries[0].spiffe_id == alias
    assert entries[0].parent_id == f"spiffe://{TD}/spire/server"
    assert entries[0].selectors == ("k8s_psat:cluster:prod", "k8s_psat:agent_ns:spire-system",
                                    "k8s_psat:agent_sa:agent")
    assert {e.parent_id for e in entries[1:]} == {alias}


def test_data_form_is_what_entry_create_data_reads() -> None:
    document = json.loads(render_data(EntriesSettings(svid_ttl=900)))
    assert list(document) == ["entries"]
    alias, *workloads = document["entries"]
    assert alias == {"spiffe_id": ALIAS, "parent_id": f"spiffe://{TD}/spire/server",
                     "selectors": [{"type": "k8s_psat", "value": "cluster:example-cluster"},
                                   {"type": "k8s_psat", "value": "agent_ns:spire"},
                                   {"type": "k8s_psat", "value": "agent_sa:spire-agent"}]}
    for raw, spiffe_id in zip(workloads, WORKLOAD_IDS, strict=True):
        assert raw == {"spiffe_id": spiffe_id, "parent_id": ALIAS, "x509_svid_ttl": 900,
                       "selectors": [dict(zip(("type", "value"), s.split(":", 1), strict=True))
                                     for s in SELECTORS[spiffe_id]]}
    # dev-spire's parser (SPIRE's field names and checks) takes it without a warning field.
    parsed = parse_entries(document, TD)
    assert [e.spiffe_id for e in parsed] == [ALIAS, *WORKLOAD_IDS]
    assert all(e.x509_svid_ttl == 900 for e in parsed[1:])


def test_data_form_of_every_style_parses_in_dev_spire() -> None:
    for settings in (EntriesSettings(),
                     EntriesSettings(node_selector_style="parent-id"),
                     EntriesSettings(node_selector_style="k8s_psat", node_uids=("n1", "n2"))):
        parsed = parse_entries(json.loads(render_data(settings)), TD)
        assert {e.spiffe_id for e in parsed} >= set(WORKLOAD_IDS)


def crd_documents(text: str) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(text) if d is not None]


def test_crd_form_is_controller_manager_resources() -> None:
    settings = EntriesSettings(class_name="spire-mgmt-spire", svid_ttl=5400,
                               pod_labels=(pod_label("registry-proxy:app=registry-proxy"),))
    text = render_crd(settings)
    docs = crd_documents(text)
    assert all(d["apiVersion"] == CRD_API_VERSION for d in docs)
    assert [(d["kind"], d["metadata"]["name"]) for d in docs] == [
        ("ClusterStaticEntry", "spiffe-delegate-node-alias"),
        ("ClusterStaticEntry", "spiffe-delegate-agent"),
        ("ClusterSPIFFEID", "spiffe-delegate-registry-proxy"),
        ("ClusterSPIFFEID", "spiffe-delegate-registry"),
        ("ClusterSPIFFEID", "spiffe-delegate-ci"),
    ]
    alias, agent, proxy, registry, ci = (d["spec"] for d in docs)
    assert alias == {"className": "spire-mgmt-spire", "spiffeID": ALIAS,
                     "parentID": f"spiffe://{TD}/spire/server",
                     "selectors": ["k8s_psat:cluster:example-cluster",
                                   "k8s_psat:agent_ns:spire", "k8s_psat:agent_sa:spire-agent"]}
    assert agent == {"className": "spire-mgmt-spire", "spiffeID": AGENT, "parentID": ALIAS,
                     "selectors": SELECTORS[AGENT], "x509SVIDTTL": "1h30m"}
    assert proxy == {
        "className": "spire-mgmt-spire", "spiffeIDTemplate": PROXY,
        "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "zarf"}},
        "podSelector": {"matchLabels": {"app": "registry-proxy"}},
        "workloadSelectorTemplates": SELECTORS[PROXY], "ttl": "1h30m"}
    assert "podSelector" not in registry and registry["spiffeIDTemplate"] == REGISTRY
    assert registry["workloadSelectorTemplates"] == SELECTORS[REGISTRY]
    assert ci["namespaceSelector"] == {"matchLabels": {"kubernetes.io/metadata.name": "ci"}}
    assert ci["spiffeIDTemplate"] == CI and ci["workloadSelectorTemplates"] == SELECTORS[CI]
    assert AGENT in text and "authorized_delegates" in text


def test_crd_form_with_k8s_psat_has_one_static_agent_entry_per_node() -> None:
    docs = crd_documents(render_crd(EntriesSettings(node_selector_style="k8s_psat",
                                                    node_uids=("n1", "N_2"))))
    statics = [d for d in docs if d["kind"] == "ClusterStaticEntry"]
    assert [d["metadata"]["name"] for d in statics] == ["spiffe-delegate-agent-n1",
                                                        "spiffe-delegate-agent-n-2"]
    assert [d["spec"]["parentID"] for d in statics] == [
        f"spiffe://{TD}/spire/agent/k8s_psat/example-cluster/n1",
        f"spiffe://{TD}/spire/agent/k8s_psat/example-cluster/N_2"]
    assert sum(d["kind"] == "ClusterSPIFFEID" for d in docs) == 3


def test_ids_match_the_envoy_config_placeholders() -> None:
    ids = {e.spiffe_id for e in build_entries(EntriesSettings())}
    for name in ("node-proxy.yaml", "registry-side.yaml"):
        text = (REPO / "deploy" / "envoy" / name).read_text()
        found = set(re.findall(r"spiffe://[A-Za-z0-9./_-]+[A-Za-z0-9_-]", text))
        assert found and found <= ids, (name, found - ids)


@pytest.mark.parametrize(("settings", "message"), [
    (EntriesSettings(node_selector_style="k8s_psat"), "needs --node-uid"),
    (EntriesSettings(node_selector_style="k8s_psat", node_uids=("n1",),
                     parent_id=f"spiffe://{TD}/x"), "does not go with"),
    (EntriesSettings(node_uids=("n1",)), "goes only with"),
    (EntriesSettings(parent_id="spiffe://other.org/alias"), "trust domain example.org"),
    (EntriesSettings(parent_id=f"spiffe://{TD}/spire/server"), "server's own ID"),
    (EntriesSettings(registry=ServiceAccount("zarf", "registry-proxy")), "also --registry-proxy"),
    (EntriesSettings(spire_agent=ServiceAccount("ci", "image-publisher")), "also the node alias"),
    (EntriesSettings(trust_domain="Example.org"), "not a trust domain"),
    (EntriesSettings(cluster="a/b"), "--cluster"),
    (EntriesSettings(svid_ttl=0), "--svid-ttl"),
])
def test_unusable_settings_are_refused(settings: EntriesSettings, message: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        render(settings, "commands")


def test_flag_value_parsers() -> None:
    assert service_account("zarf/registry-proxy") == ServiceAccount("zarf", "registry-proxy")
    for bad in ("zarf", "Zarf/x", "zarf/", "/x", "zarf/a_b", "a/b/c"):
        with pytest.raises(ValueError):
            service_account(bad)
    assert pod_label("ci:app.kubernetes.io/name=runner") == ("ci", "app.kubernetes.io/name",
                                                             "runner")
    for bad in ("agent:app=x", "ci:app", "ci=app=x", "ci:-bad=x"):
        with pytest.raises(ValueError):
            pod_label(bad)
    assert ttl_seconds("1h") == 3600 and ttl_seconds("90") == 90
    for bad in ("0s", "1.5s", "500ms"):
        with pytest.raises(ValueError):
            ttl_seconds(bad)
    assert [go_duration(s) for s in (3600, 5400, 90, 7261)] == ["1h", "1h30m", "1m30s",
                                                                "2h1m1s"]


# --- the command line ---------------------------------------------------------------------


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """The real command line, in its own process (main() configures the process's logging)."""
    return subprocess.run([sys.executable, "-m", "agent", *args], capture_output=True,
                          text=True, env={**os.environ, **(env or {})}, timeout=60,
                          check=False)


def test_cli_prints_each_form() -> None:
    for form in ("commands", "data", "crd"):
        done = run_cli("entries", "--format", form, "--svid-ttl", "30m",
                       "--registry-proxy", "edge/proxy")
        assert done.returncode == 0, done.stderr
        expected = render(EntriesSettings(svid_ttl=1800,
                                          registry_proxy=ServiceAccount("edge", "proxy")), form)
        assert done.stdout == expected


def test_cli_reads_environment_variables() -> None:
    done = run_cli("entries", "--format", "data", env={
        "SPIFFE_DELEGATE_ENTRIES_TRUST_DOMAIN": "corp.test",
        "SPIFFE_DELEGATE_ENTRIES_NODE_SELECTOR_STYLE": "k8s_psat",
        "SPIFFE_DELEGATE_ENTRIES_NODE_UID": "n1,n2"})
    assert done.returncode == 0, done.stderr
    document = json.loads(done.stdout)
    assert {e["parent_id"] for e in document["entries"]} == {
        "spiffe://corp.test/spire/agent/k8s_psat/example-cluster/n1",
        "spiffe://corp.test/spire/agent/k8s_psat/example-cluster/n2"}


def test_cli_refuses_bad_flags_in_one_line() -> None:
    done = run_cli("entries", "--node-selector-style", "k8s_psat")
    assert (done.returncode, done.stdout) == (2, "")
    assert done.stderr.startswith("spiffe-delegate entries: error: --node-selector-style "
                                  "k8s_psat needs --node-uid")
    assert len(done.stderr.splitlines()) == 1
    done = run_cli("entries", "--agent", "nope")
    assert done.returncode == 2 and "--agent" in done.stderr and done.stdout == ""


# --- the -data form loaded into a running dev-spire ------------------------------------------


@dataclass
class Pod:
    uid: str
    namespace: str
    service_account: str
    pid: int


@pytest.fixture
def work_dir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="sd-adm-", dir="/tmp"))  # short: socket path <= 108 B
    yield path
    shutil.rmtree(path, ignore_errors=True)


@dataclass
class Spire:
    dev: DevSpire
    stub: pb_grpc.DelegatedIdentityStub
    pods: dict[str, Pod]
    pods_file: Path

    def write_pods(self) -> None:
        """The pods file dev-spire reads in place of the kubelet."""
        self.pods_file.write_text(json.dumps({"pods": [
            {"uid": p.uid, "namespace": p.namespace, "service_account": p.service_account}
            for p in self.pods.values()]}))

    async def svids(self, pod: str) -> dict[str, int]:
        """SPIFFE ID -> seconds left, for what SPIRE gives the pod's process."""
        stream = Stream(self.stub.SubscribeToX509SVIDs(
            pb.SubscribeToX509SVIDsRequest(pid=self.pods[pod].pid)))
        try:
            answer = await read(stream)
        finally:
            stream.cancel()
        return {f"spiffe://{s.x509_svid.id.trust_domain}{s.x509_svid.id.path}":
                s.x509_svid.expires_at - int(time.time()) for s in answer.x509_svids}


@pytest.fixture
def generated_entries(work_dir: Path) -> Path:
    """`spiffe-delegate entries --format data` as printed, in a file."""
    done = run_cli("entries", "--format", "data", "--svid-ttl", "10m")
    assert done.returncode == 0, done.stderr
    entries = work_dir / "entries.json"
    entries.write_text(done.stdout)
    return entries


@pytest.fixture
async def spire_with_generated_entries(work_dir: Path,
                                       generated_entries: Path) -> AsyncIterator[Spire]:
    """dev-spire reading the generated entries unchanged, with a pods file that puts this
    test process in spiffe-delegate's pod and four fake processes in pods of their own."""
    entries = generated_entries

    proc_root = work_dir / "proc"
    pods: dict[str, Pod] = {}
    for index, (name, account) in enumerate([
            ("agent", "spiffe-delegate/spiffe-delegate"), ("proxy", "zarf/registry-proxy"),
            ("registry", "zarf/zarf-registry"), ("ci", "ci/image-publisher"),
            ("stranger", "zarf/default")]):
        namespace, sa = account.split("/")
        pid = os.getpid() if name == "agent" else 2001 + index
        pod = Pod(str(uuid.uuid4()), namespace, sa, pid)
        pods[name] = pod
        make_proc(proc_root, pid, uid=0, gid=0,
                  cgroup=f"0::/kubepods/burstable/pod{pod.uid}/{secrets.token_hex(32)}\n")
    pods_file = work_dir / "pods.json"
    settings = DevSpireSettings(
        socket_path=str(work_dir / "admin.sock"), trust_domain=TD,
        entries_path=str(entries), pods_path=str(pods_file), proc_root=str(proc_root),
        authorized_delegates=(AGENT,), reload_interval=0.05)
    dev = DevSpire(settings)
    channel = grpc.aio.insecure_channel("unix:" + settings.socket_path)
    spire = Spire(dev, pb_grpc.DelegatedIdentityStub(channel), pods, pods_file)
    spire.write_pods()
    await dev.start()
    try:
        yield spire
    finally:
        await channel.close(None)
        await dev.stop(grace=0)


async def test_generated_data_entries_give_each_pod_its_svid(
        spire_with_generated_entries: Spire) -> None:
    spire = spire_with_generated_entries
    # The caller is authorized only through the generated agent entry (k8s:ns + k8s:sa of
    # spiffe-delegate's pod) and the agent ID listed as a delegate: there is no other entry.
    loaded = load_entries(spire.dev.settings.entries_path, TD)
    assert [e.spiffe_id for e in loaded] == [ALIAS, *WORKLOAD_IDS]
    for pod, expected in (("proxy", PROXY), ("registry", REGISTRY), ("ci", CI),
                          ("agent", AGENT)):
        got = await spire.svids(pod)
        assert list(got) == [expected], pod
        assert 590 <= got[expected] <= 610  # the entry's x509_svid_ttl, not the server's 1h
    # A pod of the same namespace under another service account matches no entry.
    assert await spire.svids("stranger") == {}


async def test_generated_entries_authorize_only_the_agents_pod(
        spire_with_generated_entries: Spire) -> None:
    spire = spire_with_generated_entries
    # spiffe-delegate's pod now runs under another service account: the caller matches no
    # entry, so it is not a delegate and gets nothing.
    spire.pods["agent"].service_account = "other"
    before = spire.dev.stats.pods_reloads
    spire.write_pods()
    await eventually(lambda: spire.dev.stats.pods_reloads > before, what="pods reload")
    stream = Stream(spire.stub.SubscribeToX509SVIDs(
        pb.SubscribeToX509SVIDsRequest(pid=spire.pods["proxy"].pid)))
    try:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await read(stream)
    finally:
        stream.cancel()
    assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert info.value.details() == "no identity issued"
