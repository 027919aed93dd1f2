"""The names of the contract: subjects in and out (sections 3 and 5), the tokens a spoke
chooses, the streams, and the partition transform."""

from __future__ import annotations

import re
from dataclasses import dataclass

from worker.domain import LIFECYCLES, Lifecycle

# A spoke id, a session id (and a durable follower's name); a signal kind.
ID_PATTERN = r"[A-Za-z0-9_-]{1,128}"
KIND_PATTERN = r"[a-z][a-z0-9_]{0,63}"
_ID_RE = re.compile(ID_PATTERN)
_KIND_RE = re.compile(KIND_PATTERN)
# The stream stores partitioned events under this token, outside `P.spoke.>`,
# so that the consumer of `P.spoke.>` sees only what the transform left alone.
PARTITION_TOKEN = "part"
_PARTITION_FN_RE = re.compile(r"\{\{\s*partition\(\s*(\d+)\s*,")
_LIFECYCLE_OF: dict[str, Lifecycle] = {lc: lc for lc in LIFECYCLES}


@dataclass(frozen=True)
class Route:
    """Where an inbound event says it comes from and what it is."""

    spoke_id: str
    session_id: str
    lifecycle: Lifecycle | None = None
    signal_kind: str | None = None


def is_id(text: str) -> bool:
    return _ID_RE.fullmatch(text) is not None


def is_kind(text: str) -> bool:
    return _KIND_RE.fullmatch(text) is not None


def stream_token(prefix: str) -> str:
    """`PU`: the prefix upper-cased with everything outside [A-Z0-9] turned into `_`."""
    return re.sub(r"[^A-Z0-9]", "_", prefix.upper())


def events_stream(prefix: str) -> str:
    """The inbound stream of a hub: `HUB_EVENTS` for the prefix `hub`."""
    return f"{stream_token(prefix)}_EVENTS"


def out_stream(prefix: str) -> str:
    """The outbound stream of a hub: `HUB_OUT` for the prefix `hub`."""
    return f"{stream_token(prefix)}_OUT"


def inbound_subject(prefix: str, spoke_id: str, session_id: str, event: str) -> str:
    """Where a spoke publishes `event`: a lifecycle, or `signal_event(kind)`."""
    return f"{prefix}.spoke.{spoke_id}.session.{session_id}.{event}"


def signal_event(kind: str) -> str:
    """The last tokens of a signal's inbound subject."""
    return f"signal.{kind}"


def parse_inbound(prefix: str, subject: str) -> Route | None:
    """The route of an inbound subject as published, or None when it matches no row."""
    head = f"{prefix}.spoke."
    if not subject.startswith(head):
        return None
    tokens = subject[len(head) :].split(".")
    if len(tokens) < 4 or tokens[1] != "session":
        return None
    spoke_id, _, session_id, *rest = tokens
    if not (is_id(spoke_id) and is_id(session_id)):
        return None
    if len(rest) == 1 and (lifecycle := _LIFECYCLE_OF.get(rest[0])) is not None:
        return Route(spoke_id, session_id, lifecycle=lifecycle)
    if len(rest) == 2 and rest[0] == "signal" and is_kind(rest[1]):
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


def detection_change_filter(prefix: str, change: str) -> str:
    """What every subject of one kind of detection change begins with."""
    return f"{prefix}.detection.{change}."


def mapping_subject(prefix: str, status: str, session_id: str) -> str:
    return f"{prefix}.mapping.{status}.{session_id}"


def deadletter_subject(prefix: str, reason: str) -> str:
    return f"{prefix}.deadletter.{reason}"


def detection_capture(prefix: str) -> str:
    return f"{prefix}.detection.>"


def mapping_capture(prefix: str) -> str:
    return f"{prefix}.mapping.>"


def deadletter_capture(prefix: str) -> str:
    return f"{prefix}.deadletter.>"


def outbound_captures(prefix: str) -> list[str]:
    return [detection_capture(prefix), mapping_capture(prefix), deadletter_capture(prefix)]


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
