"""The spiffe-delegate command line: run, dev-spire, demo, entries, spire-config, doctor,
status, version."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import sys
from collections.abc import Callable, Coroutine, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

from agent.admin import entries as admin_entries
from agent.admin import spire_config as admin_spire_config
from agent.cliopts import OneLineParser, Option, add_options, repeatable_values
from agent.config import (
    DEFAULT_SDS_SOCKET,
    DEFAULT_SPIRE_ADMIN_SOCKET,
    METRICS_TLS_MODES,
    AgentSettings,
    HostPort,
    MetricsTlsSettings,
    ReconnectSettings,
    byte_size,
    listen_address,
    positive_duration,
)
from agent.coredump import forbid_core_dumps
from agent.errors import SpiffeDelegateError
from agent.logs import configure_logging
from agent.malloc import limit_malloc_arenas
from agent.sds.limits import SdsLimits
from agent.sds.names import SdsNames

if TYPE_CHECKING:
    from agent.devspire.server import DevSpireSettings

ENV_PREFIX = "SPIFFE_DELEGATE_"
DEV_SPIRE_ENV_PREFIX = "SPIFFE_DELEGATE_DEV_SPIRE_"
DEMO_ENV_PREFIX = "SPIFFE_DELEGATE_DEMO_"
ENTRIES_ENV_PREFIX = "SPIFFE_DELEGATE_ENTRIES_"
SPIRE_CONFIG_ENV_PREFIX = "SPIFFE_DELEGATE_SPIRE_CONFIG_"
LOG_LEVELS = ("debug", "info", "warning", "error")


def _octal_mode(text: str) -> int:
    try:
        mode = int(text, 8)
    except ValueError:
        raise ValueError(f"{text!r} is not an octal file mode such as 0660") from None
    if not 0 <= mode <= 0o777:
        raise ValueError(f"{text!r} is not a file mode between 0000 and 0777")
    return mode


def _trust_domain(text: str) -> str:
    name = text.removeprefix("spiffe://")
    if not name or "/" in name or name.lower() != name:
        raise ValueError(f"{text!r} is not a trust domain name such as example.org")
    return name


def _spiffe_id(text: str) -> str:
    if not text.startswith("spiffe://") or len(text.removeprefix("spiffe://")) == 0:
        raise ValueError(f"{text!r} is not a SPIFFE ID such as spiffe://example.org/agent")
    return text


def _workload_spiffe_id(text: str) -> str:
    """A SPIFFE ID with a path (a workload's, not a trust domain's)."""
    from spiffe.spiffe_id.spiffe_id import SpiffeId, SpiffeIdError

    try:
        parsed = SpiffeId(text)
    except SpiffeIdError as exc:
        raise ValueError(f"{text!r} is not a SPIFFE ID: {exc}") from None
    if not parsed.path:
        raise ValueError(f"{text!r} names a trust domain, not a workload; "
                         "e.g. spiffe://example.org/ns/zarf/sa/registry-proxy")
    return text


def _boolean(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"{text!r} is not true or false")


def _group(text: str) -> int:
    from agent.sds.server import resolve_group

    try:
        return resolve_group(text)
    except SpiffeDelegateError as exc:
        raise ValueError(str(exc)) from None


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise ValueError(f"{text!r} is not a whole number of at least 1")
    return value


def _resource_name(text: str) -> str:
    if not text or text.strip() != text:
        raise ValueError(f"{text!r} is not a usable SDS resource name")
    return text


LOGGING_OPTIONS = (
    Option("--log-format", "log line format", default="text", choices=("text", "json")),
    Option("--log-level", "least severe level logged", default="info", choices=LOG_LEVELS,
           convert=str.lower),
)

RUN_OPTIONS = (
    Option("--spire-admin-socket", "the SPIRE agent's admin socket (admin_socket_path)",
           convert=Path, default=Path(DEFAULT_SPIRE_ADMIN_SOCKET), metavar="PATH"),
    Option("--sds-socket", "Unix socket on which Envoy's SDS is served", convert=Path,
           default=Path(DEFAULT_SDS_SOCKET), metavar="PATH"),
    Option("--sds-socket-mode", "file mode of the SDS socket (answers depend on the "
           "attested caller, so any local user may connect by default)",
           convert=_octal_mode, default=0o666, shown="0666", metavar="MODE"),
    Option("--sds-socket-group", "group owning the SDS socket (name or gid)", convert=_group,
           metavar="GROUP"),
    Option("--sds-default-svid-name", "SDS name of the caller's default SVID "
           "(SPIRE's default_svid_name)", convert=_resource_name, default="default",
           metavar="NAME"),
    Option("--sds-default-bundle-name", "SDS name of the caller's trust domain bundle "
           "(SPIRE's default_bundle_name)", convert=_resource_name, default="ROOTCA",
           metavar="NAME"),
    Option("--sds-default-all-bundles-name", "SDS name of all bundles, federated included "
           "(SPIRE's default_all_bundles_name)", convert=_resource_name, default="ALL",
           metavar="NAME"),
    Option("--sds-disable-spiffe-cert-validation", "serve bundles as plain trusted_ca "
           "instead of Envoy's SPIFFE validator (SPIRE's disable_spiffe_cert_validation)",
           convert=_boolean, default=False, shown="false", metavar="BOOL"),
    Option("--sds-max-name-bytes", "longest SDS resource name accepted, in bytes (SPIFFE "
           "IDs are at most 2048)", convert=_positive_int, default=2048, metavar="N"),
    Option("--sds-max-names", "most SDS resource names in one request (and subscribed at "
           "once on a delta stream)", convert=_positive_int, default=1024, metavar="N"),
    Option("--sds-max-connections", "most connections open on the SDS socket at once",
           convert=_positive_int, default=4096, metavar="N"),
    Option("--sds-max-streams-per-connection", "most SDS calls open at once on one "
           "connection (more wait in the client)", convert=_positive_int, default=1024,
           metavar="N"),
    Option("--sds-handshake-timeout", "a new SDS connection that has not sent the HTTP/2 "
           "preface within this long is closed", convert=positive_duration, default=10.0,
           shown="10s", metavar="DUR"),
    Option("--sds-idle-timeout", "an SDS connection with no call open this long is closed",
           convert=positive_duration, default=300.0, shown="5m", metavar="DUR"),
    Option("--trusted-proxy", "SPIFFE ID whose holders may ask for other pods' SVIDs as "
           "workload:<pod uid> (repeatable)", convert=_workload_spiffe_id, repeatable=True,
           metavar="SPIFFEID"),
    Option("--cache-key", "one SPIRE subscription per pod (workload) or per SPIFFE identity "
           "shared by pods (identity)", default="workload", choices=("workload", "identity"),
           convert=str.lower, metavar="KEY"),
    Option("--shutdown-grace", "on SIGTERM: how long streams may take to close before exit",
           convert=positive_duration, default=5.0, shown="5s", metavar="DUR"),
    Option("--health-address", "where /healthz and /readyz are served (off: not served; "
           "port 0: any free port)", convert=listen_address,
           default=HostPort("127.0.0.1", 8086), metavar="HOST:PORT"),
    Option("--ready-spire-timeout", "/readyz fails once SPIRE has been unreachable this long "
           "(cached SVIDs are still served)", convert=positive_duration, default=60.0,
           shown="60s", metavar="DUR"),
    Option("--metrics-address", "where Prometheus /metrics is served (off: not served; "
           "port 0: any free port)", convert=listen_address,
           default=HostPort("127.0.0.1", 9086), metavar="HOST:PORT"),
    Option("--metrics-tls-mode", "none: plain HTTP; spiffe: mutual TLS with the agent's own "
           "SVID, scrapers' SVIDs listed in --metrics-allowed-id; files: mutual TLS from "
           "--metrics-cert-file, --metrics-key-file and --metrics-client-ca-file",
           default="none", choices=METRICS_TLS_MODES, convert=str.lower, metavar="MODE"),
    Option("--metrics-allowed-id", "SPIFFE ID of a client allowed to scrape /metrics "
           "(repeatable; required with --metrics-tls-mode spiffe)",
           convert=_workload_spiffe_id, repeatable=True, metavar="SPIFFEID"),
    Option("--metrics-cert-file", "PEM certificate chain /metrics presents (files mode; "
           "cert-manager's tls.crt)", convert=Path, metavar="FILE"),
    Option("--metrics-key-file", "PEM private key of --metrics-cert-file (files mode; "
           "cert-manager's tls.key)", convert=Path, metavar="FILE"),
    Option("--metrics-client-ca-file", "PEM CA certificates scrapers' client certificates "
           "must chain to (files mode; cert-manager's ca.crt)", convert=Path, metavar="FILE"),
    Option("--metrics-tls-reload-interval", "how often the files-mode TLS files are checked "
           "for changes", convert=positive_duration, default=10.0, shown="10s",
           metavar="DUR"),
    Option("--trust-domain", "the local trust domain, whose bundle every caller's state "
           "carries", convert=_trust_domain, metavar="TD"),
    Option("--reconnect-initial", "first back-off delay after losing SPIRE",
           convert=positive_duration, default=0.1, shown="100ms", metavar="DUR"),
    Option("--reconnect-max", "longest back-off delay", convert=positive_duration,
           default=30.0, shown="30s", metavar="DUR"),
    Option("--reconnect-reset-after", "a stream healthy this long resets the back-off",
           convert=positive_duration, default=30.0, shown="30s", metavar="DUR"),
    Option("--spire-slow-answer-warning", "warn (once per episode) when a SPIRE stream has "
           "not answered for this long", convert=positive_duration, default=30.0,
           shown="30s", metavar="DUR"),
    Option("--spire-max-message-size", "largest gRPC message accepted from SPIRE",
           convert=byte_size, default=64 * 1024 * 1024, shown="64MiB", metavar="BYTES"),
    *LOGGING_OPTIONS,
)

DEV_SPIRE_OPTIONS = (
    Option("--socket", "Unix socket to serve the Delegated Identity API on", convert=Path,
           required=True, metavar="PATH"),
    Option("--trust-domain", "trust domain of the CA", convert=_trust_domain,
           default="example.org", metavar="TD"),
    Option("--entries", "registration entries, in spire-server entry create -data JSON",
           convert=Path, required=True, metavar="FILE"),
    Option("--pods", "pods file standing in for the kubelet (namespaces, accounts, labels)",
           convert=Path, metavar="FILE"),
    Option("--authorized-delegate", "SPIFFE ID allowed to use the API (repeatable)",
           convert=_spiffe_id, repeatable=True, metavar="SPIFFEID"),
    Option("--svid-ttl", "X.509-SVID lifetime (rotated at half)", convert=positive_duration,
           default=3600.0, shown="1h", metavar="DUR"),
    Option("--jwt-svid-ttl", "JWT-SVID lifetime", convert=positive_duration,
           default=300.0, shown="5m", metavar="DUR"),
    Option("--ca-ttl", "CA lifetime (rotated with overlapping bundles)",
           convert=positive_duration, default=86400.0, shown="24h", metavar="DUR"),
    Option("--faults", "fault-injection file for tests (JSON, reloaded on change)",
           convert=Path, metavar="FILE"),
    Option("--data-dir", "directory keeping the CA and JWT keys across restarts, as SPIRE "
           "server's data_dir (unset: in memory only)", convert=Path, metavar="DIR"),
    Option("--reload-interval", "how often entry, pod and fault files are checked",
           convert=positive_duration, default=1.0, shown="1s", metavar="DUR"),
    Option("--socket-mode", "file mode of the socket", convert=_octal_mode,
           default=0o770, shown="0770", metavar="MODE"),
    Option("--proc-root", "where /proc is (tests point this at a synthetic tree)",
           convert=Path, default=Path("/proc"), metavar="PATH"),
    *LOGGING_OPTIONS,
)


DEMO_OPTIONS = (
    Option("--duration", "stop after this long and exit 0 only if rotations reached every "
           "Envoy and no pull failed (non-interactive; for CI)", convert=positive_duration,
           metavar="DUR"),
    Option("--svid-ttl", "X.509-SVID lifetime dev-spire issues (rotated at half)",
           convert=positive_duration, default=6.0, shown="6s", metavar="DUR"),
    Option("--family", "loopback every hop uses: ipv4 (127.0.0.1) or ipv6 (::1); the node "
           "proxy listens on both", default="ipv4", choices=("ipv4", "ipv6")),
    Option("--attestation", "how Envoys are attested: pods (root: real pod cgroups, "
           "k8s:pod-uid), unix (uid + binary path), auto (pods when possible)",
           default="auto", choices=("auto", "pods", "unix")),
    Option("--workdir", "directory for every file of the demo (default: a new temporary "
           "directory, removed at the end)", convert=Path, metavar="DIR"),
    *LOGGING_OPTIONS,
)


_DEFAULT_ENTRIES = admin_entries.EntriesSettings()
ENTRIES_OPTIONS = (
    Option("--trust-domain", "trust domain of every SPIFFE ID", convert=_trust_domain,
           default=_DEFAULT_ENTRIES.trust_domain, metavar="TD"),
    *(Option(f"--{key}", f"NAMESPACE/SERVICEACCOUNT of {title}",
             convert=admin_entries.service_account, default=account, shown=str(account),
             metavar="NS/SA")
      for key, title, account in _DEFAULT_ENTRIES.workloads()),
    Option("--node-selector-style", "parents of the workload entries: alias (a node alias "
           "entry for every SPIRE agent of --cluster, written too), parent-id (--parent-id, "
           "which exists already), k8s_psat (each --node-uid's agent, one set per node)",
           default=_DEFAULT_ENTRIES.node_selector_style,
           choices=admin_entries.NODE_SELECTOR_STYLES, metavar="STYLE"),
    Option("--parent-id", "the node alias's (or the existing parent's) SPIFFE ID (default: "
           "spiffe://<td>/ns/<ns>/sa/<sa> of --spire-agent)", convert=_workload_spiffe_id,
           metavar="SPIFFEID"),
    Option("--cluster", "cluster name the SPIRE agents' k8s_psat attestor is configured with",
           convert=admin_entries.path_segment, default=_DEFAULT_ENTRIES.cluster,
           metavar="NAME"),
    Option("--spire-agent", "NAMESPACE/SERVICEACCOUNT the SPIRE agents run as (the node "
           "alias's k8s_psat selectors)", convert=admin_entries.service_account,
           default=_DEFAULT_ENTRIES.spire_agent, shown=str(_DEFAULT_ENTRIES.spire_agent),
           metavar="NS/SA"),
    Option("--node-uid", "with k8s_psat: a node's UID (repeatable)",
           convert=admin_entries.path_segment, repeatable=True, metavar="UID"),
    Option("--svid-ttl", "X.509-SVID TTL of the workload entries (whole seconds)",
           convert=admin_entries.ttl_seconds, default=_DEFAULT_ENTRIES.svid_ttl, shown="1h",
           metavar="DUR"),
    Option("--class-name", "crd: className of the controller manager meant to act on them",
           metavar="NAME"),
    Option("--pod-label", "crd: a podSelector label of a ClusterSPIFFEID, as "
           "WORKLOAD:KEY=VALUE with WORKLOAD registry-proxy, registry or ci (repeatable)",
           convert=admin_entries.pod_label, repeatable=True, metavar="W:K=V"),
    Option("--spire-server-command", "commands: how spire-server is run, e.g. 'kubectl exec "
           "-n spire spire-server-0 -- spire-server'",
           default=_DEFAULT_ENTRIES.spire_server_command, metavar="CMD"),
    Option("--format", "commands (spire-server entry create), data (entry create -data "
           "JSON, also dev-spire's --entries) or crd (SPIRE Controller Manager YAML)",
           default="commands", choices=admin_entries.FORMATS, metavar="FORMAT"),
    *LOGGING_OPTIONS,
)

SPIRE_CONFIG_OPTIONS = (
    Option("--admin-socket-path", "the SPIRE agent's admin_socket_path",
           default=DEFAULT_SPIRE_ADMIN_SOCKET, metavar="PATH"),
    Option("--delegate-id", "SPIFFE ID to list in authorized_delegates (repeatable; default: "
           "spiffe://<td>/ns/spiffe-delegate/sa/spiffe-delegate)", convert=_spiffe_id,
           repeatable=True, metavar="SPIFFEID"),
    Option("--trust-domain", "the SPIRE agent's trust domain", convert=_trust_domain,
           default="example.org", metavar="TD"),
    Option("--workload-api-socket", "the agent's socket_path, to check that the admin socket "
           "is not in its directory", metavar="PATH"),
    Option("--format", "hcl (agent.conf) or helm (values for the spire Helm chart)",
           default="hcl", choices=admin_spire_config.FORMATS, metavar="FORMAT"),
    *LOGGING_OPTIONS,
)


def _run_option(flag: str) -> Option:
    """An option of ``run`` that an admin command shares (same default and variable)."""
    return next(option for option in RUN_OPTIONS if option.flag == flag)


DOCTOR_OPTIONS = (
    _run_option("--spire-admin-socket"),
    _run_option("--sds-socket"),
    Option("--proc-root", "where the host's /proc is (tests point this at a synthetic tree)",
           convert=Path, default=Path("/proc"), metavar="PATH"),
    Option("--timeout", "how long SPIRE may take to answer", convert=positive_duration,
           default=5.0, shown="5s", metavar="DUR"),
    Option("--max-clock-skew", "how far in this clock's future an SVID's validity may start",
           convert=positive_duration, default=30.0, shown="30s", metavar="DUR"),
    *LOGGING_OPTIONS,
)

STATUS_OPTIONS = (
    Option("--health-address", "the running agent's --health-address (it serves /status "
           "there)", convert=listen_address, default=HostPort("127.0.0.1", 8086),
           metavar="HOST:PORT"),
    Option("--timeout", "how long the agent may take to answer", convert=positive_duration,
           default=5.0, shown="5s", metavar="DUR"),
    *LOGGING_OPTIONS,
)


def _package_version() -> str:
    from importlib.metadata import PackageNotFoundError, version  # slow; `version` only

    try:
        return version("spiffe-delegate")
    except PackageNotFoundError:
        return "unknown"


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="spiffe-delegate",
        description="Gives a node-local proxy its SPIFFE identity from SPIRE's Delegated "
        "Identity API, served to Envoy over SDS.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND",
                                     parser_class=OneLineParser)
    run = commands.add_parser("run", help="run the node agent",
                              description="Run the node agent.")
    add_options(run, RUN_OPTIONS, ENV_PREFIX)
    dev = commands.add_parser(
        "dev-spire", help="run the SPIRE-compatible development server",
        description="A SPIRE-agent-compatible Delegated Identity API server for development "
        "and tests. Production uses SPIRE.")
    add_options(dev, DEV_SPIRE_OPTIONS, DEV_SPIRE_ENV_PREFIX)
    demo = commands.add_parser(
        "demo", help="run the registry chain demo (dev-spire, agent, Envoys, registry)",
        description="Runs dev-spire, the agent, a real registry and three Envoys on "
        "loopback, pushes an image as CI and pulls it through the node proxy while SVIDs "
        "rotate. Ctrl-C stops it and removes everything it made.")
    add_options(demo, DEMO_OPTIONS, DEMO_ENV_PREFIX)
    entries = commands.add_parser(
        "entries", help="print the SPIRE registration entries for the agent and the registry",
        description="Prints the registration entries of spiffe-delegate, the node registry "
        "proxy, the registry and CI: as spire-server entry create commands, as -data JSON, "
        "or as SPIRE Controller Manager resources.")
    add_options(entries, ENTRIES_OPTIONS, ENTRIES_ENV_PREFIX)
    spire_config = commands.add_parser(
        "spire-config", help="print the SPIRE agent settings spiffe-delegate needs",
        description="Prints the SPIRE agent's admin_socket_path and authorized_delegates, as "
        "agent.conf HCL or as values for the spire Helm chart.")
    add_options(spire_config, SPIRE_CONFIG_OPTIONS, SPIRE_CONFIG_ENV_PREFIX)
    doctor = commands.add_parser(
        "doctor", help="check this node's set-up for the agent (SPIRE, /proc, SDS socket)",
        description="Checks what the agent needs here: the SPIRE admin socket, that SPIRE "
        "serves this process as an authorized delegate, the host's PID namespace, pod "
        "cgroups, the SDS socket's directory and the clock. Prints PASS, WARN, FAIL or SKIP "
        "and what to do for each; exits 1 if any check failed.")
    add_options(doctor, DOCTOR_OPTIONS, ENV_PREFIX)
    doctor.add_argument("--json", action="store_true", help="print the results as JSON")
    status = commands.add_parser(
        "status", help="show what the running agent holds (identities, SDS streams, SPIRE)",
        description="Asks the running agent (GET /status on its health address) for its "
        "cached identities, SDS streams, SPIRE connection and recent errors, and prints "
        "them. Never shows key material.")
    add_options(status, STATUS_OPTIONS, ENV_PREFIX)
    status.add_argument("--json", action="store_true", help="print the agent's JSON as is")
    commands.add_parser("version", help="print the version")
    return parser


def sds_names(args: argparse.Namespace) -> SdsNames:
    """SPIRE's ``sds {}`` settings from the flags; ConfigError when they clash."""
    return SdsNames(default_svid_name=args.sds_default_svid_name,
                    default_bundle_name=args.sds_default_bundle_name,
                    default_all_bundles_name=args.sds_default_all_bundles_name,
                    disable_spiffe_cert_validation=args.sds_disable_spiffe_cert_validation)


