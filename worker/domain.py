"""Domain rules of section 4 as plain functions: no I/O, tested without servers."""

from __future__ import annotations

import hashlib
from datetime import datetime
from enum import StrEnum
from typing import Literal

Severity = Literal["low", "medium", "high"]
SessionStatus = Literal["active", "completed", "failed", "aborted"]
Lifecycle = Literal["spawned", "started", "heartbeat", "completed", "failed", "aborted", "archived"]
DetectionChange = Literal["opened", "repeated", "escalated", "resolved"]
Resolution = Literal["acknowledged", "dismissed", "escalated", "fixed", "auto_resolved"]

LIFECYCLES: tuple[Lifecycle, ...] = (
    "spawned",
    "started",
    "heartbeat",
    "completed",
    "failed",
    "aborted",
    "archived",
)
SEVERITY_RANK: dict[str, int] = {"low": 0, "medium": 1, "high": 2}
# Most severe first, as listings and help texts show them.
SEVERITIES: tuple[Severity, ...] = ("high", "medium", "low")
SESSION_STALL = "SESSION_STALL"
DEDUP_KEY_VERSION = "v1"
_UNIT_SEPARATOR = "\x1f"


class DeadLetterReason(StrEnum):
    INVALID_JSON = "invalid_json"
    TOO_LARGE = "too_large"
    INVALID_EVENT = "invalid_event"
    UNKNOWN_SUBJECT = "unknown_subject"
    SUBJECT_MISMATCH = "subject_mismatch"
    SPOKE_MISMATCH = "spoke_mismatch"
    HANDLER_ERROR = "handler_error"


class DeadLetterError(Exception):
    """This message can never be applied: store it, announce it, terminate it."""

    def __init__(self, reason: DeadLetterReason, error: str) -> None:
        super().__init__(error)
        self.reason = reason
        self.error = error


def anomaly_type_of(kind: str) -> str:
    """A signal's subject token `model_degradation` names the anomaly `MODEL_DEGRADATION`."""
    return kind.upper()


def dedup_key(anomaly_type: str, session_id: str, fingerprint: str | None) -> str:
    """The contract's v1 recipe; severity and details are deliberately not part of it."""
    material = _UNIT_SEPARATOR.join(
        (DEDUP_KEY_VERSION, anomaly_type, session_id, fingerprint or "")
    )
    return hashlib.sha256(material.encode("utf-8")).hexdigest()


def max_severity(current: Severity, incoming: Severity) -> Severity:
    """Severity of an active detection only ever rises."""
    return incoming if SEVERITY_RANK[incoming] > SEVERITY_RANK[current] else current


def signal_change(previous: Severity | None, committed: Severity) -> DetectionChange:
    """What a signal did to the active detection of its key, from its severity before and after."""
    if previous is None:
        return "opened"
    return "escalated" if SEVERITY_RANK[committed] > SEVERITY_RANK[previous] else "repeated"


def is_late_news(occurred_at: datetime, resolved_at: datetime) -> bool:
    """A signal from no later than the resolve is about the resolved problem, not a new one."""
    return occurred_at <= resolved_at


def ended_status(lifecycle: Lifecycle) -> SessionStatus | None:
    """The terminal status a lifecycle event moves an active session to, if any."""
    if lifecycle == "completed":
        return "completed"
    if lifecycle == "failed":
        return "failed"
    if lifecycle == "aborted":
        return "aborted"
    return None
