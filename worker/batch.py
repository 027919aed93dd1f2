"""What a batch of inbound events does to the hub's rows (contract section 4), as a pure function.

`simulate` takes the rows the batch's events can touch, loaded and locked by
`worker.effects`, and applies the events to them in stream order, exactly as
one-at-a-time application would: later events see what earlier ones did. It
returns the rows to write and the outbound events, which `worker.effects`
writes with a handful of set-based statements in one transaction. A batch of
one event is the per-message mode; it goes through the same code.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal
from uuid import UUID

from worker import outbound
from worker.domain import (
    SESSION_STALL,
    DeadLetterError,
    DeadLetterReason,
    Severity,
    anomaly_type_of,
    dedup_key,
    ended_status,
    is_late_news,
    max_severity,
    signal_change,
)
from worker.events import EndedEvent, SignalEvent, SpawnedEvent
from worker.ids import uuid7
from worker.intake import Intake
from worker.outbound import OutboxRow

Outcome = Literal[
    "applied",  # the event changed what it should
    "duplicate",  # its eventId was applied before: nothing changes
    "ignored",  # the session is archived: later events change nothing
    "conflict",  # a terminal event for an already terminal session: acked, logged, counted
    "late",  # a signal about an already resolved detection: counted on that row
]


@dataclass
class SessionRow:
    id: str
    spoke_id: str | None
    status: str = "active"
    last_activity_at: datetime | None = None
    ended_at: datetime | None = None
    archived_at: datetime | None = None
    metadata: dict[str, Any] | None = None


# A mapping row and a detection row list MappingState's and DetectionState's fields
# in the models' order: `worker.outbound` serializes their vars() as those models.
@dataclass
class MappingRow:
    id: str
    session_id: str
    spoke_id: str | None
    workspace_id: str | None
    parent_session_id: str | None
    task_id: str | None
    task: str | None
    status: str
    metadata: dict[str, Any] | None
    created_at: datetime
    updated_at: datetime


@dataclass
class DetectionRow:
    id: str
    session_id: str
    anomaly_type: str
    severity: Severity
    details: dict[str, Any] | None
    dedup_key: str
    occurrence_count: int
    created_at: datetime
    updated_at: datetime
    resolved_at: datetime | None = None
    resolved_by: str | None = None
    resolution: str | None = None


@dataclass
class Snapshot:
    """The rows a batch may touch, as committed before it (locked by the loader)."""

    now: datetime
    applied: set[UUID]
    sessions: dict[str, SessionRow]
    mappings: dict[str, MappingRow]  # by session id
    active: dict[str, DetectionRow]  # by dedup key: the active detections of its `Reach`
    newest_resolved: dict[str, DetectionRow]  # by dedup key, for the batch's signal keys
    # `active` by session, then dedup key: every lifecycle event looks for its session's
    # stall, and a scan of `active` each time grew with the batch's sessions. Both
    # change together, through `open` and `close` only.
    active_of: dict[str, dict[str, DetectionRow]] = field(init=False)

    def __post_init__(self) -> None:
        self.active_of = {}
        for row in self.active.values():
            self.active_of.setdefault(row.session_id, {})[row.dedup_key] = row

    def open(self, row: DetectionRow) -> None:
        self.active[row.dedup_key] = row
        self.active_of.setdefault(row.session_id, {})[row.dedup_key] = row

    def close(self, row: DetectionRow) -> None:
        del self.active[row.dedup_key]
        del self.active_of[row.session_id][row.dedup_key]


@dataclass
class _Repeated:
    """A `repeated` event not written yet: where it goes in the outbox and what it says."""

    position: int
    prefix: str
    # The DetectionRow's fields as of the event: a shallow copy will do, as a row's
    # fields are replaced, never changed in place.
    detection: dict[str, Any]
    causation: UUID
    # Made at the event, as it would be if written then: a batch's eventIds stay in
    # time order.
    event_id: UUID


# What holds a repeated event's place in Plan.outbound until it is written.
_UNWRITTEN = OutboxRow(UUID(int=0), "", b"", "")


@dataclass
class Plan:
    """What to write, and each event's outcome (a DeadLetterError when it cannot apply)."""

    outcomes: list[Outcome | DeadLetterError] = field(default_factory=list)
    ledger: list[UUID] = field(default_factory=list)
    spokes: set[str] = field(default_factory=set)
    workspaces: set[str] = field(default_factory=set)
    tasks: set[str] = field(default_factory=set)
    parent_sessions: set[str] = field(default_factory=set)
    sessions: dict[str, SessionRow] = field(default_factory=dict)
    new_mappings: dict[str, MappingRow] = field(default_factory=dict)
    changed_mappings: dict[str, MappingRow] = field(default_factory=dict)
    new_detections: dict[str, DetectionRow] = field(default_factory=dict)
    changed_detections: dict[str, DetectionRow] = field(default_factory=dict)
    outbound: list[OutboxRow] = field(default_factory=list)
    # The last `repeated` event per detection id, while nothing else was published
    # for it since: the next one replaces it (contract section 5: occurrenceCount is
    # a gauge). Kept unwritten, as the detection was then, until it cannot be
    # replaced any more (`_write_repeated`): in a drain about half of them never are.
    _repeated: dict[str, _Repeated] = field(default_factory=dict)

    def publish_detection(
        self,
        prefix: str,
        change: Literal["opened", "repeated", "escalated", "resolved"],
        row: DetectionRow,
        causation: UUID,
        previous: Severity | None = None,
    ) -> None:
        pending = self._repeated.pop(row.id, None)
        if change == "repeated":
            if pending is None:
                position = len(self.outbound)
                self.outbound.append(_UNWRITTEN)
            else:
                position = pending.position
            self._repeated[row.id] = _Repeated(
                position, prefix, dict(vars(row)), causation, uuid7()
            )
            return
        if pending is not None:
            self._write_repeated(pending)
        self.outbound.append(
            outbound.detection_changed(prefix, change, vars(row), causation, previous)
        )

    def written(self) -> Plan:
        """The plan with every outbound event written: what `simulate` returns."""
        for pending in self._repeated.values():
            self._write_repeated(pending)
        self._repeated.clear()
        return self

    def _write_repeated(self, pending: _Repeated) -> None:
        self.outbound[pending.position] = outbound.detection_changed(
            pending.prefix,
            "repeated",
            pending.detection,
            pending.causation,
            event_id=pending.event_id,
        )

    def publish_mapping(
        self, prefix: str, row: MappingRow, previous: str | None, causation: UUID
    ) -> None:
        self.outbound.append(outbound.mapping_changed(prefix, vars(row), previous, causation))


