"""Registration entries for spiffe-delegate and the registry chain, in spire-server's forms.

Three forms of the same entries: ``spire-server entry create`` command lines, the JSON that
``spire-server entry create -data`` (and dev-spire's ``--entries``) reads, and SPIRE
Controller Manager resources. Everything here is a pure function of ``EntriesSettings``.
"""

from __future__ import annotations

import json
import re
import shlex
import textwrap
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import partial
from typing import Any

from agent.durations import parse_duration
from agent.errors import ConfigError

NODE_SELECTOR_STYLES = ("alias", "parent-id", "k8s_psat")
FORMATS = ("commands", "data", "crd")
CRD_API_VERSION = "spire.spiffe.io/v1alpha1"
# Workloads that ClusterSPIFFEIDs register (and that --pod-label may narrow).
POD_WORKLOADS = ("registry-proxy", "registry", "ci")

_DNS_LABEL = r"[a-z0-9](?:[-a-z0-9]*[a-z0-9])?"
_NAMESPACE = re.compile(_DNS_LABEL)
_SERVICE_ACCOUNT = re.compile(rf"{_DNS_LABEL}(?:\.{_DNS_LABEL})*")
_PATH_SEGMENT = re.compile(r"[A-Za-z0-9._-]+")
_TRUST_DOMAIN = re.compile(r"[a-z0-9._-]+")
# A label key: an optional DNS-subdomain prefix and '/', then a name of at most 63 characters.
_LABEL_KEY = re.compile(r"(?:[a-z0-9](?:[-a-z0-9.]*[a-z0-9])?/)?"
                        r"[A-Za-z0-9](?:[-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?")
_LABEL_VALUE = re.compile(r"(?:[A-Za-z0-9](?:[-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?)?")


@dataclass(frozen=True)
class ServiceAccount:
    """A Kubernetes service account, which names a workload in SPIRE's k8s selectors."""

    namespace: str
    name: str

    def __str__(self) -> str:
        return f"{self.namespace}/{self.name}"

    def spiffe_id(self, trust_domain: str) -> str:
        """The conventional ID, as the controller manager's default template renders it."""
        return f"spiffe://{trust_domain}/ns/{self.namespace}/sa/{self.name}"

    def selectors(self) -> tuple[str, str]:
        return (f"k8s:ns:{self.namespace}", f"k8s:sa:{self.name}")


def service_account(text: str) -> ServiceAccount:
    """Parses ``NAMESPACE/SERVICEACCOUNT``; ValueError says what is wrong."""
    namespace, sep, name = text.partition("/")
    if not sep:
        raise ValueError(f"{text!r} is not NAMESPACE/SERVICEACCOUNT, e.g. zarf/registry-proxy")
    if len(namespace) > 63 or not _NAMESPACE.fullmatch(namespace):
        raise ValueError(f"{text!r}: {namespace!r} is not a Kubernetes namespace name "
                         "(lowercase letters, digits and '-', at most 63)")
    if len(name) > 253 or not _SERVICE_ACCOUNT.fullmatch(name):
        raise ValueError(f"{text!r}: {name!r} is not a Kubernetes service account name "
                         "(lowercase letters, digits, '-' and '.')")
    return ServiceAccount(namespace, name)


def path_segment(text: str) -> str:
    """A cluster name or node UID: one segment of a SPIFFE ID path."""
    if not _PATH_SEGMENT.fullmatch(text) or text in (".", ".."):
        raise ValueError(f"{text!r} may hold only letters, digits, '-', '.' and '_'")
    return text


