"""The agent's /proc reader and dev-spire's k8s attestor agree on real pods in real cgroups.

The two parsers were written independently (dev-spire follows SPIRE's container locator;
the agent has its own reader), so agreement here is evidence, not a tautology.
"""

from __future__ import annotations

import pytest

from agent.attest import ProcReader
from agent.devspire.attestor import Attestor
from tests.podcgroups import fake_pod

LAYOUTS = ["systemd-v1", "systemd-v2", "systemd-hybrid", "cgroupfs-v1", "cgroupfs-v2"]
RUNTIMES = ["containerd", "crio", "docker"]


def k8s_values(attestor: Attestor, pid: int, kind: str) -> set[str]:
    prefix = f"{kind}:"
    return {s.value.removeprefix(prefix) for s in attestor.attest(pid).selectors
            if s.type == "k8s" and s.value.startswith(prefix)}


@pytest.mark.root
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("runtime", RUNTIMES)
def test_reader_and_devspire_agree(layout: str, runtime: str) -> None:
    with fake_pod(layout=layout, runtime=runtime) as pod:  # type: ignore[arg-type]
        proc = pod.spawn(["sleep", "30"])
        identity = ProcReader().identity(proc.pid)
        attestor = Attestor()
        assert identity.pod_uid == pod.pod_uid
        assert identity.container_id == pod.container_id
        assert k8s_values(attestor, proc.pid, "pod-uid") == {pod.pod_uid}
        assert k8s_values(attestor, proc.pid, "container-id") == {pod.container_id}


@pytest.mark.root
def test_both_say_a_host_process_is_not_in_a_pod() -> None:
    import os

    identity = ProcReader().identity(os.getpid())
    assert not identity.in_pod
    assert k8s_values(Attestor(), os.getpid(), "pod-uid") == set()
