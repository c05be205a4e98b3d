"""glibc's malloc, kept lean: arenas capped (memory stays flat under pod churn) and freed
heap pages handed back after bursts."""

from __future__ import annotations

import asyncio
import ctypes
import logging
import os
from collections.abc import Callable, Mapping
from typing import Any, cast

_LOG = logging.getLogger("spiffe_delegate.run")

M_ARENA_MAX = -8  # glibc's mallopt() parameter (malloc.h)
ARENAS = 2  # the main thread's arena and one for every other thread


def limit_malloc_arenas(arenas: int = ARENAS,
                        environ: Mapping[str, str] | None = None) -> bool:
    """``mallopt(M_ARENA_MAX, arenas)``; True if set.

    glibc gives a thread that allocates while other threads do its own arena, up to eight
    per CPU, and keeps each arena's freed memory. The agent scans /proc for a pod's
    processes in asyncio's default executor whenever a pod has to be attested again (a
    container restarted, a new pod), so the executor's threads, and their arenas, come
    and go: the endurance suite measured about 5 MB of resident memory more after 1,500
    container restarts, memory no Python object held, and none with two arenas. Nothing
    is done where the C library is not glibc (musl has no arenas) or when the operator
    set ``MALLOC_ARENA_MAX``, which glibc reads itself."""
    env = os.environ if environ is None else environ
    if "MALLOC_ARENA_MAX" in env:
        return False
    mallopt = _libc_function("mallopt")
    if mallopt is None:
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    if mallopt(M_ARENA_MAX, arenas) != 1:
        _LOG.debug("mallopt(M_ARENA_MAX, %d) was refused", arenas)
        return False
    return True


def _libc_function(name: str) -> Any:
    """The C library's ``name`` (a ctypes function), or None where it has none (musl).

    Looked up among the process's own symbols (libc among them): ctypes.util.find_library
    would run ldconfig in a subprocess, opening /dev/null and forking the agent."""
    try:
        return getattr(ctypes.CDLL(None), name)
    except (OSError, AttributeError):
        return None


def _libc_malloc_trim() -> Callable[[int], int] | None:
    """glibc's ``malloc_trim``, or None where the C library has none (musl)."""
    trim = _libc_function("malloc_trim")
    if trim is None:
        return None
    trim.argtypes = (ctypes.c_size_t,)
    trim.restype = ctypes.c_int
    return cast(Callable[[int], int], trim)


def _resident_kb() -> int:
    """This process's resident set, from /proc/self/statm (one read, no parsing of status)."""
    with open("/proc/self/statm", "rb") as statm:
        return int(statm.read().split()[1]) * _PAGE_KB


_PAGE_KB = os.sysconf("SC_PAGE_SIZE") // 1024


class HeapTrimmer:
    """Hands freed heap memory back to the kernel after a burst (``malloc_trim(0)``).

    When Envoy opens its streams at once, the agent decodes every first request (each
    carries Envoy's node, ~60 kB with its extension list, ~180 kB once decoded) and attests
    every pod at the same moment. That peak is freed a moment later, but glibc keeps the
    pages: the memory benchmark measured 10-20 MB of the agent's resident set at 300-1,000
    pods that ``malloc_trim(0)`` handed back (bench/memory_idle.py). Every ``interval``
    seconds this reads the resident set (/proc/self/statm) and trims only if it grew by
    ``threshold_kb`` since the last trim, so an idle agent does one small read per interval
    and nothing else."""

    def __init__(self, interval: float = 5.0, threshold_kb: int = 2048, *,
                 trim: Callable[[int], int] | None = None,
                 resident_kb: Callable[[], int] = _resident_kb) -> None:
        self.interval = interval
        self.threshold_kb = threshold_kb
        self._trim = trim if trim is not None else _libc_malloc_trim()
        self._resident_kb = resident_kb
        self._after_kb = 0
        self.trims = 0
        self.released_kb = 0

    @property
    def available(self) -> bool:
        return self._trim is not None

    def maybe_trim(self) -> int:
        """Trims if the resident set grew past the threshold; returns the kB released."""
        if self._trim is None:
            return 0
        before = self._resident_kb()
        if before - self._after_kb < self.threshold_kb:
            return 0
        self._trim(0)
        self._after_kb = self._resident_kb()
        released = max(before - self._after_kb, 0)
        self.trims += 1
        self.released_kb += released
        _LOG.debug("malloc_trim(0): %d kB resident -> %d kB", before, self._after_kb)
        return released

    async def run(self) -> None:
        """Until cancelled."""
        if self._trim is None:
            return
        self._after_kb = self._resident_kb()
        while True:
            await asyncio.sleep(self.interval)
            self.maybe_trim()
