"""What the memory and cold-start benchmarks share: dev-spire and the agent as real
subprocesses (their RSS and CPU are their own), registration entries, and /proc readings."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.envoyproc import stop_process

TD = "example.org"
DELEGATE = f"spiffe://{TD}/spiffe-delegate"
PROXY_ID = f"spiffe://{TD}/ns/zarf/sa/registry-proxy"
# The uid Envoy runs as (its entry is unix:uid:<this>); nobody needs to exist in passwd.
ENVOY_UID = 2193
SELF_EXE = os.readlink("/proc/self/exe")
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def entry(spiffe_id: str, *selectors: str) -> dict[str, Any]:
    """A registration entry in ``spire-server entry create -data`` shape."""
    pairs = [dict(zip(("type", "value"), s.split(":", 1), strict=True)) for s in selectors]
    return {"spiffe_id": spiffe_id, "parent_id": f"spiffe://{TD}/spire/agent/dev",
            "selectors": pairs}


def write_entries(path: Path, entries: Sequence[dict[str, Any]]) -> None:
    """The delegate's own entry (this Python binary, this uid) and ``entries``."""
    delegate = entry(DELEGATE, f"unix:uid:{os.getuid()}", f"unix:path:{SELF_EXE}")
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"entries": [delegate, *entries]}))
    os.replace(tmp, path)


def wait_for(condition: Callable[[], bool], timeout: float, what: str,
             pause: float = 0.01) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(pause)  # polling with a deadline: no event to wait on across processes


# --- /proc ------------------------------------------------------------------------------

def status_kb(pid: int) -> dict[str, int]:
    """The ``kB`` fields of /proc/<pid>/status (VmRSS, RssAnon, RssFile, ...)."""
    out: dict[str, int] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, value = line.partition(":")
        parts = value.split()
        if len(parts) == 2 and parts[1] == "kB":
            out[name] = int(parts[0])
    return out


def cpu_seconds(pid: int) -> float:
    """utime + stime of ``pid`` (all its threads), in seconds."""
    text = Path(f"/proc/{pid}/stat").read_text()
    fields = text[text.rindex(")") + 2:].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


# --- processes --------------------------------------------------------------------------

@dataclass
class Child:
    """A subprocess in its own session, its output in ``log``; stopped with SIGTERM then
    SIGKILL (idempotent)."""

    command: Sequence[str]
    log: Path
    env: dict[str, str] | None = None
    process: subprocess.Popen[bytes] | None = field(default=None, init=False)
    started_at: float = field(default=0.0, init=False)

    def start(self) -> Child:
        with open(self.log, "ab") as out:
            self.started_at = time.perf_counter()
            self.process = subprocess.Popen(
                list(self.command), stdin=subprocess.DEVNULL, stdout=out,
                stderr=subprocess.STDOUT, env=self.env, start_new_session=True)
        return self

    @property
    def pid(self) -> int:
        assert self.process is not None, "not started"
        return self.process.pid

    def check_alive(self) -> None:
        assert self.process is not None, "not started"
        if self.process.poll() is not None:
            raise RuntimeError(f"{self.command[:4]} exited with status "
                               f"{self.process.returncode}:\n{self.tail()}")

    def alive(self) -> bool:
        """True, or raises if the process has exited (for polling conditions)."""
        self.check_alive()
        return True

    def tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def stop(self, timeout: float = 10.0) -> None:
        stop_process(self.process, timeout)


def python_env() -> dict[str, str]:
    return {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONWARNINGS": "ignore"}


def dev_spire(work: Path, entries_path: Path) -> Child:
    """``spiffe-delegate dev-spire`` on ``work/admin.sock``, started and serving."""
    socket = work / "admin.sock"
    child = Child([sys.executable, "-m", "agent", "dev-spire", "--socket", str(socket),
                   "--trust-domain", TD, "--entries", str(entries_path),
                   "--authorized-delegate", DELEGATE, "--reload-interval", "0.2s",
                   "--log-level", "warning"], work / "dev-spire.log", python_env()).start()
    try:
        wait_for(lambda: child.alive() and socket.exists(), 30, "dev-spire")
    except BaseException:
        child.stop()
        raise
    return child


def agent_command(work: Path, *extra: str, prelude: str | None = None) -> list[str]:
    """``spiffe-delegate run`` as a node would start it (health and metrics served, on
    free ports), talking to ``work/admin.sock``, serving ``work/sds.sock``."""
    options = ["run", "--spire-admin-socket", str(work / "admin.sock"),
               "--sds-socket", str(work / "sds.sock"), "--trust-domain", TD,
               "--shutdown-grace", "1s", "--log-level", "warning", *extra]
    if prelude is None:
        return [sys.executable, "-m", "agent", *options]
    code = (prelude + "\nimport sys\nfrom agent.cli import main\n"
            "sys.argv = ['spiffe-delegate', *sys.argv[1:]]\nsys.exit(main())\n")
    return [sys.executable, "-c", code, *options]


@contextlib.contextmanager
def stopping(*children: Any) -> Iterator[None]:
    """Stops every child on the way out, each even if stopping another failed."""
    try:
        yield
    finally:
        errors = []
        for child in reversed(children):
            try:
                child.stop()
            except Exception as exc:  # the others must still be stopped
                errors.append(exc)
        if errors:
            raise errors[0]
