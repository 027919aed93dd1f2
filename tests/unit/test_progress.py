"""worker/progress.py: catch-up reports from backlog and applied counts, on a fake clock."""

from __future__ import annotations

import structlog.testing

from worker.progress import CatchUp, Progress


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_a_catch_up_is_reported_every_few_seconds_then_once_when_done() -> None:
    clock = Clock()
    catch_up = CatchUp(min_messages=1000, every_seconds=5, clock=clock)
    with structlog.testing.capture_logs() as logged:
        assert catch_up.sample(backlog=500, applied=0) is None  # not behind: silent
        assert catch_up.sample(backlog=10_000, applied=0) is None  # starts
        assert catch_up.catching_up
        clock.now += 2
        assert catch_up.sample(backlog=9_000, applied=1_000) is None  # not due yet
        clock.now += 3
        # 5 s after the start: 2000 applied (400/s), the backlog shrank by 2000 (400/s).
        assert catch_up.sample(backlog=8_000, applied=2_000) == Progress(8_000, 400.0, 20.0)
        clock.now += 5
        # More arrived than was applied: no time left to promise.
        assert catch_up.sample(backlog=8_500, applied=3_000) == Progress(8_500, 200.0, None)
        clock.now += 5
        assert catch_up.sample(backlog=10, applied=11_490) is None
        assert not catch_up.catching_up
    assert [(e["event"], e["action"]) for e in logged] == [
        ("lanes.catching_up", "lanes.progress"),
        ("lanes.catching_up", "lanes.progress"),
        ("lanes.catching_up", "lanes.progress"),
        ("lanes.caught_up", "lanes.progress"),
    ]
    assert logged[1]["events_per_second"] == 400.0
    assert logged[1]["seconds_left"] == 20.0
    assert logged[3]["applied"] == 11_490
    assert logged[3]["seconds"] == 15.0
