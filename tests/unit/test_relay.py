"""The relay's choice of what to publish together and what to skip (worker/relay.py)."""

from __future__ import annotations

from uuid import uuid4

from worker.constants import RELAY_WINDOW
from worker.db import PendingOutbound
from worker.relay import _superseded, _windows


def row(n: int, aggregate: str, change: str = "repeated") -> PendingOutbound:
    return PendingOutbound(n, uuid4(), f"hub.detection.{change}.low.x", b"{}", aggregate)


def test_a_repeated_event_followed_by_another_of_its_detection_is_skipped() -> None:
    rows = [row(1, "d1"), row(2, "d2"), row(3, "d1"), row(4, "d1")]
    assert _superseded(rows, "hub") == {1, 3}


def test_repeated_before_any_other_change_is_kept() -> None:
    rows = [row(1, "d1"), row(2, "d1", "escalated"), row(3, "d1"), row(4, "d1", "resolved")]
    assert _superseded(rows, "hub") == set()


def test_windows_never_hold_two_events_of_one_aggregate_and_keep_the_order() -> None:
    rows = [row(1, "a"), row(2, "b"), row(3, "a"), row(4, "c"), row(5, "b"), row(6, "d")]
    windows = _windows(rows)
    assert [[r.id for r in w] for w in windows] == [[1, 2], [3, 4, 5, 6]]
    for window in windows:
        assert len({r.aggregate for r in window}) == len(window)


def test_windows_are_bounded() -> None:
    rows = [row(n, f"d{n}") for n in range(RELAY_WINDOW * 2 + 1)]
    assert [len(w) for w in _windows(rows)] == [RELAY_WINDOW, RELAY_WINDOW, 1]