@dataclass(frozen=True)
class Reach:
    """The active detections a batch can touch, which are all it loads and locks, and
    the keys whose newest resolved detection late news counts on.

    Not every active detection of the batch's sessions: a long-lived session keeps
    one per anomaly type and fingerprint, and a batch that loaded and locked all of
    them (a row lock writes the row's page) cost more the longer its sessions lived.
    `simulate` touches an active detection only through
    - a signal, by its dedup key (`keys`);
    - a lifecycle event, which ends its session's stalls: the active SESSION_STALL
      detections of the session, the sweep's and any a spoke signalled with a
      fingerprint (`stalls_of`);
    - archived, which resolves every active detection of its session (`all_of`).
    """

    keys: list[str]
    stalls_of: list[str]
    all_of: list[str]


def reach(intakes: list[Intake]) -> Reach:
    """What `simulate(…, intakes, …)` can touch; sorted, each once."""
    keys: set[str] = set()
    stalls_of: set[str] = set()
    all_of: set[str] = set()
    for intake in intakes:
        event, route = intake.event, intake.route
        if isinstance(event, SignalEvent):
            assert route.signal_kind is not None
            kind = anomaly_type_of(route.signal_kind)
            keys.add(dedup_key(kind, event.session_id, event.fingerprint))
        elif route.lifecycle == "archived":
            all_of.add(event.session_id)
        else:
            stalls_of.add(event.session_id)
    return Reach(sorted(keys), sorted(stalls_of - all_of), sorted(all_of))


def simulate(prefix: str, intakes: list[Intake], snapshot: Snapshot) -> Plan:
    """Apply `intakes` in order to `snapshot` (which it changes) and plan the writes."""
    plan = Plan()
    seen = set(snapshot.applied)
    for intake in intakes:
        try:
            plan.outcomes.append(_apply(prefix, intake, snapshot, plan, seen))
        except DeadLetterError as rejected:
            plan.outcomes.append(rejected)
    return plan.written()


