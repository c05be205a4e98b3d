"""Pods for the benchmarks: real cgroups (agent/podsim.py) with real processes in them, and
the in-pod SDS client (bench/sds_client.py) driven line by line.

The client runs as root with group 2101 (``setpriv --regid``): the benchmark's own process
(the in-process agent, uid 0 gid 0) is the delegate, whose entry selects gid 0, so a client
is served only its pod's entry. (Another uid could not reach this Python under /root.)
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from agent.podsim import FakePod, create_pod
from bench.harness import REPO

CLIENT_GID = 2101


class PodClient:
    """``python -m bench.sds_client`` inside ``pod``; see that module for the commands."""

    def __init__(self, pod: FakePod, workdir: Path, sds: Path, floor: Path | None = None,
                 names: str = "default,ROOTCA") -> None:
        self.pod = pod
        launcher = pod.launcher(workdir, sys.executable)
        argv = ["setpriv", f"--regid={CLIENT_GID}", "--clear-groups", "--", str(launcher),
                "-m", "bench.sds_client", "--sds", str(sds), "--names", names]
        if floor is not None:
            argv += ["--floor", str(floor)]
        self.process = subprocess.Popen(argv, cwd=REPO, stdin=subprocess.PIPE,
                                        stdout=subprocess.PIPE, text=True, bufsize=1)
        pod.processes.append(self.process)

    @property
    def pid(self) -> int:
        return self.process.pid

    def _line(self) -> str:
        assert self.process.stdout is not None
        line = self.process.stdout.readline()
        if not line:
            raise RuntimeError(f"the client in pod {self.pod.pod_uid} exited "
                               f"(status {self.process.poll()})")
        return line.strip()

    async def ready(self) -> None:
        line = await asyncio.get_running_loop().run_in_executor(None, self._line)
        if line != "ready":
            raise RuntimeError(f"the client said {line!r} instead of ready")

    async def ask(self, command: str) -> Any:
        assert self.process.stdin is not None
        self.process.stdin.write(command + "\n")
        self.process.stdin.flush()
        answer = json.loads(await asyncio.get_running_loop().run_in_executor(None, self._line))
        if isinstance(answer, dict) and "error" in answer:
            raise RuntimeError(f"client in pod {self.pod.pod_uid}: {answer['error']}")
        return answer


class Pods:
    """Pods made for one benchmark run; :meth:`close` kills their processes and removes
    their cgroups (also after a failure: use it as a context manager)."""

    def __init__(self) -> None:
        self.pods: list[FakePod] = []

    def new(self, pod_uid: str | None = None) -> FakePod:
        pod = create_pod(pod_uid)
        self.pods.append(pod)
        return pod

    def close(self) -> None:
        errors = []
        for pod in reversed(self.pods):
            try:
                pod.close()
            except RuntimeError as exc:
                errors.append(str(exc))
        self.pods.clear()
        if errors:
            raise RuntimeError("; ".join(errors))

    def __enter__(self) -> Pods:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