def pod_label(text: str) -> tuple[str, str, str]:
    """Parses ``WORKLOAD:KEY=VALUE`` (WORKLOAD one of registry-proxy, registry, ci)."""
    workload, sep, label = text.partition(":")
    key, eq, value = label.partition("=")
    if not sep or not eq:
        raise ValueError(f"{text!r} is not WORKLOAD:KEY=VALUE, "
                         "e.g. registry-proxy:app.kubernetes.io/name=registry-proxy")
    if workload not in POD_WORKLOADS:
        raise ValueError(f"{text!r}: {workload!r} is not one of {', '.join(POD_WORKLOADS)} "
                         "(spiffe-delegate's own entry is a static entry, without a pod selector)")
    if not _LABEL_KEY.fullmatch(key) or not _LABEL_VALUE.fullmatch(value) or len(value) > 63:
        raise ValueError(f"{text!r}: {key}={value} is not a Kubernetes label")
    return workload, key, value


def comment_lines(text: str, width: int = 96) -> list[str]:
    """``text`` as ``#`` comment lines; paths and IDs are never broken."""
    return ["# " + line for line in textwrap.wrap(
        text, width - 2, break_long_words=False, break_on_hyphens=False)]


def ttl_seconds(text: str) -> int:
    """A duration (``1h``, ``90s``, ``3600``) as the whole seconds SPIRE's TTLs take."""
    seconds = parse_duration(text)
    if seconds < 1 or seconds != int(seconds):
        raise ValueError(f"{text!r}: an SVID TTL is a whole number of seconds, at least 1s")
    return int(seconds)


def go_duration(seconds: int) -> str:
    """Seconds as a Go duration string (``1h``, ``1h30m``, ``90s`` -> ``1m30s``)."""
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    text = "".join(f"{n}{unit}" for n, unit in ((hours, "h"), (minutes, "m"), (secs, "s")) if n)
    return text or "0s"


DEFAULT_AGENT = ServiceAccount("spiffe-delegate", "spiffe-delegate")


