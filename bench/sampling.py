"""A low-overhead sampling profiler for the benchmarks' profiles (docs/profiles/).

cProfile instruments every call, which inflates call-heavy pure-Python code (pyasn1 came
out 5x too expensive under it); sampling the main thread's stack every half millisecond
from another thread leaves the timings nearly as they are. The report gives, for the
project's and its libraries' functions, the share of samples in which each was on the
stack (inclusive), and the innermost frames (where the time is spent, idle included).

    sampler = Sampler()
    sampler.start()
    ...                          # the code to profile, on the main thread
    text = sampler.stop_and_report("cold first SVIDs")
"""

from __future__ import annotations

import collections
import contextlib
import os
import sys
import sysconfig
import threading
from collections.abc import Iterator
from pathlib import Path

_INTERESTING = ("agent/", "spiffe/", "pyasn1/", "grpc/", "bench/")


def _prefixes() -> list[str]:
    repo = str(Path(__file__).resolve().parent.parent) + "/"
    found = {repo, sysconfig.get_paths()["purelib"] + "/", sysconfig.get_paths()["stdlib"] + "/"}
    return sorted(found, key=len, reverse=True)


class Sampler:
    """Samples one thread's stack (by default the thread that creates it)."""

    def __init__(self, interval: float = 0.0005, thread_id: int | None = None) -> None:
        self._interval = interval
        self._target = thread_id if thread_id is not None else threading.get_ident()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._prefixes = _prefixes()
        self.samples = 0
        self.inclusive: collections.Counter[str] = collections.Counter()
        self.innermost: collections.Counter[str] = collections.Counter()

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="sampler", daemon=True)
        self._thread.start()

    def _name(self, filename: str, function: str) -> str:
        for prefix in self._prefixes:
            if filename.startswith(prefix):
                filename = filename[len(prefix):]
                break
        return f"{filename}:{function}"

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            frame = sys._current_frames().get(self._target)
            if frame is None:
                continue
            self.samples += 1
            seen: set[str] = set()
            innermost = ""
            while frame is not None:
                name = self._name(frame.f_code.co_filename, frame.f_code.co_name)
                innermost = innermost or name
                if name not in seen:
                    seen.add(name)
                    self.inclusive[name] += 1
                frame = frame.f_back
            self.innermost[innermost] += 1

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def report(self, title: str, top: int = 30) -> str:
        total = max(self.samples, 1)
        lines = [f"{title}: {self.samples} stack samples of the main thread, one every "
                 f"{self._interval * 1000:g} ms (share of samples)", "",
                 "on the stack (inclusive), the project's and its libraries' functions:"]
        # Frames on every sample (the runner, the entry point) say nothing.
        shown = [(name, count) for name, count in self.inclusive.most_common()
                 if count < total and any(part in name for part in _INTERESTING)][:top]
        lines += [f"  {count / total * 100:5.1f}%  {name}" for name, count in shown]
        lines += ["", "innermost frame (selectors.py:select = the event loop idle):"]
        lines += [f"  {count / total * 100:5.1f}%  {name}"
                  for name, count in self.innermost.most_common(15)]
        return "\n".join(lines) + "\n"

    def stop_and_report(self, title: str, top: int = 30) -> str:
        self.stop()
        return self.report(title, top)


@contextlib.contextmanager
def profiled(env: str, name: str, title: str) -> Iterator[None]:
    """With the environment variable ``env`` naming a directory: this process's main thread
    sampled while the block runs, the report written to ``<dir>/<name>.txt``."""
    directory = os.environ.get(env)
    if not directory:
        yield
        return
    sampler = Sampler()
    sampler.start()
    try:
        yield
    finally:
        Path(directory, f"{name}.txt").write_text(sampler.stop_and_report(title))