def agent_settings(args: argparse.Namespace) -> AgentSettings:
    if args.reconnect_initial > args.reconnect_max:
        raise SpiffeDelegateError(
            "--reconnect-initial is larger than --reconnect-max",
            "make the initial back-off no longer than the maximum")
    metrics_tls = MetricsTlsSettings(
        mode=args.metrics_tls_mode,
        allowed_ids=tuple(dict.fromkeys(repeatable_values(args, "metrics_allowed_id"))),
        cert_file=args.metrics_cert_file, key_file=args.metrics_key_file,
        client_ca_file=args.metrics_client_ca_file,
        reload_interval=args.metrics_tls_reload_interval)
    metrics_tls.validate(args.trust_domain)
    return AgentSettings(
        spire_admin_socket=args.spire_admin_socket,
        sds_socket=args.sds_socket,
        sds_socket_mode=args.sds_socket_mode,
        sds_socket_group=args.sds_socket_group,
        sds_names=sds_names(args),
        sds_limits=SdsLimits(
            max_name_bytes=args.sds_max_name_bytes, max_names=args.sds_max_names,
            max_connections=args.sds_max_connections,
            max_streams_per_connection=args.sds_max_streams_per_connection,
            handshake_timeout=args.sds_handshake_timeout,
            idle_timeout=args.sds_idle_timeout),
        cache_key=args.cache_key,
        trusted_proxies=tuple(dict.fromkeys(repeatable_values(args, "trusted_proxy"))),
        shutdown_grace=args.shutdown_grace,
        health_address=args.health_address,
        metrics_address=args.metrics_address,
        ready_spire_timeout=args.ready_spire_timeout,
        metrics_tls=metrics_tls,
        trust_domain=args.trust_domain,
        log_format=args.log_format,
        log_level=args.log_level,
        reconnect=ReconnectSettings(args.reconnect_initial, args.reconnect_max,
                                    args.reconnect_reset_after),
        spire_max_message_bytes=args.spire_max_message_size,
        spire_slow_answer_warning=args.spire_slow_answer_warning,
    )


