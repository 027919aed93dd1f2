"""Subjects in and out (contract sections 3 and 5), and the partition transform."""

from __future__ import annotations

import re
from dataclasses import dataclass

from worker.domain import LIFECYCLES, Lifecycle

_ID_RE = re.compile(r"[A-Za-z0-9_-]{1,128}")
_KIND_RE = re.compile(r"[a-z][a-z0-9_]{0,63}")
# The stream stores partitioned events under this token, outside `P.spoke.>`,
# so that the consumer of `P.spoke.>` sees only what the transform left alone.
PARTITION_TOKEN = "part"
_PARTITION_FN_RE = re.compile(r"\{\{\s*partition\(\s*(\d+)\s*,")


@dataclass(frozen=True)
class Route:
    """Where an inbound event says it comes from and what it is."""

    spoke_id: str
    session_id: str
    lifecycle: Lifecycle | None = None
    signal_kind: str | None = None


def parse_inbound(prefix: str, subject: str) -> Route | None:
    """The route of an inbound subject as published, or None when it matches no row."""
    head = f"{prefix}.spoke."
    if not subject.startswith(head):
        return None
    tokens = subject[len(head) :].split(".")
    if len(tokens) < 4 or tokens[1] != "session":
        return None
    spoke_id, _, session_id, *rest = tokens
    if not (_ID_RE.fullmatch(spoke_id) and _ID_RE.fullmatch(session_id)):
        return None
    if len(rest) == 1 and rest[0] in LIFECYCLES:
        lifecycle: Lifecycle = next(lc for lc in LIFECYCLES if lc == rest[0])
        return Route(spoke_id, session_id, lifecycle=lifecycle)
    if len(rest) == 2 and rest[0] == "signal" and _KIND_RE.fullmatch(rest[1]):
        return Route(spoke_id, session_id, signal_kind=rest[1])
    return None


def inbound_capture(prefix: str) -> str:
    return f"{prefix}.spoke.>"


def partition_transform(prefix: str, partitions: int) -> tuple[str, str]:
    """Source and destination of the stream's subject transform.

    Sessions are spread over `partitions` by their sessionId (wildcard 2), so
    every event of one session lands in one partition whichever spoke sent it.
    """
    source = f"{prefix}.spoke.*.session.*.>"
    destination = (
        f"{prefix}.{PARTITION_TOKEN}.{{{{partition({partitions},2)}}}}"
        f".spoke.{{{{wildcard(1)}}}}.session.{{{{wildcard(2)}}}}.>"
    )
    return source, destination


def partitions_of(destination: str | None) -> int:
    """The partition count of an existing stream's transform (0: not partitioned)."""
    if not destination:
        return 0
    match = _PARTITION_FN_RE.search(destination)
    return int(match.group(1)) if match else 0


def partition_filter(prefix: str, partition: int) -> str:
    return f"{prefix}.{PARTITION_TOKEN}.{partition}.>"


def as_published(prefix: str, stored: str) -> str:
    """The subject a spoke published, from the one the stream stored after its transform."""
    head = f"{prefix}.{PARTITION_TOKEN}."
    if stored.startswith(head):
        _, _, rest = stored[len(head) :].partition(".")
        return f"{prefix}.{rest}"
    return stored


def detection_subject(prefix: str, change: str, severity: str, anomaly_type: str) -> str:
    return f"{prefix}.detection.{change}.{severity}.{anomaly_type.lower()}"


def mapping_subject(prefix: str, status: str, session_id: str) -> str:
    return f"{prefix}.mapping.{status}.{session_id}"


def deadletter_subject(prefix: str, reason: str) -> str:
    return f"{prefix}.deadletter.{reason}"


def outbound_captures(prefix: str) -> list[str]:
    return [f"{prefix}.detection.>", f"{prefix}.mapping.>", f"{prefix}.deadletter.>"]


def resolve_command_subject(prefix: str) -> str:
    return f"{prefix}.cmd.detection.resolve"


def captured_by(filters: list[str], subject: str) -> bool:
    """Whether a subject matches one of these NATS subject filters (`*` one token, `>` the rest)."""
    tokens = subject.split(".")
    for pattern in filters:
        wanted = pattern.split(".")
        for n, token in enumerate(wanted):
            if token == ">":
                if len(tokens) > n:
                    return True
                break
            if n >= len(tokens) or (token != "*" and token != tokens[n]):
                break
        else:
            if len(wanted) == len(tokens):
                return True
    return False
