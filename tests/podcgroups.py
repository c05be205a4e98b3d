"""Fake Kubernetes pods for tests: :mod:`agent.podsim`, with skipping instead of failing.

Usage::

    from tests.podcgroups import fake_pod

    @pytest.mark.root
    def test_something() -> None:
        with fake_pod(layout="systemd-v1", qos="burstable") as pod:
            proc = pod.spawn(["sleep", "60"])      # already in the pod's cgroup when it execs
            assert ProcReader().pod_of(proc.pid) == pod.pod_uid

The pods, layouts and cleanup are :mod:`agent.podsim`'s (see its docstring). What this
module adds: the test is skipped (``pytest.skip``, with the reason) when
:class:`~agent.podsim.PodCgroupsUnavailable` is raised, whether while the pod is created
(not root, hierarchy not mounted, the kernel refuses the cgroup) or inside the ``with``
block (the kernel refuses to move a process in); pass ``skip=False`` to get the error.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import pytest

from agent.podsim import (
    ALLOWED_HIERARCHIES,
    V1_PIDS,
    V1_SYSTEMD,
    V2,
    FakePod,
    Layout,
    PodCgroupsUnavailable,
    QoS,
    Runtime,
    cgroup_paths,
    container_dir_name,
    create_pod,
    find_hierarchy,
    new_container_id,
    new_pod_uid,
    pod_relative_dir,
)

__all__ = [
    "ALLOWED_HIERARCHIES",
    "V1_PIDS",
    "V1_SYSTEMD",
    "V2",
    "FakePod",
    "Layout",
    "PodCgroupsUnavailable",
    "QoS",
    "Runtime",
    "cgroup_paths",
    "container_dir_name",
    "fake_pod",
    "find_hierarchy",
    "new_container_id",
    "new_pod_uid",
    "pod_relative_dir",
]


@contextlib.contextmanager
def fake_pod(pod_uid: str | None = None, container_id: str | None = None, *,
             layout: Layout | None = "systemd-v1", qos: QoS = "burstable",
             runtime: Runtime = "containerd", hierarchies: Sequence[str] | None = None,
             skip: bool = True) -> Iterator[FakePod]:
    """:func:`agent.podsim.create_pod` (``layout=None`` picks one), closed on exit; skips the
    test where the kernel will not help unless ``skip=False``."""
    try:
        pod = create_pod(pod_uid, container_id, layout=layout, qos=qos, runtime=runtime,
                         hierarchies=hierarchies)
    except PodCgroupsUnavailable as err:
        if skip:
            pytest.skip(str(err))
        raise
    try:
        yield pod
    except PodCgroupsUnavailable as err:
        if skip:
            pytest.skip(str(err))
        raise
    finally:
        pod.close()
