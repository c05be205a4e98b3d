"""The fake-pod helper skips with a reason, rather than failing, where the kernel will not help."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests import podcgroups
from tests.podcgroups import fake_pod, pod_relative_dir


def test_not_root_skips(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    with pytest.raises(pytest.skip.Exception, match="needs root"), fake_pod():
        pass
    with pytest.raises(RuntimeError, match="needs root"), fake_pod(skip=False):
        pass


def test_missing_hierarchy_skips(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    monkeypatch.setattr(podcgroups, "find_hierarchy", lambda spec: None)
    with pytest.raises(pytest.skip.Exception, match="name=systemd"), fake_pod():
        pass


def test_kernel_refusing_the_cgroup_skips(monkeypatch: pytest.MonkeyPatch,
                                          tmp_path: Path) -> None:
    def refuse(directory: Path) -> None:
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(os, "geteuid", lambda: 0)
    monkeypatch.setattr(podcgroups, "find_hierarchy", lambda spec: tmp_path)
    monkeypatch.setattr(podcgroups, "_makedirs", refuse)
    with pytest.raises(pytest.skip.Exception, match="refused to create cgroup"), fake_pod():
        pass


def test_only_safe_hierarchies_are_used() -> None:
    with pytest.raises(ValueError, match="memory"), fake_pod(hierarchies=["memory"]):
        pass
    with pytest.raises(ValueError, match="layout"), fake_pod(layout="nope"):  # type: ignore[arg-type]
        pass


@pytest.mark.parametrize(("driver", "qos", "expected"), [
    ("systemd", "guaranteed", ["kubepods.slice", "kubepods-pod1_2.slice"]),
    ("systemd", "besteffort", ["kubepods.slice", "kubepods-besteffort.slice",
                               "kubepods-besteffort-pod1_2.slice"]),
    ("cgroupfs", "guaranteed", ["kubepods", "pod1-2"]),
    ("cgroupfs", "burstable", ["kubepods", "burstable", "pod1-2"]),
])
def test_kubelet_directory_names(driver: str, qos: str, expected: list[str]) -> None:
    assert pod_relative_dir(driver, qos, "1-2") == expected
