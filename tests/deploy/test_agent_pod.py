"""The agent DaemonSet's pod, reproduced from the rendered manifest and run for real (root).

The container is built from the manifest itself: a private network namespace (no
hostNetwork) with only loopback up, the host PID namespace (hostPID), a bind mount per
hostPath volume (read-only where the manifest says so) from a stand-in node directory, a
tmpfs per emptyDir, the root filesystem remounted read-only, and the agent started with the
manifest's command, environment, user and group, an empty capability set and no_new_privs.
dev-spire plays the node's SPIRE agent on the stand-in admin socket (mode 0770, root's). The
pod must become ready (/readyz 200 on the health port), which shows the decisions in the
manifest hold: uid 0 without capabilities suffices, connect(2) works through a read-only
mount, the health listener answers in the pod's network namespace, /tmp is the only extra
writable path. Two broken variants (no /tmp volume, a read-only SDS directory) must not
become ready, for those reasons.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.deploy.checks import container, env_of, pod_spec
from tests.deploy.test_manifests import agent_of, rendered

AGENT_ID = "spiffe://example.org/ns/spiffe-delegate/sa/spiffe-delegate"
BIN = Path(sys.executable).parent
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def node() -> Iterator[Path]:
    """A stand-in for the node's filesystem (a short path: socket paths are limited)."""
    if os.geteuid() != 0:
        pytest.skip("needs root (mount and network namespaces, uid 0 without capabilities)")
    missing = [tool for tool in ("unshare", "setpriv", "ip") if shutil.which(tool) is None]
    if missing:
        pytest.skip(f"needs {', '.join(missing)} (util-linux, iproute2)")
    path = Path(tempfile.mkdtemp(prefix="node-", dir="/tmp"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def on_node(node: Path, host_path: str) -> Path:
    return node / host_path.lstrip("/")


def start_spire(node: Path, admin_socket: str) -> subprocess.Popen[bytes]:
    """dev-spire on the stand-in node path of the agent's admin socket."""
    socket_path = on_node(node, admin_socket)
    socket_path.parent.mkdir(parents=True, exist_ok=True)
    entries = node / "entries.json"
    entries.write_text(json.dumps({"entries": [{
        "spiffe_id": AGENT_ID, "parent_id": "spiffe://example.org/spire/agent/dev",
        "selectors": [{"type": "unix", "value": "uid:0"}]}]}))
    log = (node / "spire.log").open("wb")
    spire = subprocess.Popen(
        [str(BIN / "spiffe-delegate"), "dev-spire", "--socket", str(socket_path),
         "--trust-domain", "example.org", "--entries", str(entries),
         "--authorized-delegate", AGENT_ID], stdout=log, stderr=log)
    deadline = time.monotonic() + 20
    while not socket_path.is_socket():
        assert spire.poll() is None and time.monotonic() < deadline, (
            (node / "spire.log").read_text())
        time.sleep(0.05)
    return spire


def pod_script(daemonset: dict[str, Any], node: Path) -> str:
    """A shell script that builds the agent's container as the manifest describes it, runs
    the agent, waits for /readyz and prints what it saw."""
    pod, c = pod_spec(daemonset), container(daemonset, "spiffe-delegate")
    volumes = {v["name"]: v for v in pod["volumes"]}
    context = {**(pod.get("securityContext") or {}), **(c.get("securityContext") or {})}
    q = shlex.quote
    lines = ["set -eu", "cd /", "ip link set lo up", "mount -t tmpfs -o mode=755 tmpfs /run"]
    tmpfs = []
    for mount in c["volumeMounts"]:
        volume, target = volumes[mount["name"]], mount["mountPath"]
        if "hostPath" in volume:
            source = on_node(node, volume["hostPath"]["path"])
            assert volume["hostPath"]["type"] == "DirectoryOrCreate"
            source.mkdir(mode=0o755, parents=True, exist_ok=True)  # as kubelet: root 0755
            lines += [f"mkdir -p {q(target)}", f"mount --bind {q(str(source))} {q(target)}"]
            if mount.get("readOnly"):
                lines.append(f"mount -o remount,bind,ro {q(target)}")
        elif "emptyDir" in volume:
            tmpfs.append(target)
        else:
            raise AssertionError(f"volume {mount['name']}: only hostPath and emptyDir here")
    for target in tmpfs:
        # A checkout (and its venv) under an emptyDir's path, e.g. a clone in /tmp, would
        # vanish under the tmpfs: keep it visible at the same path, as the image would.
        venv = Path(sys.prefix).resolve()
        kept = [path for path in (REPO, *(() if venv.is_relative_to(REPO) else (venv,)))
                if path.is_relative_to(target)]
        for index, path in enumerate(kept):
            lines += [f"mkdir -p /run/.keep{index}",
                      f"mount --bind {q(str(path))} /run/.keep{index}"]
        lines += [f"mkdir -p {q(target)}", f"mount -t tmpfs -o mode=1777,size=1m tmpfs "
                  f"{q(target)}"]
        for index, path in enumerate(kept):
            lines += [f"mkdir -p {q(str(path))}",
                      f"mount --bind /run/.keep{index} {q(str(path))}"]
    if context.get("readOnlyRootFilesystem"):
        lines.append("mount -o remount,bind,ro /")
    capabilities = context.get("capabilities") or {}
    assert capabilities.get("drop") == ["ALL"] and not capabilities.get("add")
    setpriv = ["setpriv", f"--reuid={context.get('runAsUser', 0)}",
               f"--regid={context.get('runAsGroup', 0)}", "--clear-groups",
               "--inh-caps=-all", "--bounding-set=-all"]
    if context.get("allowPrivilegeEscalation") is False:
        setpriv.append("--no-new-privs")
    command = [str(BIN / c["command"][0]), *c["command"][1:], *c["args"]]
    env = {"PATH": f"{BIN}:/usr/bin:/bin", "HOME": "/", **env_of(c)}
    probe = c["readinessProbe"]["httpGet"]
    port = {p["name"]: p["containerPort"] for p in c["ports"]}.get(probe["port"], probe["port"])
    url = f"http://127.0.0.1:{port}{probe['path']}"
    fetch = ("import sys, urllib.request as u\n"
             "try:\n"
             f"    r = u.urlopen({url!r}, timeout=2); print('READY', r.status, r.read().decode())\n"
             "except Exception as exc:\n"
             "    print('NOT READY', exc); sys.exit(1)\n")
    lines += [
        f"{shlex.join(setpriv)} -- env -i {shlex.join(f'{k}={v}' for k, v in env.items())} "
        f"{shlex.join(command)} &",
        "agent=$!",
        "deadline=$((SECONDS + 30))",
        f"until {q(sys.executable)} -c {q(fetch)} > /run/probe.out 2>&1; do",
        "  if ! kill -0 $agent 2>/dev/null || [ $SECONDS -ge $deadline ]; then break; fi",
        "  sleep 0.1",
        "done",
        "cat /run/probe.out",
        "if kill -0 $agent 2>/dev/null; then",
        "  grep -E '^CapEff' /proc/$agent/status",
        "  ls /run/spiffe-delegate",
        "  kill -TERM $agent",
        "fi",
        "wait $agent && echo 'EXIT 0' || echo \"EXIT $?\"",
    ]
    return "\n".join(lines) + "\n"


def run_pod(daemonset: dict[str, Any], node: Path) -> str:
    admin = env_of(container(daemonset, "spiffe-delegate"))["SPIFFE_DELEGATE_SPIRE_ADMIN_SOCKET"]
    [admin_volume] = [m for m in container(daemonset, "spiffe-delegate")["volumeMounts"]
                      if admin.startswith(m["mountPath"] + "/")]
    host_dir = {v["name"]: v for v in pod_spec(daemonset)["volumes"]}[
        admin_volume["name"]]["hostPath"]["path"]
    spire = start_spire(node, f"{host_dir}/{Path(admin).name}")
    try:
        result = subprocess.run(
            ["unshare", "--mount", "--net", "--propagation", "private", "bash", "-c",
             pod_script(daemonset, node)],
            capture_output=True, text=True, timeout=120, check=False)
    finally:
        spire.terminate()
        spire.wait(timeout=10)
    return result.stdout + result.stderr


def test_the_agent_pod_as_deployed_becomes_ready(node: Path) -> None:
    output = run_pod(agent_of(rendered("base")), node)
    assert "READY 200" in output and '"ready": true' in output, output
    assert "CapEff:\t0000000000000000" in output, output  # not one capability
    assert "sds.sock" in output, output  # created in the node's shared directory
    assert "EXIT 0" in output, output  # SIGTERM: a clean exit
    # ... which removes the socket from the node.
    assert list(on_node(node, "/run/spiffe-delegate").iterdir()) == [], output


def _without_tmp(daemonset: dict[str, Any]) -> None:
    c = container(daemonset, "spiffe-delegate")
    c["volumeMounts"] = [m for m in c["volumeMounts"] if m["mountPath"] != "/tmp"]


def _sds_read_only(daemonset: dict[str, Any]) -> None:
    for mount in container(daemonset, "spiffe-delegate")["volumeMounts"]:
        if mount["mountPath"] == "/run/spiffe-delegate":
            mount["readOnly"] = True


@pytest.mark.parametrize(("breakage", "reason"), [
    (_without_tmp, "No usable temporary directory"),
    (_sds_read_only, "Read-only file system"),
], ids=["without the /tmp volume", "SDS directory read-only"])
def test_a_broken_pod_does_not_become_ready(
        node: Path, breakage: Callable[[dict[str, Any]], None], reason: str) -> None:
    daemonset = agent_of(rendered("base"))
    breakage(daemonset)
    output = run_pod(daemonset, node)
    assert "READY 200" not in output and "NOT READY" in output, output
    assert reason in output, output
