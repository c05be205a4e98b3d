"""The SPIRE agent settings spiffe-delegate needs: HCL for agent.conf, or Helm chart values."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import PurePosixPath

from agent.admin.entries import DEFAULT_AGENT, comment_lines
from agent.config import DEFAULT_SPIRE_ADMIN_SOCKET
from agent.errors import ConfigError

FORMATS = ("hcl", "helm")
# Value names of the upstream chart, read from spiffe/helm-charts-hardened
# charts/spire/charts/spire-agent (values.yaml, templates/configmap.yaml and daemonset.yaml).
HELM_CHART = ("spiffe/helm-charts-hardened, chart spire, subchart spire-agent, as on its main "
              "branch in the 0.2x series (not pinned to a release)")
HELM_DEFAULT_HOST_BASE_PATH = "/run/spire/agent/sockets"
# Where that chart shares the admin socket's directory on the host, under sockets.hostBasePath.
HELM_ADMIN_SUBDIR = "csi.spiffe.io/admin"
HELM_ADMIN_SOCKET_NAME = "admin.sock"
_TRUST_DOMAIN = re.compile(r"[a-z0-9._-]+")
_SUN_PATH_MAX = 107  # sockaddr_un.sun_path holds 108 bytes, the last one NUL


@dataclass(frozen=True)
class SpireConfigSettings:
    """The admin socket and the delegates the SPIRE agent must authorize."""

    trust_domain: str = "example.org"
    admin_socket_path: str = DEFAULT_SPIRE_ADMIN_SOCKET
    delegate_ids: tuple[str, ...] = ()  # empty: spiffe-delegate's default ID
    workload_api_socket: str | None = None  # the agent's socket_path, to check SPIRE's rule

    def delegates(self) -> tuple[str, ...]:
        if self.delegate_ids:
            return tuple(dict.fromkeys(self.delegate_ids))
        return (DEFAULT_AGENT.spiffe_id(self.trust_domain),)

    @property
    def admin_dir(self) -> str:
        return str(PurePosixPath(self.admin_socket_path).parent)

    def validate(self) -> None:
        """Refuses what the SPIRE agent would refuse at start-up, naming the flag."""
        if not _TRUST_DOMAIN.fullmatch(self.trust_domain):
            raise ConfigError(f"--trust-domain {self.trust_domain!r} is not a trust domain "
                              "name", "e.g. example.org")
        _check_socket_path("--admin-socket-path", self.admin_socket_path)
        from spiffe.spiffe_id.spiffe_id import SpiffeId, SpiffeIdError

        for delegate in self.delegates():
            try:
                parsed = SpiffeId(delegate)
            except SpiffeIdError as exc:
                raise ConfigError(f"--delegate-id {delegate!r} is not a SPIFFE ID: {exc}"
                                  ) from None
            if str(parsed.trust_domain) != self.trust_domain or not parsed.path:
                # SPIRE: "error validating authorized delegate" (idutil.MemberFromString).
                raise ConfigError(
                    f"--delegate-id {delegate} is not a workload ID in the trust domain "
                    f"{self.trust_domain}", "the SPIRE agent authorizes only members of its "
                    "own trust domain and would refuse to start")
        if self.workload_api_socket is not None:
            _check_socket_path("--workload-api-socket", self.workload_api_socket)
            admin = PurePosixPath(self.admin_dir)
            workload = PurePosixPath(self.workload_api_socket).parent
            if admin == workload or workload in admin.parents:
                raise ConfigError(
                    f"--admin-socket-path {self.admin_socket_path} is in {workload}, the "
                    "Workload API socket's directory, or below it",
                    "SPIRE refuses that: admin socket cannot be in the same directory or a "
                    "subdirectory as that containing the Workload API socket")


def _check_socket_path(flag: str, path: str) -> None:
    if not path.startswith("/") or any(c in path for c in "\0\n\r"):
        raise ConfigError(f"{flag} {path!r} is not an absolute path")
    if path.endswith("/"):
        raise ConfigError(f"{flag} {path!r} names a directory, not a socket file")
    if len(path.encode()) > _SUN_PATH_MAX:
        raise ConfigError(f"{flag} {path!r} is longer than {_SUN_PATH_MAX} bytes",
                          "a Unix socket path must fit in sockaddr_un")


def _hcl_string(text: str) -> str:
    escaped = text.replace("\\", "\\\\").replace('"', '\\"')
    return '"' + escaped.replace("${", "$${").replace("%{", "%%{") + '"'


def render_hcl(settings: SpireConfigSettings) -> str:
    """The two settings for the SPIRE agent's ``agent {}`` block, with what they need."""
    settings.validate()
    path, directory = settings.admin_socket_path, settings.admin_dir
    lines = [
        *comment_lines(
            f"SPIRE agent settings for spiffe-delegate (trust domain {settings.trust_domain}): "
            "merge them into the agent {} block of the SPIRE agent's configuration. "
            "admin_socket_path turns on the admin API (the Delegated Identity API), which is "
            "off by default; every authorized delegate must be in the agent's trust_domain and "
            "have a registration entry (spiffe-delegate entries)."),
        *comment_lines(
            f"Share the admin socket's directory on the host: a hostPath volume (path "
            f"{directory}, type DirectoryOrCreate) mounted at that path in the SPIRE agent's "
            f"pod and in spiffe-delegate's, which then runs with --spire-admin-socket {path}. "
            "The directory must not be the Workload API socket's directory nor under it, and "
            "SPIRE makes the socket mode 0770: run spiffe-delegate as the agent's user or "
            "group (root in the upstream manifests)."),
        "agent {",
        f"  admin_socket_path    = {_hcl_string(path)}",
        "  authorized_delegates = [",
        *(f"    {_hcl_string(delegate)}," for delegate in settings.delegates()),
        "  ]",
        "}",
    ]
    return "\n".join(lines) + "\n"


