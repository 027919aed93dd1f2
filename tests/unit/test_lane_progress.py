"""How an owned lane's progress is judged from sampled consumer info (worker/lanes.py)."""

from __future__ import annotations

from worker.lanes import Progress


def test_idle_counts_only_while_messages_wait_and_the_floor_stays() -> None:
    progress = Progress(since=100.0)
    progress.observe(floor=5, waiting=3, now=101.0)  # first look: counted from the claim
    assert progress.idle_seconds(110.0) == 10.0
    progress.observe(floor=5, waiting=3, now=120.0)
    assert progress.idle_seconds(120.0) == 20.0
    progress.observe(floor=6, waiting=2, now=121.0)  # a message settled: it moves
    assert progress.idle_seconds(125.0) == 4.0


def test_a_lane_empty_for_long_is_not_idle_when_a_message_arrives() -> None:
    progress = Progress(since=0.0)
    progress.observe(floor=9, waiting=0, now=1000.0)
    assert progress.idle_seconds(1000.0) == 0.0
    progress.observe(floor=9, waiting=1, now=1002.0)
    assert progress.idle_seconds(1002.0) == 2.0