Body = Callable[[asyncio.Event], Coroutine[Any, Any, int | None]]


async def _until_signalled(body: Body) -> int | None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        return await body(stop)
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(Exception):
                loop.remove_signal_handler(sig)


def dev_spire_settings(args: argparse.Namespace) -> DevSpireSettings:
    from agent.devspire.server import DevSpireSettings

    settings = DevSpireSettings(
        socket_path=str(args.socket),
        trust_domain=args.trust_domain,
        entries_path=str(args.entries),
        pods_path=str(args.pods) if args.pods else None,
        authorized_delegates=tuple(repeatable_values(args, "authorized_delegate")),
        svid_ttl=args.svid_ttl,
        ca_ttl=args.ca_ttl,
        jwt_svid_ttl=args.jwt_svid_ttl,
        proc_root=str(args.proc_root),
        reload_interval=args.reload_interval,
        faults_path=str(args.faults) if args.faults else None,
        socket_mode=args.socket_mode,
        data_dir=str(args.data_dir) if args.data_dir else None,
    )
    settings.validate()
    return settings


def entries_settings(args: argparse.Namespace) -> admin_entries.EntriesSettings:
    return admin_entries.EntriesSettings(
        trust_domain=args.trust_domain, agent=args.agent, registry_proxy=args.registry_proxy,
        registry=args.registry, ci=args.ci, node_selector_style=args.node_selector_style,
        parent_id=args.parent_id, cluster=args.cluster, spire_agent=args.spire_agent,
        node_uids=tuple(dict.fromkeys(repeatable_values(args, "node_uid"))),
        svid_ttl=args.svid_ttl, class_name=args.class_name or "",
        pod_labels=tuple(repeatable_values(args, "pod_label")),
        spire_server_command=args.spire_server_command)


