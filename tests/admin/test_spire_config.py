"""`spiffe-delegate spire-config`: the SPIRE agent's admin socket and authorized delegates."""

from __future__ import annotations

import re
from typing import Any

import hcl2
import pytest
import yaml

from agent.admin.entries import EntriesSettings, build_entries
from agent.admin.spire_config import (
    SpireConfigSettings,
    helm_host_base_path,
    render,
    render_hcl,
    render_helm,
)
from agent.errors import ConfigError
from tests.admin.test_entries import run_cli

AGENT = "spiffe://example.org/ns/spiffe-delegate/sa/spiffe-delegate"
CHART_SOCKET = "/run/spire/agent/sockets/csi.spiffe.io/admin/admin.sock"


def _unquote(value: Any) -> Any:
    """python-hcl2 8 keeps a string's quotes (and escapes); 4 to 7 strip them."""
    if isinstance(value, list):
        return [_unquote(v) for v in value]
    if isinstance(value, str) and len(value) >= 2 and value[0] == value[-1] == '"':
        return re.sub(r'\\(["\\])', r"\1", value[1:-1])
    return value


def agent_block(text: str) -> dict[str, Any]:
    """The one ``agent {}`` block of an HCL document, as SPIRE's HCL decoder would see it."""
    document = hcl2.loads(text)
    assert [k for k in document if not k.startswith("__")] == ["agent"]
    (block,) = document["agent"]
    return {k: _unquote(v) for k, v in block.items() if not k.startswith("__")}


def test_hcl_has_the_admin_socket_and_the_agent_as_delegate() -> None:
    text = render_hcl(SpireConfigSettings())
    assert agent_block(text) == {"admin_socket_path": "/run/spire/admin/admin.sock",
                                 "authorized_delegates": [AGENT]}
    comments = " ".join(line.lstrip("# ") for line in text.splitlines() if line.startswith("#"))
    assert "hostPath volume (path /run/spire/admin, type DirectoryOrCreate)" in comments
    assert "--spire-admin-socket /run/spire/admin/admin.sock" in comments


def test_hcl_lists_every_delegate_once_and_escapes_strings() -> None:
    others = ("spiffe://corp.test/ns/a/sa/b", "spiffe://corp.test/ztunnel")
    settings = SpireConfigSettings(trust_domain="corp.test",
                                   admin_socket_path='/run/spire/my "admin"/admin.sock',
                                   delegate_ids=(*others, others[0]))
    assert agent_block(render_hcl(settings)) == {
        "admin_socket_path": '/run/spire/my "admin"/admin.sock',
        "authorized_delegates": list(others)}


def test_default_delegate_is_the_id_entries_registers() -> None:
    for td in ("example.org", "corp.test"):
        agent_id = next(e.spiffe_id for e in build_entries(EntriesSettings(trust_domain=td))
                        if e.key == "agent")
        assert SpireConfigSettings(trust_domain=td).delegates() == (agent_id,)


def test_helm_values_for_the_spire_chart() -> None:
    text = render_helm(SpireConfigSettings(admin_socket_path=CHART_SOCKET))
    assert yaml.safe_load(text) == {"spire-agent": {
        "authorizedDelegates": [AGENT],
        "sockets": {"hostBasePath": "/run/spire/agent/sockets",
                    "admin": {"enabled": True, "mountOnHost": True}}}}
    comments = " ".join(line.lstrip("# ") for line in text.splitlines() if line.startswith("#"))
    assert "NOTE" not in comments
    assert "helm-charts-hardened" in comments and "(not pinned to a release)" in comments
    assert f"--spire-admin-socket {CHART_SOCKET}" in comments


def test_helm_says_where_the_chart_puts_a_socket_it_cannot_place() -> None:
    text = render_helm(SpireConfigSettings())  # /run/spire/admin/admin.sock
    values = yaml.safe_load(text)
    assert values["spire-agent"]["sockets"]["hostBasePath"] == "/run/spire/agent/sockets"
    comments = " ".join(line.lstrip("# ") for line in text.splitlines() if line.startswith("#"))
    assert "NOTE: this chart cannot put the admin socket at /run/spire/admin/admin.sock" in comments
    assert f"--spire-admin-socket {CHART_SOCKET}" in comments


def test_helm_host_base_path() -> None:
    assert helm_host_base_path("/var/run/x/csi.spiffe.io/admin/admin.sock") == "/var/run/x"
    assert helm_host_base_path("/csi.spiffe.io/admin/admin.sock") is None
    assert helm_host_base_path("/run/spire/admin/admin.sock") is None


@pytest.mark.parametrize(("settings", "message"), [
    (SpireConfigSettings(delegate_ids=("spiffe://other.org/ns/a/sa/b",)),
     "not a workload ID in the trust domain example.org"),
    (SpireConfigSettings(delegate_ids=("spiffe://example.org",)), "not a workload ID"),
    (SpireConfigSettings(delegate_ids=("spiffe://example.org/a//b",)), "not a SPIFFE ID"),
    (SpireConfigSettings(admin_socket_path="run/admin.sock"), "not an absolute path"),
    (SpireConfigSettings(admin_socket_path="/run/spire/admin/"), "names a directory"),
    (SpireConfigSettings(admin_socket_path="/run/" + "a" * 110 + ".sock"), "longer than 107"),
    (SpireConfigSettings(workload_api_socket="/run/spire/admin/api.sock"),
     "the Workload API socket's directory"),
    (SpireConfigSettings(workload_api_socket="/run/spire/agent.sock"),
     "the Workload API socket's directory"),
    (SpireConfigSettings(trust_domain="Example.org"), "not a trust domain"),
])
def test_what_spire_would_refuse_is_refused(settings: SpireConfigSettings,
                                            message: str) -> None:
    for output_format in ("hcl", "helm"):
        with pytest.raises(ConfigError, match=re.escape(message)):
            render(settings, output_format)


def test_admin_socket_beside_another_directory_is_fine() -> None:
    settings = SpireConfigSettings(workload_api_socket="/run/spire/sockets/agent.sock")
    assert agent_block(render_hcl(settings))["admin_socket_path"] == "/run/spire/admin/admin.sock"


def test_cli_prints_hcl_and_helm() -> None:
    done = run_cli("spire-config", "--trust-domain", "corp.test",
                   "--delegate-id", "spiffe://corp.test/a", "--delegate-id", "spiffe://corp.test/b",
                   "--admin-socket-path", "/var/run/spire-admin/admin.sock")
    assert done.returncode == 0, done.stderr
    assert agent_block(done.stdout) == {"admin_socket_path": "/var/run/spire-admin/admin.sock",
                                        "authorized_delegates": ["spiffe://corp.test/a",
                                                                 "spiffe://corp.test/b"]}
    done = run_cli("spire-config", "--format", "helm",
                   env={"SPIFFE_DELEGATE_SPIRE_CONFIG_ADMIN_SOCKET_PATH": CHART_SOCKET})
    assert done.returncode == 0, done.stderr
    assert done.stdout == render_helm(SpireConfigSettings(admin_socket_path=CHART_SOCKET))


def test_cli_refuses_a_delegate_of_another_trust_domain() -> None:
    done = run_cli("spire-config", "--delegate-id", "spiffe://other.org/ns/a/sa/b")
    assert (done.returncode, done.stdout) == (2, "")
    assert done.stderr.startswith("spiffe-delegate spire-config: error: --delegate-id "
                                  "spiffe://other.org/ns/a/sa/b is not a workload ID")