def _apply(prefix: str, intake: Intake, snap: Snapshot, plan: Plan, seen: set[UUID]) -> Outcome:
    event, route = intake.event, intake.route
    if event.event_id in seen:
        return "duplicate"

    session = snap.sessions.get(event.session_id)
    if session is None:
        session = snap.sessions[event.session_id] = SessionRow(event.session_id, event.spoke_id)
        plan.spokes.add(event.spoke_id)
    elif session.spoke_id is None:
        # First seen as someone's parent: its own first event claims it.
        session.spoke_id = event.spoke_id
        plan.spokes.add(event.spoke_id)
    elif session.spoke_id != event.spoke_id:
        # Not recorded as applied: it can be replayed once the cause is fixed.
        raise DeadLetterError(
            DeadLetterReason.SPOKE_MISMATCH,
            f"session {event.session_id!r} belongs to spoke {session.spoke_id!r}, "
            f"not {event.spoke_id!r}",
        )
    seen.add(event.event_id)
    plan.ledger.append(event.event_id)
    plan.sessions[session.id] = session
    if session.archived_at is not None:
        return "ignored"

    now = snap.now
    happened = min(event.occurred_at, now)  # a fast spoke clock counts as now
    if session.last_activity_at is None or happened > session.last_activity_at:
        session.last_activity_at = happened
    if event.metadata is not None:
        session.metadata = event.metadata

    causation = event.event_id
    if isinstance(event, SignalEvent):
        assert route.signal_kind is not None
        return _signal(prefix, event, route.signal_kind, snap, plan)

    # Any lifecycle event shows the session is alive: its stall is over.
    _auto_resolve(prefix, snap, plan, session.id, causation, SESSION_STALL)
    outcome: Outcome = "applied"
    mapping = snap.mappings.get(session.id)

    if isinstance(event, SpawnedEvent):
        if mapping is None:
            # A terminal event may have overtaken spawned; the mapping is then born terminal.
            mapping = MappingRow(
                id=str(uuid7()),
                session_id=session.id,
                spoke_id=event.spoke_id,
                workspace_id=event.workspace_id,
                parent_session_id=event.parent_session_id,
                task_id=event.task_id,
                task=event.task,
                status=session.status,
                metadata=event.metadata,
                created_at=now,
                updated_at=now,
            )
            snap.mappings[session.id] = plan.new_mappings[session.id] = mapping
            for reference, into in (
                (event.workspace_id, plan.workspaces),
                (event.task_id, plan.tasks),
                (event.parent_session_id, plan.parent_sessions),
            ):
                if reference is not None:
                    into.add(reference)
            plan.publish_mapping(prefix, mapping, None, causation)

    elif isinstance(event, EndedEvent):
        assert route.lifecycle is not None
        status = ended_status(route.lifecycle)
        assert status is not None
        if session.status != "active":
            outcome = "conflict"  # terminal never changes again
        else:
            session.status = status
            session.ended_at = happened
            _end_mapping(prefix, snap, plan, mapping, status, causation)

    elif route.lifecycle == "archived":
        session.archived_at = happened
        if session.status == "active":
            session.status = "aborted"
            session.ended_at = session.ended_at or happened
        _end_mapping(prefix, snap, plan, mapping, "aborted", causation)
        _auto_resolve(prefix, snap, plan, session.id, causation)

    return outcome


def _end_mapping(
    prefix: str,
    snap: Snapshot,
    plan: Plan,
    mapping: MappingRow | None,
    status: str,
    causation: UUID,
) -> None:
    if mapping is None or mapping.status != "active":
        return
    mapping.status = status
    mapping.updated_at = snap.now
    if mapping.session_id not in plan.new_mappings:
        plan.changed_mappings[mapping.session_id] = mapping
    plan.publish_mapping(prefix, mapping, "active", causation)


def _auto_resolve(
    prefix: str,
    snap: Snapshot,
    plan: Plan,
    session_id: str,
    causation: UUID,
    anomaly_type: str | None = None,
) -> None:
    """Resolve a session's active detections (of one type, or all) as auto_resolved."""
    ending = [
        row
        for row in snap.active_of.get(session_id, {}).values()
        if anomaly_type in (None, row.anomaly_type)
    ]
    for row in sorted(ending, key=lambda r: (r.created_at, r.id)):
        snap.close(row)
        row.resolved_at = snap.now
        row.resolved_by = None
        row.resolution = "auto_resolved"
        row.updated_at = snap.now
        snap.newest_resolved[row.dedup_key] = row
        _touch(plan, row)
        plan.publish_detection(prefix, "resolved", row, causation)


def _signal(prefix: str, event: SignalEvent, kind: str, snap: Snapshot, plan: Plan) -> Outcome:
    anomaly_type = anomaly_type_of(kind)
    key = dedup_key(anomaly_type, event.session_id, event.fingerprint)
    causation = event.event_id
    now = snap.now
    active = snap.active.get(key)
    if active is None:
        resolved = snap.newest_resolved.get(key)
        if (
            resolved is not None
            and resolved.resolved_at is not None
            and is_late_news(event.occurred_at, resolved.resolved_at)
        ):
            resolved.occurrence_count += 1
            resolved.updated_at = now
            _touch(plan, resolved)
            # So that the last event of the detection carries its committed
            # occurrence count (it stays resolved).
            plan.publish_detection(prefix, "repeated", resolved, causation)
            return "late"
        opened = DetectionRow(
            id=str(uuid7()),
            session_id=event.session_id,
            anomaly_type=anomaly_type,
            severity=event.severity,
            details=event.details,
            dedup_key=key,
            occurrence_count=1,
            created_at=now,
            updated_at=now,
        )
        plan.new_detections[opened.id] = opened
        snap.open(opened)
        plan.publish_detection(prefix, "opened", opened, causation)
        return "applied"

    previous = active.severity
    active.occurrence_count += 1
    active.severity = max_severity(previous, event.severity)
    active.details = event.details
    active.updated_at = now
    _touch(plan, active)
    change = signal_change(previous, active.severity)
    plan.publish_detection(
        prefix, change, active, causation, previous if change == "escalated" else None
    )
    return "applied"


def _touch(plan: Plan, row: DetectionRow) -> None:
    if row.id not in plan.new_detections:
        plan.changed_detections[row.id] = row
