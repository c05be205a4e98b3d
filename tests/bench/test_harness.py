"""The benchmark harness: percentiles, ratios, verdicts, the doc it writes, a failing benchmark."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from bench import report, runner
from bench.harness import BenchResult, Context, Row, percentile
from bench.registry import Benchmark


def test_percentile_is_nearest_rank() -> None:
    samples = [float(n) for n in range(1, 101)]
    assert percentile(samples, 50) == 50.0
    assert percentile(samples, 99) == 99.0
    assert percentile([3.0], 99) == 3.0
    assert percentile([5.0, 1.0, 3.0], 50) == 3.0
    with pytest.raises(ValueError):
        percentile([], 50)


def test_ratios_are_taken_against_the_floor() -> None:
    floor = Row.of("floor", "ms", [1.0, 1.0, 2.0])
    row = Row.of("ours", "ms", [2.0, 3.0, 8.0]).against(floor, target="p50 <= 3x", met=True)
    assert row.versus == "floor"
    assert row.ratio_p50 == pytest.approx(3.0)
    assert row.ratio_p99 == pytest.approx(4.0)
    assert (row.target, row.met) == ("p50 <= 3x", True)


def test_a_result_is_missed_if_any_row_is() -> None:
    rows = [Row("a", "ms", 1.0, met=True), Row("b", "ms", 1.0, met=False), Row("c", "ms", 1.0)]
    assert BenchResult("x", "X", rows).met is False
    assert BenchResult("x", "X", rows[:1] + rows[2:]).met is True
    assert BenchResult("x", "X", rows[2:]).met is None
    again = BenchResult.from_json(BenchResult("x", "X", rows, {"k": 1}, ["n"]).to_json())
    assert again.rows == rows and again.details == {"k": 1}


def test_the_doc_keeps_its_hand_written_tail_and_marks_misses() -> None:
    result = BenchResult("fanout", "Fan-out", [
        Row("push to all", "s", 1.2, 1.5, 5, target="< 1 s", met=False)])
    data = {"machine": {"cores": 2}, "results": {"fanout": {**result.to_json(), "when": "t"}}}
    doc = report.render(data, "old\n" + report.KEEP_MARKER + "\nwhy it is missed\n")
    assert "| Fan-out | push to all | 1.20 s | 1.50 s | 5 |" in doc
    assert "**missed**" in doc
    assert doc.endswith(report.KEEP_MARKER + "\nwhy it is missed\n")
    assert "old" not in doc.split(report.KEEP_MARKER)[0]


def test_a_failing_benchmark_is_reported_and_does_not_stop_the_others(
        monkeypatch: pytest.MonkeyPatch, tmp_path: object) -> None:
    class Broken(Benchmark):
        def load(self) -> Callable[[Context], BenchResult]:
            def boom(ctx: Context) -> BenchResult:
                raise RuntimeError("no envoy")
            return boom

    monkeypatch.setitem(runner.BY_ID, "fanout", Broken("fanout", "bench.fanout", "Fan-out"))
    result = runner.run_one("fanout", Context(workdir=tmp_path))  # type: ignore[arg-type]
    assert result.error == "RuntimeError: no envoy"
    assert "failed: RuntimeError: no envoy" in "\n".join(report.table([result]))
