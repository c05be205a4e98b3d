"""Back-off: full jitter, growth, cap, reset after a healthy period, attempt limits."""

from __future__ import annotations

import random

import pytest

from agent.spire import Backoff, BackoffPolicy


class Upper(random.Random):
    """Always draws the top of the range, exposing the jitter ceiling."""

    def uniform(self, a: float, b: float) -> float:
        return b


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_defaults_match_the_design() -> None:
    policy = BackoffPolicy()
    assert (policy.initial, policy.maximum, policy.multiplier, policy.reset_after,
            policy.max_attempts) == (0.1, 30.0, 2.0, 30.0, None)


def test_ceiling_doubles_from_100ms_and_caps_at_30s() -> None:
    backoff = Backoff(BackoffPolicy(), rng=Upper())
    delays = [backoff.failed() for _ in range(12)]
    assert delays == pytest.approx(
        [0.1, 0.2, 0.4, 0.8, 1.6, 3.2, 6.4, 12.8, 25.6, 30.0, 30.0, 30.0])


def test_full_jitter_sequence_with_a_seeded_random_source() -> None:
    backoff = Backoff(BackoffPolicy(), rng=random.Random(42))
    delays = [backoff.failed() for _ in range(12)]
    expected_rng = random.Random(42)
    ceilings = [0.1, 0.2, 0.4, 0.8, 1.6, 3.2, 6.4, 12.8, 25.6, 30.0, 30.0, 30.0]
    assert delays == pytest.approx([expected_rng.uniform(0, c) for c in ceilings])
    assert all(0 <= d <= c for d, c in zip(delays, ceilings, strict=True))
    # Same seed, same sequence: reproducible in tests, and really jittered (not the ceiling).
    again = Backoff(BackoffPolicy(), rng=random.Random(42))
    assert [again.failed() for _ in range(12)] == delays
    assert delays != pytest.approx(ceilings)


def test_no_overflow_after_very_many_failures() -> None:
    backoff = Backoff(BackoffPolicy(), rng=Upper())
    for _ in range(5000):
        delay = backoff.failed()
    assert delay == 30.0


def test_resets_after_a_healthy_period() -> None:
    clock = FakeClock()
    backoff = Backoff(BackoffPolicy(reset_after=30.0), rng=Upper(), clock=clock)
    for _ in range(5):
        backoff.failed()
    backoff.healthy()
    clock.now += 29.0
    assert backoff.failed() == pytest.approx(3.2)  # flapping: keeps growing
    backoff.healthy()
    clock.now += 30.0
    assert backoff.failed() == pytest.approx(0.1)  # was healthy long enough: starts over
    assert backoff.failures == 1


def test_max_attempts() -> None:
    backoff = Backoff(BackoffPolicy(max_attempts=3), rng=Upper())
    for _ in range(2):
        backoff.failed()
        assert not backoff.exhausted
    backoff.failed()
    assert backoff.exhausted
    backoff.reset()
    assert not backoff.exhausted and backoff.failures == 0
    assert not Backoff(BackoffPolicy()).exhausted


@pytest.mark.parametrize("kwargs", [
    {"initial": 0}, {"initial": 1.0, "maximum": 0.5}, {"multiplier": 0.5},
    {"reset_after": -1}, {"max_attempts": 0},
])
def test_policy_rejects_nonsense(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        BackoffPolicy(**kwargs)  # type: ignore[arg-type]