@dataclass(frozen=True)
class EntriesSettings:
    """What ``spiffe-delegate entries`` registers, and for which kind of SPIRE agent parent."""

    trust_domain: str = "example.org"
    agent: ServiceAccount = DEFAULT_AGENT
    registry_proxy: ServiceAccount = ServiceAccount("zarf", "registry-proxy")
    registry: ServiceAccount = ServiceAccount("zarf", "zarf-registry")
    ci: ServiceAccount = ServiceAccount("ci", "image-publisher")
    # alias: a node alias entry (written too) for every SPIRE agent of the cluster, and the
    # workloads parented to it; parent-id: the workloads parented to --parent-id, which
    # must already exist; k8s_psat: the workloads once per node, parented to each node's agent.
    node_selector_style: str = "alias"
    parent_id: str | None = None
    cluster: str = "example-cluster"
    spire_agent: ServiceAccount = ServiceAccount("spire", "spire-agent")
    node_uids: tuple[str, ...] = ()
    svid_ttl: int = 3600
    class_name: str = ""
    pod_labels: tuple[tuple[str, str, str], ...] = ()
    spire_server_command: str = "spire-server"

    @property
    def server_id(self) -> str:
        return f"spiffe://{self.trust_domain}/spire/server"

    @property
    def alias_id(self) -> str:
        """The node alias (or the given parent): by default the SPIRE agents' own account."""
        return self.parent_id or self.spire_agent.spiffe_id(self.trust_domain)

    def node_agent_id(self, node_uid: str) -> str:
        """The SPIFFE ID k8s_psat gives the SPIRE agent of one node."""
        return f"spiffe://{self.trust_domain}/spire/agent/k8s_psat/{self.cluster}/{node_uid}"

    def workloads(self) -> tuple[tuple[str, str, ServiceAccount], ...]:
        """(key, what it is, service account) for every workload entry, agent first."""
        return (
            ("agent", "spiffe-delegate itself, the SPIRE agent's authorized delegate",
             self.agent),
            ("registry-proxy", "the node registry proxy (Envoy), served by spiffe-delegate",
             self.registry_proxy),
            ("registry", "the in-cluster registry (its Envoy terminates mTLS)", self.registry),
            ("ci", "CI, which pushes images to the registry", self.ci),
        )

    def validate(self) -> None:
        """Raises ConfigError naming the flag when the settings cannot make usable entries."""
        if not _TRUST_DOMAIN.fullmatch(self.trust_domain):
            raise ConfigError(f"--trust-domain {self.trust_domain!r} is not a trust domain "
                              "name", "e.g. example.org")
        if self.node_selector_style not in NODE_SELECTOR_STYLES:
            raise ConfigError(f"--node-selector-style {self.node_selector_style!r} is not one "
                              f"of {', '.join(NODE_SELECTOR_STYLES)}")
        if self.node_selector_style == "k8s_psat":
            if not self.node_uids:
                raise ConfigError("--node-selector-style k8s_psat needs --node-uid",
                                  "give every node's UID (kubectl get nodes -o "
                                  "custom-columns=UID:.metadata.uid), or use alias")
            if self.parent_id:
                raise ConfigError("--parent-id does not go with --node-selector-style k8s_psat",
                                  "k8s_psat parents are spiffe://<td>/spire/agent/k8s_psat/"
                                  "<cluster>/<node uid>")
        elif self.node_uids:
            raise ConfigError(f"--node-uid goes only with --node-selector-style k8s_psat, not "
                              f"{self.node_selector_style}")
        for uid in self.node_uids:
            _checked_flag("--node-uid", partial(path_segment, uid))
        _checked_flag("--cluster", partial(path_segment, self.cluster))
        ids: dict[str, str] = {}
        if self.node_selector_style != "k8s_psat":
            _checked_flag("--parent-id", partial(self._member, self.alias_id))
            if self.alias_id == self.server_id or self.alias_id.startswith(self.server_id + "/"):
                raise ConfigError(f"--parent-id {self.alias_id} is the SPIRE server's own ID",
                                  "give the node alias or the SPIRE agent's ID")
            ids[self.alias_id] = "the node alias"
        if self.svid_ttl < 1:
            raise ConfigError("--svid-ttl must be at least 1s")
        for key, _, account in self.workloads():
            spiffe_id = account.spiffe_id(self.trust_domain)
            if spiffe_id in ids:
                raise ConfigError(f"--{key} {account}: {spiffe_id} is also {ids[spiffe_id]}",
                                  "give every workload its own service account")
            ids[spiffe_id] = f"--{key}'s"
        if not self.spire_server_command.strip():
            raise ConfigError("--spire-server-command is empty")
        _checked_flag("--spire-server-command", partial(shlex.split, self.spire_server_command))

    def _member(self, text: str) -> str:
        from spiffe.spiffe_id.spiffe_id import SpiffeId, SpiffeIdError

        try:
            parsed = SpiffeId(text)
        except SpiffeIdError as exc:
            raise ValueError(f"{text!r} is not a SPIFFE ID: {exc}") from None
        if str(parsed.trust_domain) != self.trust_domain or not parsed.path:
            raise ValueError(f"{text!r} is not a SPIFFE ID with a path in the trust domain "
                             f"{self.trust_domain}")
        return text


def _checked_flag(flag: str, check: Callable[[], object]) -> None:
    try:
        check()
    except ValueError as exc:
        raise ConfigError(f"{flag}: {exc}") from None