def spire_config_settings(args: argparse.Namespace) -> admin_spire_config.SpireConfigSettings:
    return admin_spire_config.SpireConfigSettings(
        trust_domain=args.trust_domain, admin_socket_path=args.admin_socket_path,
        delegate_ids=tuple(repeatable_values(args, "delegate_id")),
        workload_api_socket=args.workload_api_socket)


def _printer(text: str) -> Body:
    async def body(stop: asyncio.Event) -> int:
        sys.stdout.write(text)
        return 0

    return body


def _command(args: argparse.Namespace) -> Body:
    """Checks the settings of the command and returns its body."""
    if args.command == "doctor":
        from agent.admin.doctor import DoctorOptions, doctor

        checks = DoctorOptions(spire_admin_socket=args.spire_admin_socket,
                               sds_socket=args.sds_socket, proc_root=args.proc_root,
                               timeout=args.timeout, max_clock_skew=args.max_clock_skew)
        return lambda stop: doctor(checks, as_json=args.json)
    if args.command == "status":
        from agent.admin.status import show_status

        return lambda stop: show_status(args.health_address, within=args.timeout,
                                        as_json=args.json)
    if args.command == "entries":
        return _printer(admin_entries.render(entries_settings(args), args.format))
    if args.command == "spire-config":
        return _printer(admin_spire_config.render(spire_config_settings(args), args.format))
    if args.command == "demo":
        from agent.demo.command import DemoOptions, run_demo

        options = DemoOptions(duration=args.duration, svid_ttl=args.svid_ttl,
                              ipv6=args.family == "ipv6",
                              attestation=args.attestation, workdir=args.workdir)
        return lambda stop: run_demo(options, stop)
    if args.command == "run":
        from agent.uds.listener import bind_unix_listener

        agent = agent_settings(args)
        # Bound before grpc and the agent's modules are imported: an Envoy reconnecting
        # meanwhile lands in the listen backlog instead of backing off again.
        try:
            listener = bind_unix_listener(agent.sds_socket, mode=agent.sds_socket_mode,
                                          group=agent.sds_socket_group)
        except SpiffeDelegateError:
            listener = None  # the agent's start-up reports it, as before (exit status 1)
        from agent.runner import run_agent

        return lambda stop: run_agent(agent, stop, listener)
    from agent.devspire.server import serve_dev_spire

    dev = dev_spire_settings(args)
    return lambda stop: serve_dev_spire(dev, stop)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "version":
        print(f"spiffe-delegate {_package_version()}")
        return 0
    try:
        body = _command(args)
    except SpiffeDelegateError as exc:
        print(f"spiffe-delegate {args.command}: error: {exc}", file=sys.stderr)
        return 2
    configure_logging(args.log_level, args.log_format)
    if args.command == "run":
        forbid_core_dumps()  # its memory holds SVID private keys
        limit_malloc_arenas()  # executor threads' arenas grew RSS under pod churn
    try:
        status = asyncio.run(_until_signalled(body))
    except SpiffeDelegateError as exc:
        logging.getLogger("spiffe_delegate").error("%s", exc)
        return 1
    except KeyboardInterrupt:
        return 130
    if args.command == "run":
        _exit_now(status or 0)
    return status or 0


def _exit_now(status: int) -> NoReturn:
    """Ends the process without the interpreter's finalization. ``run`` has drained, removed
    its socket and closed everything by now; tearing down gRPC's core and the modules after
    that took 0.3-1 s on a busy node, time that ``--shutdown-grace`` promises to stay within.
    (So ``main(["run", ...])`` never returns: call it only as the process's entry point.)"""
    logging.shutdown()
    with contextlib.suppress(OSError, ValueError):
        sys.stdout.flush()
        sys.stderr.flush()
    os._exit(status)

if __name__ == "__main__":
    sys.exit(main())
