"""agent.podsim (pods made of real cgroups) and its test wrapper tests.podcgroups: errors that
say why where the kernel will not help (a skip in tests), layout choice, launchers."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent import podsim
from agent.errors import SpiffeDelegateError
from agent.podsim import PodCgroupsUnavailable, create_pod, pod_relative_dir
from tests.podcgroups import fake_pod

SLEEP = shutil.which("sleep") or "/bin/sleep"


def first_mounted_layout() -> str | None:
    for layout in podsim.AUTO_LAYOUTS:
        if all(podsim.find_hierarchy(spec) for spec in podsim._LAYOUTS[layout][1]):
            return layout
    return None


@pytest.fixture
def root() -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root to create cgroups")


@pytest.fixture
def pod(root: None) -> Iterator[podsim.FakePod]:
    try:
        made = create_pod()
    except PodCgroupsUnavailable as err:
        pytest.skip(str(err))
    yield made
    made.close()


# --- why not: errors, and skips in tests ----------------------------------------------

def test_not_root(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    with pytest.raises(PodCgroupsUnavailable, match="needs root") as caught:
        create_pod()
    assert isinstance(caught.value, SpiffeDelegateError)
    assert caught.value.hint == "run as root"
    with pytest.raises(pytest.skip.Exception, match="needs root"), fake_pod():
        pass
    with pytest.raises(PodCgroupsUnavailable, match="needs root"), fake_pod(skip=False):
        pass


def test_missing_hierarchy(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    monkeypatch.setattr(podsim, "find_hierarchy", lambda spec: None)
    with pytest.raises(PodCgroupsUnavailable, match="'cgroup2' is mounted") as caught:
        create_pod(layout="cgroupfs-v2")
    assert "layout" in caught.value.hint
    with pytest.raises(PodCgroupsUnavailable, match=r"no cgroup layout works.*systemd-v1.*"
                                                    r"name=systemd.*cgroupfs-v1.*pids"):
        create_pod()
    with pytest.raises(pytest.skip.Exception, match="name=systemd"), fake_pod():
        pass


def test_kernel_refusing_the_cgroup(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    def refuse(directory: Path) -> None:
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(os, "geteuid", lambda: 0)
    monkeypatch.setattr(podsim, "find_hierarchy", lambda spec: tmp_path)
    monkeypatch.setattr(podsim, "_makedirs", refuse)
    with pytest.raises(PodCgroupsUnavailable, match="refused to create cgroup"):
        create_pod(layout="systemd-v1")
    with pytest.raises(pytest.skip.Exception, match="refused to create cgroup"), fake_pod():
        pass


def test_a_refusal_inside_the_block_skips_too(root: None) -> None:
    with pytest.raises(pytest.skip.Exception, match="kernel said no"), fake_pod(layout=None):
        raise PodCgroupsUnavailable("kernel said no")


def test_only_safe_hierarchies_are_used() -> None:
    with pytest.raises(ValueError, match="memory"):
        create_pod(hierarchies=["memory"])
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


# --- real cgroups ---------------------------------------------------------------------

@pytest.mark.root
def test_create_pod_picks_the_first_layout_this_machine_has(pod: podsim.FakePod) -> None:
    assert pod.layout == first_mounted_layout()
    assert all(d.is_dir() for d in pod.directories())
    proc = pod.spawn([SLEEP, "60"])
    assert pod.cgroup_path() in podsim.cgroup_paths(proc.pid)
    assert proc.pid in pod.pids()
    directories = pod.directories()
    pod.close()
    assert proc.returncode is not None
    assert not any(d.exists() for d in directories)
    assert not directories[0].parent.exists()  # the pod's own slice


@pytest.mark.root
def test_layout_none_passes_over_an_unmounted_hierarchy(
        root: None, monkeypatch: pytest.MonkeyPatch) -> None:
    real = podsim.find_hierarchy
    if real(podsim.V2) is None:
        pytest.skip("no cgroup2 mounted here")
    monkeypatch.setattr(podsim, "find_hierarchy",
                        lambda spec: None if spec == podsim.V1_SYSTEMD else real(spec))
    with pytest.raises(PodCgroupsUnavailable, match="'name=systemd' is mounted"):
        create_pod(layout="systemd-v1")
    with pytest.raises(PodCgroupsUnavailable, match="'name=systemd' is mounted"):
        create_pod(hierarchies=[podsim.V1_SYSTEMD, podsim.V2], layout="systemd-hybrid")
    with podsim.fake_pod() as made:
        assert made.layout == "systemd-v2"
        assert list(made.hierarchies) == [podsim.V2]
        proc = made.spawn([SLEEP, "60"])
        assert f"0::{made.cgroup_path()}" in Path(f"/proc/{proc.pid}/cgroup").read_text()


@pytest.mark.root
def test_layout_none_passes_over_a_refused_layout(root: None,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    first = first_mounted_layout()
    if first is None:
        pytest.skip("no usable cgroup hierarchy mounted here")
    refused = [podsim.find_hierarchy(spec) for spec in podsim._LAYOUTS[first][1]]
    real = podsim._makedirs

    def makedirs(directory: Path) -> None:
        if any(mount in directory.parents for mount in refused):
            raise PermissionError(1, "Operation not permitted")
        real(directory)

    monkeypatch.setattr(podsim, "_makedirs", makedirs)
    try:
        made = create_pod(qos="guaranteed")
    except PodCgroupsUnavailable as err:
        assert f"{first}: the kernel refused" in str(err)
        return
    try:
        assert made.layout != first
        assert all(d.is_dir() for d in made.directories())
    finally:
        made.close()


@pytest.mark.root
def test_launcher_runs_the_program_in_the_pod_from_the_start(pod: podsim.FakePod,
                                                            tmp_path: Path) -> None:
    """The launcher execs the program under its own PID: what the program reads about
    itself first thing (``$$``, /proc/self/cgroup) is the launcher's PID, in the pod."""
    launcher = pod.launcher(tmp_path, "sh")
    assert launcher.parent == tmp_path and os.access(launcher, os.X_OK)
    shell = subprocess.Popen([str(launcher), "-c", "echo $$; cat /proc/self/cgroup"],
                             stdout=subprocess.PIPE, text=True)
    out, _ = shell.communicate(timeout=10)
    assert shell.returncode == 0
    own_pid, *cgroup = out.splitlines()
    assert int(own_pid) == shell.pid
    assert pod.cgroup_path() in [line.split(":", 2)[2] for line in cgroup]


