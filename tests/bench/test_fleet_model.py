"""The fleet model's arithmetic, checked against values worked out by hand."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from agent.cache.store import CacheSettings
from bench import fleet_model as fm
from bench.harness import BenchResult, Context, Row

PER_POD, IDENTITY = fm.Mode.PER_POD, fm.Mode.IDENTITY


def measured(**details: object) -> dict[str, BenchResult]:
    """ctx.earlier with each ``bench.key=value`` as that benchmark's details."""
    earlier: dict[str, BenchResult] = {}
    for key, value in details.items():
        bench_id, name = key.split("__", 1)
        earlier.setdefault(bench_id, BenchResult(bench_id, bench_id, [])).details[name] = value
    return earlier


def inputs(**overrides: float) -> fm.Inputs:
    values = {key: a.value for key, a in fm.ASSUMED.items()}
    values.update({key.replace("__", "."): value for key, value in overrides.items()})
    return fm.Inputs(values, {key: "test" for key in values})


# --- the structural part: 5,000 nodes x 110 pods, 10 identities, TTL 1 h -------------------

def test_streams_per_agent_and_fleet() -> None:
    fleet = fm.Fleet()
    assert fleet.streams(PER_POD) == 110 + 4
    assert fleet.streams(IDENTITY) == 10 + 4
    assert fleet.fleet_streams(PER_POD) == 570_000
    assert fleet.fleet_streams(IDENTITY) == 70_000


def test_signings_at_the_default_ttl() -> None:
    fleet = fm.Fleet()
    # each SVID is renewed every 30 min: 2 per entry per hour
    assert fleet.rotation_period_s() == 1_800
    assert fleet.signings_per_hour(PER_POD) == 5_000 * 110 * 2 == 1_100_000
    assert fleet.signings_per_hour(IDENTITY) == 5_000 * 10 * 2 == 100_000
    assert fleet.signings_per_server_s(PER_POD) == pytest.approx(1_100_000 / 3_600 / 8)  # 38.19
    assert fleet.signings_per_server_s(PER_POD) == pytest.approx(38.19, abs=0.01)


def test_signings_scale_inversely_with_the_ttl() -> None:
    short = fm.Fleet(ttl_s=300)  # 5 min TTL: renewed every 150 s, 24 times an hour
    assert short.signings_per_hour(PER_POD) == 5_000 * 110 * 24 == 13_200_000
    day = fm.Fleet(ttl_s=86_400, rotate_at=1 / 6)  # renewed every 4 h
    assert day.signings_per_hour(IDENTITY) == pytest.approx(5_000 * 10 / 4)


def test_attestations_cache_headroom_restart_and_syncs() -> None:
    fleet = fm.Fleet()
    assert fleet.attestations_per_min(PER_POD) == 0
    assert fleet.attestations_per_min(IDENTITY) == 110  # every pod once a minute
    assert fm.Fleet(reattest_s=30).attestations_per_min(IDENTITY) == 220
    assert fleet.cache_headroom(PER_POD) == pytest.approx(1_000 / 110)
    assert fleet.cache_headroom(IDENTITY) == 100
    assert fleet.remint_after_agent_restart(PER_POD) == 550_000
    assert fleet.remint_after_agent_restart(IDENTITY) == 50_000
    assert fleet.agent_syncs_per_s() == 1_000


def test_bundle_fan_out() -> None:
    fleet = fm.Fleet()
    # 8 servers x 2 bundle changes per CA x 2 CAs a day (ca_ttl 24 h, replaced at 12 h)
    assert fleet.bundle_updates_per_day() == 32
    assert fm.Fleet(servers=1).bundle_updates_per_day() == 4
    assert fleet.messages_per_bundle_update(PER_POD) == 570_000
    assert fleet.messages_per_bundle_update(IDENTITY) == 70_000
    assert fleet.sds_pushes_per_bundle_update() == 550_000


def test_shape_is_validated() -> None:
    with pytest.raises(ValueError):
        fm.Fleet(identities=0)
    with pytest.raises(ValueError):
        fm.Fleet(identities=111)
    with pytest.raises(ValueError):
        fm.Fleet(ttl_s=0)


def test_reattest_interval_matches_the_cache_default() -> None:
    assert CacheSettings().reattest_interval == fm.REATTEST_INTERVAL_S


# --- the measured part ---------------------------------------------------------------------

def test_memory_per_node_and_fleet() -> None:
    figures = inputs(memory__rss_mb_110_pods=100, memory__rss_kb_per_svid=512,
                     identity_mode__pods=20, identity_mode__identities=2,
                     identity_mode__rss_mb_per_pod=80, identity_mode__rss_mb_identity=71)
    # 9 MB saved over 18 folded pods: 0.5 MB each
    assert fm.saved_mb_per_folded_pod(figures) == 0.5
    fleet = fm.Fleet(pods=120)
    assert fm.rss_mb_per_node(fleet, figures, PER_POD) == 100 + 10 * 0.5 == 105
    assert fm.rss_mb_per_node(fleet, figures, IDENTITY) == 105 - 110 * 0.5 == 50
    assert fm.fleet_memory_gib(fm.Fleet(), figures, PER_POD) == pytest.approx(100 * 5_000 / 1024)


