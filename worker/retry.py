"""Waiting something out: exponential backoff with full jitter, for every retry loop.

Full jitter (a delay drawn uniformly between 0 and the exponential bound) keeps
replicas that failed together from retrying together: after a PostgreSQL
restart, every worker's lanes, leaders and commands would otherwise knock at
the same instants.
"""

from __future__ import annotations

import asyncio
import contextlib
import random


async def pause(stopping: asyncio.Event, seconds: float) -> None:
    """Sleep for `seconds`, or less when `stopping` is set meanwhile."""
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stopping.wait(), timeout=seconds)


class Backoff:
    """The delays of one retry loop.

    Parameters:
        base: the bound of the first delay, seconds.
        cap: the largest bound, seconds (reached by doubling from `base`).
        stopping: cuts a `sleep` short when set.
        limit: failures after which `exhausted` says to give up; None: never.
        rng: the random source (seeded in tests).

    A loop calls `failed()` for the next delay (to log it), then `sleep(delay)`;
    `succeeded()` starts the doubling over.
    """

    def __init__(
        self,
        base: float,
        cap: float,
        *,
        stopping: asyncio.Event | None = None,
        limit: int | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self.base = base
        self.cap = cap
        self.stopping = stopping
        self.limit = limit
        self.failures = 0
        self._rng = rng or random.Random()

    def __repr__(self) -> str:
        return f"<Backoff failures={self.failures} limit={self.limit}>"

    def bound(self, failures: int) -> float:
        """The largest delay after `failures` failures in a row, seconds."""
        return float(min(self.cap, self.base * 2 ** max(0, failures - 1)))

    def failed(self) -> float:
        """Count a failure; the delay before the next try, seconds."""
        self.failures += 1
        return self._rng.uniform(0.0, self.bound(self.failures))

    def succeeded(self) -> None:
        self.failures = 0

    @property
    def exhausted(self) -> bool:
        return self.limit is not None and self.failures >= self.limit

    async def sleep(self, delay: float) -> None:
        """Wait `delay` seconds, or less when `stopping` is set meanwhile."""
        if self.stopping is None:
            await asyncio.sleep(delay)
        else:
            await pause(self.stopping, delay)