@pytest.mark.root
def test_a_launched_process_is_seen_in_the_pod_and_killed_with_it(
        pod: podsim.FakePod, tmp_path: Path) -> None:
    sleeper = subprocess.Popen([str(pod.launcher(tmp_path, Path(SLEEP))), "60"])
    deadline = time.monotonic() + 5
    while os.readlink(f"/proc/{sleeper.pid}/exe") != os.path.realpath(SLEEP):
        assert sleeper.poll() is None and time.monotonic() < deadline
        time.sleep(0.005)
    text = Path(f"/proc/{sleeper.pid}/cgroup").read_text()
    assert pod.pod_uid in text or pod.pod_uid.replace("-", "_") in text
    assert sleeper.pid in pod.pids()
    leaves = pod.directories()
    pod.close()  # not in pod.processes: found in the cgroup, killed and reaped
    assert sleeper.poll() is not None
    assert not any(d.exists() for d in leaves)


@pytest.mark.root
def test_launcher_for_another_container(pod: podsim.FakePod, tmp_path: Path) -> None:
    sidecar = podsim.new_container_id()
    launcher = pod.launcher(tmp_path, "cat", container_id=sidecar)
    assert sidecar in pod.containers
    out = subprocess.run([str(launcher), "/proc/self/cgroup"], capture_output=True,
                         text=True, check=True, timeout=10).stdout
    assert pod.cgroup_path(sidecar) in out
    assert pod.cgroup_path() not in out


@pytest.mark.root
def test_launcher_does_not_run_the_program_outside_the_pod(pod: podsim.FakePod,
                                                           tmp_path: Path) -> None:
    launcher = pod.launcher(tmp_path, "touch")
    for directory in pod.directories():
        directory.rmdir()  # nothing to move into any more
    marker = tmp_path / "ran"
    done = subprocess.run([str(launcher), str(marker)], capture_output=True, timeout=10)
    assert done.returncode == 111
    assert not marker.exists()


@pytest.mark.root
def test_moving_a_process_that_is_gone(pod: podsim.FakePod) -> None:
    dead = subprocess.Popen(["true"])
    dead.wait()
    with pytest.raises(ProcessLookupError):
        pod.move(dead.pid)
