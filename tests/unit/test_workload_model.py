"""The reference model of contract section 4 used by the chaos and multi-worker tests
(tests/support/workload.py), checked on its own."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from tests.support.workload import Published, differences, expect, generate


def ev(session: str, what: str, n: int, **fields: object) -> Published:
    return Published("sp", session, what, {"eventId": f"e{n}", "severity": "low", **fields})


def test_terminal_status_is_the_first_and_archive_aborts_only_the_active() -> None:
    model = expect(
        [
            ev("a", "spawned", 1),
            ev("a", "completed", 2),
            ev("a", "failed", 3),
            ev("a", "archived", 4),
            ev("b", "spawned", 5),
            ev("b", "archived", 6),
            ev("c", "failed", 7),
            ev("c", "spawned", 8),
        ]
    )
    assert model.mappings == {"a": "completed", "b": "aborted", "c": "failed"}
    assert model.sessions == {"a": "completed", "b": "aborted", "c": "failed"}
    assert model.archived == {"a", "b"}


def test_signals_count_rise_and_resolve_on_archive_then_are_ignored() -> None:
    model = expect(
        [
            ev("a", "signal.model_degradation", 1, severity="low"),
            ev("a", "signal.model_degradation", 2, severity="high"),
            ev("a", "signal.model_degradation", 3, severity="medium"),
            ev("a", "signal.high_error_count", 4, severity="medium"),
            ev("a", "archived", 5),
            ev("a", "signal.model_degradation", 6, severity="high"),
        ]
    )
    assert model.detections == {
        ("a", "MODEL_DEGRADATION"): (3, "high", True),
        ("a", "HIGH_ERROR_COUNT"): (1, "medium", True),
    }


def test_generated_streams_keep_each_session_in_order() -> None:
    stream = generate(sessions=50, seed=3)
    order = ["spawned", "started"]
    for session in {e.session for e in stream}:
        steps = [e.what for e in stream if e.session == session]
        assert steps[:2] == order
        ends = [n for n, what in enumerate(steps) if what in ("completed", "failed", "aborted")]
        assert len(ends) == 1
        if "archived" in steps:
            assert steps.index("archived") > ends[0]
    assert len({e.body["eventId"] for e in stream}) == len(stream)


def test_differences_name_only_the_keys_that_differ() -> None:
    actual = {("a", "X"): (2, "low", False), ("b", "X"): (1, "low", True), ("c", "X"): 1}
    expected = {("a", "X"): (1, "low", False), ("b", "X"): (1, "low", True), ("d", "X"): 1}
    report = differences(actual, expected)
    assert report.splitlines() == [
        "3 actual against 3 expected: 1 missing, 1 unexpected, 1 different",
        "  missing ('d', 'X'): expected 1",
        "  unexpected ('c', 'X'): 1",
        "  ('a', 'X'): (2, 'low', False), expected (1, 'low', False)",
    ]


def test_generated_events_are_recent_so_that_no_sweep_of_a_run_finds_them_stalled() -> None:
    # tests/conftest.py's settings take a session silent for 600 s for stalled, and a
    # worker sweeps as it starts: events from a fixed past date raced that sweep.
    now = datetime.now(UTC)
    occurred = [datetime.fromisoformat(e.body["occurredAt"]) for e in generate(50)]
    assert all(now - timedelta(seconds=120) <= t <= now for t in occurred)
