"""Runs the chosen benchmarks one after another, prints the table, updates the docs."""

from __future__ import annotations

import argparse
import tempfile
import time
import traceback
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path

from bench import report
from bench.harness import BenchResult, Context, machine
from bench.registry import BENCHMARKS, BY_ID


def parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description="Runs spiffe-delegate's benchmarks and writes docs/performance.md.")
    parser.add_argument("benchmarks", nargs="*", metavar="NAME",
                        help=f"which to run (default: all): {', '.join(BY_ID)}")
    parser.add_argument("--quick", action="store_true",
                        help="smoke-sized runs; prints the table, writes no docs")
    parser.add_argument("--no-docs", action="store_true",
                        help="print only; leave docs/performance.md as it is")
    parser.add_argument("--keep-workdir", action="store_true",
                        help="keep each benchmark's scratch directory (its path is printed)")
    args = parser.parse_args(argv)
    unknown = [name for name in args.benchmarks if name not in BY_ID]
    if unknown:
        parser.error(f"unknown benchmark {', '.join(unknown)}; choose from {', '.join(BY_ID)}")
    return args


def run_one(benchmark_id: str, context: Context) -> BenchResult:
    benchmark = BY_ID[benchmark_id]
    started = time.perf_counter()
    try:
        result = benchmark.load()(context)
    except Exception as exc:  # one benchmark failing must not lose the others' results
        traceback.print_exc()
        result = BenchResult(benchmark.id, benchmark.title, [],
                             error=f"{type(exc).__name__}: {exc}")
    result.seconds = time.perf_counter() - started
    return result


def main(argv: Sequence[str] | None = None) -> int:
    args = parse(argv)
    chosen = args.benchmarks or [b.id for b in BENCHMARKS]
    chosen = [b.id for b in BENCHMARKS if b.id in chosen]
    earlier = {key: BenchResult.from_json(value)
               for key, value in report.load_results().get("results", {}).items()}
    results: list[BenchResult] = []
    started = time.perf_counter()
    for benchmark_id in chosen:
        print(f"--- {benchmark_id}: {BY_ID[benchmark_id].title}", flush=True)
        scratch = Path(tempfile.mkdtemp(prefix=f"bench-{benchmark_id}-"))
        context = Context(workdir=scratch, quick=args.quick, earlier=dict(earlier))
        result = run_one(benchmark_id, context)
        results.append(result)
        earlier[benchmark_id] = result
        print("\n".join(report.table([result])[2:]), flush=True)
        print(f"    ({result.seconds:.1f} s)", flush=True)
        if args.keep_workdir:
            print(f"    scratch kept: {scratch}")
        else:
            _remove(scratch)
    total = time.perf_counter() - started
    print()
    print("\n".join(report.table(results)))
    print(f"\n{len(results)} benchmark(s) in {total:.1f} s")
    if not (args.quick or args.no_docs):
        when = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
        report.write(report.merge(results, machine(), when, total))
        print(f"wrote {report.DOC.relative_to(report.REPO)}")
        from bench.fleet_model import update_scale_doc

        if update_scale_doc():
            print("wrote docs/scale.md (the fleet model's numbers)")
    failed = [r.id for r in results if r.error]
    return 1 if failed else 0


def _remove(path: Path) -> None:
    import shutil

    shutil.rmtree(path, ignore_errors=True)
