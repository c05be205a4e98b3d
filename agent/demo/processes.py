"""Child processes of the demo (and of the chain tests): started, watched and ended by PID.

Each child runs in its own process group (Ctrl-C on the terminal reaches the demo only,
which then stops the children in order), writes stdout and stderr to ``<logdir>/<name>.log``
and is ended with SIGTERM, then SIGKILL after a grace period, always by the PID it was
started with.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from agent.errors import SpiffeDelegateError

__all__ = ["Child", "ChildFailed", "Supervisor"]

_LOG = logging.getLogger("spiffe_delegate.demo")


class ChildFailed(SpiffeDelegateError):
    """A child process could not start, or exited when it should be running."""


@dataclass
class Child:
    name: str
    argv: tuple[str, ...]
    process: asyncio.subprocess.Process
    log: Path
    starts: int = 1
    stopping: bool = field(default=False, repr=False)

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def running(self) -> bool:
        return self.process.returncode is None

    def log_tail(self, lines: int = 15) -> str:
        try:
            text = self.log.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])


class Supervisor:
    """Starts named children and ends them; ``stop_all`` ends them newest first."""

    def __init__(self, logdir: Path) -> None:
        self._logdir = logdir
        self._children: dict[str, Child] = {}

    @property
    def children(self) -> Mapping[str, Child]:
        return self._children

    def __getitem__(self, name: str) -> Child:
        return self._children[name]

    async def start(self, name: str, argv: Sequence[str], *,
                    env: Mapping[str, str] | None = None) -> Child:
        if name in self._children and self._children[name].running:
            raise ChildFailed(f"{name} is already running (pid {self._children[name].pid})")
        log = self._logdir / f"{name}.log"
        starts = self._children[name].starts + 1 if name in self._children else 1
        with log.open("ab") as out:
            out.write(f"--- start {starts}: {' '.join(argv)}\n".encode())
            out.flush()
            try:
                process = await asyncio.create_subprocess_exec(
                    *argv, stdin=asyncio.subprocess.DEVNULL, stdout=out, stderr=out,
                    env=dict(env) if env is not None else None, process_group=0)
            except OSError as exc:
                raise ChildFailed(f"cannot start {name} ({argv[0]}): {exc}",
                                  "is it installed? see the README's demo command") from None
        child = Child(name, tuple(argv), process, log, starts)
        self._children[name] = child
        _LOG.debug("started %s (pid %d)", name, child.pid)
        return child

    def check(self, name: str) -> Child:
        """The running child ``name``, or ChildFailed with the end of its log."""
        child = self._children[name]
        if not child.running:
            raise ChildFailed(f"{name} (pid {child.pid}) exited with status "
                              f"{child.process.returncode}:\n{child.log_tail()}",
                              f"its whole log is {child.log}")
        return child

    async def stop(self, name: str, *, grace: float = 5.0,
                   sig: signal.Signals = signal.SIGTERM) -> int | None:
        """Ends ``name`` by its PID: ``sig``, then SIGKILL after ``grace`` seconds. Returns
        its exit status (None if it was never started)."""
        child = self._children.get(name)
        if child is None:
            return None
        child.stopping = True
        if child.running:
            with contextlib.suppress(ProcessLookupError):
                os.kill(child.pid, sig)
            try:
                # asyncio.timeout, not wait_for: on 3.11 wait_for can swallow a
                # cancellation that races the child's exit.
                async with asyncio.timeout(grace):
                    await child.process.wait()
            except TimeoutError:
                _LOG.warning("%s (pid %d) did not exit within %.1fs of %s; killing it",
                             name, child.pid, grace, sig.name)
                with contextlib.suppress(ProcessLookupError):
                    os.kill(child.pid, signal.SIGKILL)
                await child.process.wait()
        return child.process.returncode

    async def stop_all(self, *, grace: float = 5.0) -> None:
        for name in reversed(list(self._children)):
            await self.stop(name, grace=grace)
