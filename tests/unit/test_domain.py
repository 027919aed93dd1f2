"""Domain rules of contract section 4 that need no servers."""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime, timedelta, timezone

import pytest

from worker.domain import (
    SESSION_STALL,
    Lifecycle,
    Severity,
    anomaly_type_of,
    dedup_key,
    ended_status,
    is_late_news,
    max_severity,
    signal_change,
)


def contract_dedup_key(anomaly_type: str, session_id: str, fingerprint: str | None) -> str:
    """The recipe of section 4, written out independently of the worker."""
    material = "v1\x1f" + anomaly_type + "\x1f" + session_id + "\x1f" + (fingerprint or "")
    return hashlib.sha256(material.encode("utf-8")).hexdigest()


# --- dedup_key -------------------------------------------------------------


@pytest.mark.parametrize(
    ("anomaly_type", "session_id", "fingerprint"),
    [
        ("MODEL_DEGRADATION", "sess-1", None),
        ("MODEL_DEGRADATION", "sess-1", "gpu-0"),
        ("HIGH_ERROR_COUNT", "a" * 128, "x" * 256),
        ("SESSION_STALL", "s_1", None),
        ("MODEL_DEGRADATION", "sess-1", "ünïcode ✓"),
    ],
)
def test_dedup_key_follows_the_contract_recipe(
    anomaly_type: str, session_id: str, fingerprint: str | None
) -> None:
    assert dedup_key(anomaly_type, session_id, fingerprint) == contract_dedup_key(
        anomaly_type, session_id, fingerprint
    )


@pytest.mark.parametrize(
    ("anomaly_type", "session_id", "fingerprint", "expected"),
    [
        # printf 'v1\x1fMODEL_DEGRADATION\x1fsess-1\x1f' | sha256sum
        (
            "MODEL_DEGRADATION",
            "sess-1",
            None,
            "2854cda3c1c0eb88e118ba4dc049793a9146161193521add475d8bc6bb9e6321",
        ),
        # printf 'v1\x1fMODEL_DEGRADATION\x1fsess-1\x1fgpu-0' | sha256sum
        (
            "MODEL_DEGRADATION",
            "sess-1",
            "gpu-0",
            "7e24ddb0433ee947c80a3b3cb8e3a3bef1db18e9a9ffea13b8a6e17defe657fd",
        ),
        # printf 'v1\x1fSESSION_STALL\x1fabc\x1f' | sha256sum
        (
            "SESSION_STALL",
            "abc",
            None,
            "65db9714a0e0bbbc047d5b251a869768fa8676f76bc9f2e7a7638ee6a54c0828",
        ),
    ],
)
def test_dedup_key_matches_known_literal_values(
    anomaly_type: str, session_id: str, fingerprint: str | None, expected: str
) -> None:
    assert dedup_key(anomaly_type, session_id, fingerprint) == expected


def test_dedup_key_is_lowercase_hex_sha256() -> None:
    key = dedup_key("MODEL_DEGRADATION", "sess-1", "gpu-0")
    assert len(key) == 64
    assert set(key) <= set("0123456789abcdef")


def test_dedup_key_treats_missing_and_empty_fingerprint_alike() -> None:
    assert dedup_key("X", "s", None) == dedup_key("X", "s", "")


@pytest.mark.parametrize(
    ("a", "b"),
    [
        (("MODEL_DEGRADATION", "s1", None), ("MODEL_DEGRADATION", "s2", None)),
        (("MODEL_DEGRADATION", "s1", None), ("HIGH_ERROR_COUNT", "s1", None)),
        (("MODEL_DEGRADATION", "s1", "f1"), ("MODEL_DEGRADATION", "s1", "f2")),
        (("MODEL_DEGRADATION", "s1", None), ("MODEL_DEGRADATION", "s1", "f1")),
        # The separator keeps fields apart: moving text across a boundary changes the key.
        (("AB", "c", None), ("A", "Bc", None)),
        (("A", "b", "c"), ("A", "bc", None)),
    ],
)
def test_dedup_key_differs_when_any_part_differs(
    a: tuple[str, str, str | None], b: tuple[str, str, str | None]
) -> None:
    assert dedup_key(*a) != dedup_key(*b)


