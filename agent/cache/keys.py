"""The cache's composite IDs: a pod, a bare process, or a shared SPIFFE identity."""

from __future__ import annotations

import enum
from dataclasses import dataclass

from agent.attest.cgroups import is_container_id, is_pod_uid
from agent.attest.procfs import ProcessIdentity

__all__ = [
    "CompositeId",
    "Identity",
    "KeyMode",
    "ProcessKey",
    "WorkloadKey",
    "WorkloadUid",
    "key_for_process",
]


class KeyMode(enum.Enum):
    """How workloads map to cache entries (and SPIRE subscriptions).

    ``WORKLOAD``: one entry per pod (or bare process), each with its own subscription.
    ``IDENTITY``: pods to which SPIRE gives the same SPIFFE ID(s) share one entry and one
    long-lived subscription; each pod is still attested on its own first.
    """

    WORKLOAD = "workload"
    IDENTITY = "identity"


@dataclass(frozen=True, order=True)
class WorkloadUid:
    """A pod, by its UID (canonical: lower-case, dashed); with ``container_id``, one
    container of it.

    An SDS caller is served as its own container (registration entries may select by
    container, e.g. ``k8s:container-name``, so two containers of one pod can hold different
    identities); a pod asked for by a trusted proxy (``workload:<pod uid>``) is the whole
    pod, attested through any of its processes."""

    pod_uid: str
    container_id: str | None = None

    def __post_init__(self) -> None:
        if not is_pod_uid(self.pod_uid):
            raise ValueError(f"{self.pod_uid!r} is not a pod UID "
                             "(lower-case hex 8-4-4-4-12 with dashes)")
        if self.container_id is not None and not is_container_id(self.container_id):
            raise ValueError(f"{self.container_id!r} is not a container ID "
                             "(64 lower-case hex digits)")

    def __str__(self) -> str:
        if self.container_id is None:
            return f"WorkloadUid({self.pod_uid})"
        return f"WorkloadUid({self.pod_uid}/{self.container_id[:12]})"


@dataclass(frozen=True, order=True)
class ProcessKey:
    """A process that is not in a pod: PID plus start time names it for the machine's life."""

    pid: int
    start_time: int

    def __post_init__(self) -> None:
        if self.pid <= 0 or self.start_time < 0:
            raise ValueError(f"bad process key pid={self.pid} start_time={self.start_time}")

    def __str__(self) -> str:
        return f"Process({self.pid}@{self.start_time})"


@dataclass(frozen=True, order=True)
class Identity:
    """The SPIFFE ID set SPIRE issues to a workload (sorted; nearly always one ID).

    Pods share an Identity entry only when SPIRE gives them exactly the same set, so the
    shared certificate(s) are exactly what each of them would have got alone.
    """

    spiffe_ids: tuple[str, ...]

    def __post_init__(self) -> None:
        if not self.spiffe_ids:
            raise ValueError("an Identity needs at least one SPIFFE ID")
        if tuple(sorted(set(self.spiffe_ids))) != self.spiffe_ids:
            raise ValueError("Identity.spiffe_ids must be sorted and unique; use Identity.of")

    @classmethod
    def of(cls, *spiffe_ids: str) -> Identity:
        return cls(tuple(sorted(set(spiffe_ids))))

    @property
    def spiffe_id(self) -> str:
        """The first ID (the only one, usually)."""
        return self.spiffe_ids[0]

    def __str__(self) -> str:
        return f"Identity({','.join(self.spiffe_ids)})"


WorkloadKey = WorkloadUid | ProcessKey
"""What a watch names: the workload asking to be served."""

CompositeId = WorkloadUid | ProcessKey | Identity
"""What a cache entry (and its SPIRE subscription) is keyed by."""


def key_for_process(identity: ProcessIdentity) -> WorkloadKey:
    """The key a process is served under: its container of its pod, else the process
    itself."""
    if identity.pod_uid is not None:
        return WorkloadUid(identity.pod_uid, identity.container_id)
    return ProcessKey(identity.pid, identity.start_time)
