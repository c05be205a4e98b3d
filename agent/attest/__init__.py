"""Process attestation: who a PID is (start time, uid, pod, container), read from /proc."""

from agent.attest.cgroups import (
    CgroupInfo,
    CgroupStatus,
    is_container_id,
    is_pod_uid,
    parse_cgroup_file,
    parse_cgroup_path,
)
from agent.attest.procfs import (
    AmbiguousCgroup,
    ProcessGone,
    ProcessIdentity,
    ProcReader,
    ProcUnreadable,
)

__all__ = [
    "AmbiguousCgroup",
    "CgroupInfo",
    "CgroupStatus",
    "ProcReader",
    "ProcUnreadable",
    "ProcessGone",
    "ProcessIdentity",
    "is_container_id",
    "is_pod_uid",
    "parse_cgroup_file",
    "parse_cgroup_path",
]