def test_memory_is_moved_from_the_pod_count_it_was_measured_at() -> None:
    figures = fm.gather(measured(memory__rss_mb_110_pods=60.0, memory__rss_kb_per_svid=1024,
                                 memory__pods=[10, 100]), {})
    assert figures["memory.pods[0]"] == 10
    assert fm.rss_mb_per_node(fm.Fleet(), figures, PER_POD) == 60 + 100 * 1.0


def test_memory_saving_falls_back_to_one_svid() -> None:
    figures = inputs(memory__rss_kb_per_svid=256, identity_mode__pods=10,
                     identity_mode__identities=10)
    assert fm.saved_mb_per_folded_pod(figures) == 0.25


def test_fan_out_time_and_idle_cpu() -> None:
    figures = inputs(fanout__fanout_seconds_p50=2.0, fanout__streams=1_000,
                     memory__idle_cpu_percent=0.2)
    assert fm.node_fanout_s(fm.Fleet(), figures) == pytest.approx(0.22)
    assert fm.bundle_reaches_envoys_s(fm.Fleet(), figures) == pytest.approx(10.22)
    assert fm.fleet_idle_cores(fm.Fleet(), figures) == pytest.approx(10.0)


# --- where the inputs come from -------------------------------------------------------------

def test_inputs_prefer_this_run_then_stored_then_assumed() -> None:
    earlier = measured(memory__rss_mb_110_pods=120.0)
    earlier["fanout"] = BenchResult("fanout", "fanout", [], details={"streams": 500},
                                    error="boom")
    earlier["cold_start"] = BenchResult("cold_start", "c", [],
                                        details={"cold_start_p50_ms": True})
    stored = {"memory": {"details": {"rss_mb_110_pods": 1.0, "idle_cpu_percent": 0.3},
                         "when": "2026-12-07 17:00 UTC"},
              "fanout": {"details": {"streams": 800}, "when": "x"}}
    got = fm.gather(earlier, stored)
    assert got["memory.rss_mb_110_pods"] == 120.0
    assert got.sources["memory.rss_mb_110_pods"] == "measured (memory)"
    assert got["memory.idle_cpu_percent"] == 0.3
    assert "2026-12-07 17:00 UTC" in got.sources["memory.idle_cpu_percent"]
    assert got["fanout.streams"] == 800  # the failed run's figure is not used
    assert got["cold_start.cold_start_p50_ms"] == fm.ASSUMED["cold_start.cold_start_p50_ms"].value
    assert "cold_start.cold_start_p50_ms" in got.assumed
    assert got.get("identity_mode.svids_identity") is None  # optional, absent


def test_run_is_fast_and_reports_figures_not_samples(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # As on a fresh clone before any run: no stored results, so most inputs are assumed.
    monkeypatch.setattr(fm, "stored_results", lambda path=None: {})
    started = time.perf_counter()
    result = fm.run(Context(workdir=tmp_path, earlier=measured(memory__rss_mb_110_pods=90.0)))
    assert time.perf_counter() - started < 1.0
    assert result.id == "fleet" and not result.error
    assert all(row.p99 is None and row.samples == 0 and row.p50 is not None
               for row in result.rows)
    assert all(row.met is None for row in result.rows)
    by_name = {row.measure: row for row in result.rows}
    per_pod: Row = by_name["per-pod: spiffe-delegate RSS per node"]
    assert per_pod.p50 == 90.0
    identity = by_name["identity: X.509-SVID signings, fleet"]
    assert identity.ratio_p50 == pytest.approx(10 / 110)
    assert result.details["signings_per_hour_per_pod"] == 1_100_000
    assert any("Assumed, not measured" in note for note in result.notes)


def test_scale_doc_block_is_replaced_and_the_rest_kept(tmp_path: Path) -> None:
    doc = tmp_path / "scale.md"
    doc.write_text(f"# Title\n\nprose\n\n{fm.BEGIN}\nold numbers\n{fm.END}\n\ntail\n",
                   encoding="utf-8")
    assert fm.update_scale_doc(doc, tmp_path / "missing.json")
    text = doc.read_text(encoding="utf-8")
    assert "old numbers" not in text
    assert text.startswith("# Title\n\nprose\n\n" + fm.BEGIN)
    assert text.endswith(fm.END + "\n\ntail\n")
    assert "| X.509-SVID signings, fleet | 1,100,000 /h | 100,000 /h | 0.09 |" in text
    doc.write_text("no markers", encoding="utf-8")
    assert not fm.update_scale_doc(doc, tmp_path / "missing.json")