@dataclass(frozen=True)
class RegistrationEntry:
    """One entry as spire-server stores it. A node entry is one whose parent is the server."""

    key: str  # "node-alias" or a workload key: agent, registry-proxy, registry, ci
    title: str
    spiffe_id: str
    parent_id: str
    selectors: tuple[str, ...]
    x509_svid_ttl: int = 0  # 0: not set (node entries: an agent's SVID lifetime is agent_ttl)
    node: bool = False
    node_uid: str = ""  # k8s_psat style: the node whose agent is the parent

    def data(self) -> dict[str, Any]:
        """The entry in ``entry create -data`` JSON (RegistrationEntry's proto field names)."""
        body: dict[str, Any] = {
            "spiffe_id": self.spiffe_id,
            "parent_id": self.parent_id,
            "selectors": [dict(zip(("type", "value"), s.split(":", 1), strict=True))
                          for s in self.selectors],
        }
        if self.x509_svid_ttl:
            body["x509_svid_ttl"] = self.x509_svid_ttl
        return body

    def command(self, spire_server: str) -> str:
        """One ``spire-server entry create`` command line."""
        args = ["entry", "create"]
        if self.node:
            args += ["-node", "-spiffeID", self.spiffe_id]  # -node makes the server the parent
        else:
            args += ["-parentID", self.parent_id, "-spiffeID", self.spiffe_id]
        for selector in self.selectors:
            args += ["-selector", selector]
        if self.x509_svid_ttl:
            args += ["-x509SVIDTTL", str(self.x509_svid_ttl)]
        return f"{spire_server.strip()} {shlex.join(args)}"

    def static_entry_spec(self, class_name: str) -> dict[str, Any]:
        """The ``spec`` of a ClusterStaticEntry that declares this entry."""
        spec: dict[str, Any] = {}
        if class_name:
            spec["className"] = class_name
        spec.update(spiffeID=self.spiffe_id, parentID=self.parent_id,
                    selectors=list(self.selectors))
        if self.x509_svid_ttl:
            spec["x509SVIDTTL"] = go_duration(self.x509_svid_ttl)
        return spec


def build_entries(settings: EntriesSettings) -> tuple[RegistrationEntry, ...]:
    """The entries, node alias first (alias style), then each workload (per node: k8s_psat)."""
    settings.validate()
    td = settings.trust_domain
    entries: list[RegistrationEntry] = []
    if settings.node_selector_style == "alias":
        agent_sa = settings.spire_agent
        entries.append(RegistrationEntry(
            key="node-alias",
            title=f"node alias: every SPIRE agent of cluster {settings.cluster} attested by "
                  f"k8s_psat as {agent_sa}\n# (have one already? use --node-selector-style "
                  "parent-id --parent-id <its SPIFFE ID>)",
            spiffe_id=settings.alias_id, parent_id=settings.server_id, node=True,
            selectors=(f"k8s_psat:cluster:{settings.cluster}",
                       f"k8s_psat:agent_ns:{agent_sa.namespace}",
                       f"k8s_psat:agent_sa:{agent_sa.name}")))
    if settings.node_selector_style == "k8s_psat":
        parents = [(settings.node_agent_id(uid), uid) for uid in settings.node_uids]
    else:
        parents = [(settings.alias_id, "")]
    for key, title, account in settings.workloads():
        for parent_id, node_uid in parents:
            entries.append(RegistrationEntry(
                key=key, title=title + (f" on node {node_uid}" if node_uid else ""),
                spiffe_id=account.spiffe_id(td), parent_id=parent_id,
                selectors=account.selectors(), x509_svid_ttl=settings.svid_ttl,
                node_uid=node_uid))
    return tuple(entries)


def _delegate_hint(settings: EntriesSettings) -> list[str]:
    agent_id = settings.agent.spiffe_id(settings.trust_domain)
    return [
        *comment_lines("spiffe-delegate's SPIFFE ID must also be listed in the SPIRE agent's "
                       "authorized_delegates:"),
        f"#   {agent_id}",
        "# which this prints as agent.conf HCL:",
        f"#   spiffe-delegate spire-config --trust-domain {settings.trust_domain} "
        f"--delegate-id {agent_id}",
    ]


def render_commands(settings: EntriesSettings) -> str:
    """A shell script: one ``spire-server entry create`` per entry, each after a comment."""
    lines = [
        *comment_lines(f"Registration entries for spiffe-delegate and the registry chain "
                       f"(trust domain {settings.trust_domain}), one `spire-server entry "
                       "create` each: run them where spire-server reaches the server's "
                       "socket."),
        *_delegate_hint(settings),
    ]
    for entry in build_entries(settings):
        lines += [f"# {entry.title}", entry.command(settings.spire_server_command)]
    return "\n".join(lines) + "\n"