def helm_host_base_path(admin_socket_path: str) -> str | None:
    """The chart's sockets.hostBasePath that puts the admin socket at this host path, if any."""
    suffix = f"/{HELM_ADMIN_SUBDIR}/{HELM_ADMIN_SOCKET_NAME}"
    if admin_socket_path.endswith(suffix) and len(admin_socket_path) > len(suffix):
        return admin_socket_path[: -len(suffix)]
    return None


def render_helm(settings: SpireConfigSettings) -> str:
    """A values.yaml fragment for the upstream spire chart's spire-agent subchart."""
    settings.validate()
    base = helm_host_base_path(settings.admin_socket_path)
    note = ""
    if base is None:
        base = HELM_DEFAULT_HOST_BASE_PATH
        note = (f"NOTE: this chart cannot put the admin socket at "
                f"{settings.admin_socket_path}; it puts it where the next line says. ")
    host_dir = f"{base}/{HELM_ADMIN_SUBDIR}"
    lines = [
        *comment_lines(
            f"values.yaml fragment for the spire Helm chart: value names as in {HELM_CHART}; "
            "check them against the chart version you install. The chart writes "
            "admin_socket_path itself (/tmp/spire-agent/private/admin.sock in the agent's "
            "container) and, with mountOnHost, shares that directory on the host as "
            f"<sockets.hostBasePath>/{HELM_ADMIN_SUBDIR}."),
        *comment_lines(
            f"{note}Run spiffe-delegate with --spire-admin-socket "
            f"{host_dir}/{HELM_ADMIN_SOCKET_NAME} and a hostPath volume for {host_dir}. "
            f"global.spire.trustDomain must be {settings.trust_domain}: authorized delegates "
            "must be members of the agent's trust domain."),
    ]
    values = {"spire-agent": {
        "authorizedDelegates": list(settings.delegates()),
        "sockets": {"hostBasePath": base, "admin": {"enabled": True, "mountOnHost": True}},
    }}
    import yaml  # only here: `run` imports this module (the CLI's options) and never this

    body = yaml.safe_dump(values, sort_keys=False, default_flow_style=False)
    return "\n".join(lines) + "\n" + body


def render(settings: SpireConfigSettings, output_format: str) -> str:
    if output_format == "hcl":
        return render_hcl(settings)
    if output_format == "helm":
        return render_helm(settings)
    raise ConfigError(f"--format {output_format!r} is not one of {', '.join(FORMATS)}")
