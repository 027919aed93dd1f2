"""worker.retry.Backoff: full jitter under a doubling bound, a limit, a stop that cuts it short."""

from __future__ import annotations

import asyncio
import random
import statistics
import time

import pytest

from worker.retry import Backoff


@pytest.mark.parametrize(
    ("failures", "bound"),
    [(1, 0.5), (2, 1.0), (3, 2.0), (4, 4.0), (5, 8.0), (6, 10.0), (50, 10.0)],
)
def test_the_bound_doubles_from_base_up_to_cap(failures: int, bound: float) -> None:
    assert Backoff(0.5, 10.0).bound(failures) == pytest.approx(bound)


@pytest.mark.parametrize("failures", [1, 3, 6])
def test_delays_are_spread_uniformly_under_the_bound(failures: int) -> None:
    """Full jitter: uniform on [0, bound], so replicas that failed together part."""
    backoff = Backoff(0.5, 10.0, rng=random.Random(7))
    bound = backoff.bound(failures)
    delays = []
    for _ in range(4000):
        backoff.failures = failures - 1
        delays.append(backoff.failed())
    assert all(0.0 <= d <= bound for d in delays)
    assert statistics.mean(delays) == pytest.approx(bound / 2, rel=0.05)
    # Uniform: a tenth of the draws in each tenth of the range (within sampling noise).
    tenths = [
        sum(1 for d in delays if k * bound / 10 <= d < (k + 1) * bound / 10) for k in range(10)
    ]
    assert min(tenths) > 300
    assert max(tenths) < 500


def test_two_replicas_do_not_retry_in_lockstep() -> None:
    first, second = Backoff(0.2, 5.0), Backoff(0.2, 5.0)
    assert [first.failed() for _ in range(5)] != [second.failed() for _ in range(5)]


def test_the_limit_and_a_success() -> None:
    backoff = Backoff(0.1, 1.0, limit=3)
    for _ in range(2):
        backoff.failed()
    assert not backoff.exhausted
    backoff.failed()
    assert backoff.exhausted
    backoff.succeeded()
    assert (backoff.failures, backoff.exhausted) == (0, False)
    assert not Backoff(0.1, 1.0).exhausted  # no limit: never


async def test_a_stop_cuts_the_sleep_short() -> None:
    stopping = asyncio.Event()
    backoff = Backoff(10.0, 10.0, stopping=stopping)
    asyncio.get_running_loop().call_later(0.05, stopping.set)
    started = time.monotonic()
    await backoff.sleep(10.0)
    assert time.monotonic() - started < 5
