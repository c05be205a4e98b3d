"""k8s selectors end to end: a synthetic /proc with pod cgroups and a pods file."""

from __future__ import annotations

import os
from pathlib import Path

import grpc
import pytest

from agent._proto.spire.api.agent.delegatedidentity.v1 import delegatedidentity_pb2 as pb

from .conftest import (
    TD,
    MakeHarness,
    Stream,
    entry,
    eventually,
    read,
    read_error,
    write_json,
)
from .test_attestor import CID, CID2, UID, UID2, make_proc

pytestmark = pytest.mark.skipif(os.getuid() != 0, reason="the entries name the caller by uid 0")

REGISTRY = f"spiffe://{TD}/ns/zarf/sa/registry"
POD_PID, KIND_PID, CRIO_PID, HOST_PID, BROKEN_PID = 1001, 1002, 1003, 1004, 1005


@pytest.fixture
def proc_root(work_dir: Path) -> Path:
    root = work_dir / "proc"
    make_proc(root, os.getpid(), uid=0, gid=0)  # the caller: this test process, as root
    make_proc(root, POD_PID, cgroup=f"0::/kubepods/burstable/pod{UID}/{CID}\n")
    make_proc(root, KIND_PID, cgroup=(
        f"1:cpuset:/docker/{'9' * 64}/kubepods/besteffort/pod{UID2}/{CID2}\n"
        f"0::/docker/{'9' * 64}/system.slice/containerd.service\n"))
    make_proc(root, CRIO_PID, cgroup=f"0::/../crio-{CID2}.scope\n")
    make_proc(root, HOST_PID, cgroup="0::/system.slice/sshd.service\n")
    make_proc(root, BROKEN_PID, status=False, cgroup="broken\n")
    return root


def pods_doc(namespace: str = "zarf") -> dict[str, object]:
    return {"pods": [
        {"uid": UID, "namespace": namespace, "service_account": "registry", "name": "reg-0",
         "node_name": "node-1", "labels": {"app": "registry"}},
        {"uid": UID2, "namespace": "other", "service_account": "default", "name": "o-0",
         "containers": [{"id": CID2, "name": "main", "image": "busybox"}]},
    ]}


async def test_pid_in_pod_gets_pod_selectors(make_harness: MakeHarness, proc_root: Path,
                                             work_dir: Path) -> None:
    pods = work_dir / "pods.json"
    write_json(pods, pods_doc())
    h = await make_harness([
        entry(REGISTRY, "k8s:ns:zarf", "k8s:sa:registry"),
        entry(f"spiffe://{TD}/by-label", "k8s:pod-label:app:registry", "k8s:node-name:node-1"),
        entry(f"spiffe://{TD}/by-uid", f"k8s:pod-uid:{UID}", f"k8s:container-id:{CID}"),
        entry(f"spiffe://{TD}/other", "k8s:ns:other", "k8s:container-name:main",
              "k8s:container-image:busybox", "k8s:pod-name:o-0"),
        entry(f"spiffe://{TD}/host", "unix:uid:1000"),
    ], proc_root=str(proc_root), pods_path=str(pods))

    def subscribe(pid: int) -> Stream:
        return h.x509(pid=pid)

    got = await read(subscribe(POD_PID))
    assert sorted(s.x509_svid.id.path for s in got.x509_svids) == [
        "/by-label", "/by-uid", "/host", "/ns/zarf/sa/registry"]
    kind = await read(subscribe(KIND_PID))
    assert sorted(s.x509_svid.id.path for s in kind.x509_svids) == ["/host", "/other"]
    crio = await read(subscribe(CRIO_PID))  # no pod UID in the path: found by container ID
    assert sorted(s.x509_svid.id.path for s in crio.x509_svids) == ["/host", "/other"]
    host = await read(subscribe(HOST_PID))
    assert [s.x509_svid.id.path for s in host.x509_svids] == ["/host"]
    gone = await read(subscribe(4_000_000))  # no such PID: empty, and no error
    assert list(gone.x509_svids) == []
    err = await read_error(subscribe(BROKEN_PID))  # every plugin fails
    assert err.code() == grpc.StatusCode.UNAVAILABLE
    assert err.details() == "workload attestation failed"

    # The pods file is reloaded live; a new subscription sees the new namespace.
    reloads = h.dev.stats.pods_reloads
    write_json(pods, pods_doc(namespace="moved"))
    await eventually(lambda: h.dev.stats.pods_reloads > reloads)
    moved = await read(subscribe(POD_PID))
    assert "/ns/zarf/sa/registry" not in [s.x509_svid.id.path for s in moved.x509_svids]


async def test_caller_attestation_failure_is_unavailable(make_harness: MakeHarness,
                                                         proc_root: Path) -> None:
    me = proc_root / str(os.getpid())
    (me / "status").unlink()
    (me / "cgroup").write_text(f"2:cpu:/kubepods/pod{UID}/{CID}\n1:mem:/kubepods/pod{UID2}/{CID}\n")
    h = await make_harness(proc_root=str(proc_root))
    err = await read_error(h.x509(selectors=("k8s:ns:web",)))
    assert err.code() == grpc.StatusCode.UNAVAILABLE
    assert err.details() == "workload attestation failed"
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await h.stub.FetchJWTSVIDs(pb.FetchJWTSVIDsRequest(audience=["a"], pid=POD_PID))
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_caller_with_no_proc_entry_has_no_identity(make_harness: MakeHarness,
                                                         proc_root: Path) -> None:
    for name in ("status", "cgroup", "exe"):
        (proc_root / str(os.getpid()) / name).unlink()
    h = await make_harness(proc_root=str(proc_root))
    err = await read_error(h.x509(selectors=("k8s:ns:web",)))
    assert err.code() == grpc.StatusCode.PERMISSION_DENIED
    assert err.details() == "no identity issued"
