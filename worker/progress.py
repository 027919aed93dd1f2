"""How a catch-up is going: backlog, events per second and time left, logged every few seconds.

A worker that starts behind a backlog (after an outage, a deploy, a burst) would
otherwise say nothing until it is done. The sampler calls `CatchUp.sample` with the
backlog of the lanes this worker owns and how many messages it has applied so far;
while the backlog is at least CATCH_UP_MIN_MESSAGES it logs `lanes.catching_up`
every CATCH_UP_LOG_SECONDS, and `lanes.caught_up` once it is below again.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import structlog

from worker.constants import CATCH_UP_LOG_SECONDS, CATCH_UP_MIN_MESSAGES

log = structlog.get_logger("worker.progress")


@dataclass(frozen=True)
class Progress:
    backlog: int
    # Messages applied per second since the previous report.
    events_per_second: float
    # At the rate the backlog shrank since the previous report; None when it did not.
    seconds_left: float | None


class CatchUp:
    def __init__(
        self,
        min_messages: int = CATCH_UP_MIN_MESSAGES,
        every_seconds: float = CATCH_UP_LOG_SECONDS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.min_messages = min_messages
        self.every_seconds = every_seconds
        self.clock = clock
        # Since when this worker has been catching up, and where the last report was.
        self._started: tuple[float, int] | None = None
        self._last: tuple[float, int, int] | None = None  # (at, backlog, applied)

    @property
    def catching_up(self) -> bool:
        return self._started is not None

    def sample(self, backlog: int, applied: int) -> Progress | None:
        """Take one observation; returns (and logs) a report when one is due."""
        now = self.clock()
        if backlog < self.min_messages:
            if self._started is not None:
                started_at, applied_before = self._started
                log.info(
                    "lanes.caught_up",
                    action="lanes.progress",
                    backlog=backlog,
                    applied=applied - applied_before,
                    seconds=round(now - started_at, 1),
                )
            self._started = self._last = None
            return None
        if self._started is None or self._last is None:
            self._started = (now, applied)
            self._last = (now, backlog, applied)
            log.info("lanes.catching_up", action="lanes.progress", backlog=backlog)
            return None
        last_at, last_backlog, last_applied = self._last
        elapsed = now - last_at
        if elapsed < self.every_seconds:
            return None
        rate = max(0, applied - last_applied) / elapsed
        shrinking = (last_backlog - backlog) / elapsed
        progress = Progress(
            backlog=backlog,
            events_per_second=round(rate, 1),
            seconds_left=round(backlog / shrinking, 1) if shrinking > 0 else None,
        )
        self._last = (now, backlog, applied)
        log.info(
            "lanes.catching_up",
            action="lanes.progress",
            backlog=progress.backlog,
            events_per_second=progress.events_per_second,
            seconds_left=progress.seconds_left,
        )
        return progress