def render_data(settings: EntriesSettings) -> str:
    """``{"entries": [...]}`` for ``spire-server entry create -data`` and dev-spire."""
    document = {"entries": [entry.data() for entry in build_entries(settings)]}
    return json.dumps(document, indent=2) + "\n"


def _resource(kind: str, name: str, spec: Mapping[str, Any]) -> dict[str, Any]:
    return {"apiVersion": CRD_API_VERSION, "kind": kind, "metadata": {"name": name},
            "spec": dict(spec)}


def _cluster_spiffe_id_spec(settings: EntriesSettings, key: str,
                            account: ServiceAccount) -> dict[str, Any]:
    spec: dict[str, Any] = {}
    if settings.class_name:
        spec["className"] = settings.class_name
    # A literal ID rather than {{ .TrustDomain }}/{{ .PodSpec.ServiceAccountName }}: it must
    # be exactly the ID in the Envoy RBAC rules and in authorized_delegates.
    spec["spiffeIDTemplate"] = account.spiffe_id(settings.trust_domain)
    spec["namespaceSelector"] = {
        "matchLabels": {"kubernetes.io/metadata.name": account.namespace}}
    labels = {k: v for workload, k, v in settings.pod_labels if workload == key}
    if labels:
        spec["podSelector"] = {"matchLabels": labels}
    # Pods have no service-account label, so the entry itself carries k8s:sa: another pod
    # of the namespace gets an entry it can never match, never this ID.
    spec["workloadSelectorTemplates"] = list(account.selectors())
    spec["ttl"] = go_duration(settings.svid_ttl)
    return spec


def render_crd(settings: EntriesSettings) -> str:
    """SPIRE Controller Manager resources: ClusterStaticEntry for the node alias and for
    spiffe-delegate itself, ClusterSPIFFEID for the pods it serves and the registry's peers."""
    entries = build_entries(settings)
    documents: list[tuple[list[str], dict[str, Any]]] = []
    for entry in (e for e in entries if e.key in ("node-alias", "agent")):
        name = f"spiffe-delegate-{entry.key}"
        if entry.node_uid:
            name += "-" + re.sub(r"[^a-z0-9.-]", "-", entry.node_uid.lower())
        comment = [f"# {entry.title}"]
        if entry.key == "agent":
            comment += comment_lines(
                "A static entry (k8s:ns + k8s:sa, no pod UID): each new pod of the agent is "
                "a delegate as soon as it starts, without waiting for the controller to write "
                "a per-pod entry.")
        documents.append((comment, _resource("ClusterStaticEntry", name,
                                             entry.static_entry_spec(settings.class_name))))
    for key, title, account in settings.workloads():
        if key == "agent":
            continue
        documents.append(([f"# {title}"], _resource(
            "ClusterSPIFFEID", f"spiffe-delegate-{key}",
            _cluster_spiffe_id_spec(settings, key, account))))
    header = [
        *comment_lines(f"SPIRE Controller Manager resources for spiffe-delegate and the "
                       f"registry chain (trust domain {settings.trust_domain}). The controller "
                       "parents ClusterSPIFFEID entries to each node's k8s_psat agent ID and "
                       "adds k8s:pod-uid; unless its entryIDPrefix is set, it deletes every "
                       "entry on the server that no resource declares."),
        *_delegate_hint(settings),
    ]
    import yaml  # only here: `run` imports this module (the CLI's options) and never this

    parts = ["\n".join(header)]
    for comment, resource in documents:
        body = yaml.safe_dump(resource, sort_keys=False, default_flow_style=False)
        parts.append("---\n" + "\n".join(comment) + "\n" + body.rstrip("\n"))
    return "\n".join(parts) + "\n"


def render(settings: EntriesSettings, output_format: str) -> str:
    """The entries in ``commands``, ``data`` or ``crd`` form."""
    if output_format == "commands":
        return render_commands(settings)
    if output_format == "data":
        return render_data(settings)
    if output_format == "crd":
        return render_crd(settings)
    raise ConfigError(f"--format {output_format!r} is not one of {', '.join(FORMATS)}")