# --- anomaly_type_of ---------------------------------------------------------


@pytest.mark.parametrize(
    ("kind", "anomaly_type"),
    [
        ("model_degradation", "MODEL_DEGRADATION"),
        ("high_error_count", "HIGH_ERROR_COUNT"),
        ("session_stall", SESSION_STALL),
        ("a1_b2", "A1_B2"),
    ],
)
def test_anomaly_type_is_the_kind_upper_cased(kind: str, anomaly_type: str) -> None:
    assert anomaly_type_of(kind) == anomaly_type


# --- severity --------------------------------------------------------------


@pytest.mark.parametrize(
    ("current", "incoming", "expected"),
    [
        ("low", "low", "low"),
        ("low", "medium", "medium"),
        ("low", "high", "high"),
        ("medium", "low", "medium"),
        ("medium", "medium", "medium"),
        ("medium", "high", "high"),
        ("high", "low", "high"),
        ("high", "medium", "high"),
        ("high", "high", "high"),
    ],
)
def test_max_severity_only_ever_rises(
    current: Severity, incoming: Severity, expected: Severity
) -> None:
    assert max_severity(current, incoming) == expected


@pytest.mark.parametrize("committed", ["low", "medium", "high"])
def test_signal_without_active_detection_opens(committed: Severity) -> None:
    assert signal_change(None, committed) == "opened"


@pytest.mark.parametrize(
    ("previous", "committed"),
    [("low", "medium"), ("low", "high"), ("medium", "high")],
)
def test_signal_that_raises_severity_escalates(previous: Severity, committed: Severity) -> None:
    assert signal_change(previous, committed) == "escalated"


@pytest.mark.parametrize("severity", ["low", "medium", "high"])
def test_signal_with_unchanged_severity_repeats(severity: Severity) -> None:
    assert signal_change(severity, severity) == "repeated"


# --- late news -------------------------------------------------------------

RESOLVED_AT = datetime(2024, 5, 1, 12, 0, 0, tzinfo=UTC)


def test_signal_at_the_resolve_instant_is_late_news() -> None:
    assert is_late_news(RESOLVED_AT, RESOLVED_AT) is True


def test_signal_before_the_resolve_is_late_news() -> None:
    assert is_late_news(RESOLVED_AT - timedelta(microseconds=1), RESOLVED_AT) is True


def test_signal_after_the_resolve_is_not_late_news() -> None:
    assert is_late_news(RESOLVED_AT + timedelta(microseconds=1), RESOLVED_AT) is False


def test_late_news_compares_instants_not_wall_clocks() -> None:
    same_instant_elsewhere = RESOLVED_AT.astimezone(timezone(timedelta(hours=-5)))
    assert is_late_news(same_instant_elsewhere, RESOLVED_AT) is True
    one_second_later_elsewhere = (RESOLVED_AT + timedelta(seconds=1)).astimezone(
        timezone(timedelta(hours=9))
    )
    assert is_late_news(one_second_later_elsewhere, RESOLVED_AT) is False


# --- lifecycle -------------------------------------------------------------


@pytest.mark.parametrize("lifecycle", ["completed", "failed", "aborted"])
def test_terminal_lifecycles_end_the_session_in_their_own_status(lifecycle: Lifecycle) -> None:
    assert ended_status(lifecycle) == lifecycle


@pytest.mark.parametrize("lifecycle", ["spawned", "started", "heartbeat", "archived"])
def test_other_lifecycles_do_not_end_the_session(lifecycle: Lifecycle) -> None:
    assert ended_status(lifecycle) is None
