"""The benchmarks, in the order they run (the fleet model last: it reads the others)."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass

from bench.harness import BenchResult, Context


@dataclass(frozen=True)
class Benchmark:
    id: str
    module: str
    title: str

    def load(self) -> Callable[[Context], BenchResult]:
        run: Callable[[Context], BenchResult] = importlib.import_module(self.module).run
        return run


BENCHMARKS: tuple[Benchmark, ...] = (
    Benchmark("first_svid", "bench.first_svid", "First SVID on a new SDS stream"),
    Benchmark("rotation", "bench.rotation", "Rotation to Envoy, versus file-based SDS"),
    Benchmark("fanout", "bench.fanout", "Fan-out: one rotation to 1,000 streams"),
    Benchmark("procfs", "bench.procfs_scale", "/proc scale: 2,000 processes"),
    Benchmark("memory", "bench.memory_idle", "Memory and idle cost"),
    Benchmark("cold_start", "bench.cold_start", "Cold start to Envoy holding its certificate"),
    Benchmark("identity_mode", "bench.identity_mode", "Identity mode savings"),
    Benchmark("fleet", "bench.fleet_model", "Fleet model: 5,000 nodes"),
)

BY_ID = {benchmark.id: benchmark for benchmark in BENCHMARKS}
