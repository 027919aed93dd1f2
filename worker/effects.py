"""What a batch of inbound events does to the hub's tables (contract section 4).

Load and lock what the events can touch, decide in memory (`worker.batch`, a
pure function), write the result set-based: a constant number of statements
per batch instead of a dozen per event. Runs in the caller's transaction;
the outbound events are written to the outbox in it too.
"""

from __future__ import annotations

from worker import db
from worker.batch import Plan, simulate
from worker.domain import anomaly_type_of, dedup_key
from worker.events import SignalEvent
from worker.intake import Intake


async def apply_batch(conn: db.Connection, prefix: str, intakes: list[Intake]) -> Plan:
    """Apply decoded events, in stream order, inside the caller's transaction."""
    signal_keys = {
        dedup_key(anomaly_type_of(i.route.signal_kind), i.event.session_id, i.event.fingerprint)
        for i in intakes
        if isinstance(i.event, SignalEvent) and i.route.signal_kind is not None
    }
    first_spokes: dict[str, str] = {}
    for intake in intakes:
        first_spokes.setdefault(intake.event.session_id, intake.event.spoke_id)
    snapshot = await db.load_snapshot(
        conn, [i.event.event_id for i in intakes], first_spokes, sorted(signal_keys)
    )
    plan = simulate(prefix, intakes, snapshot)
    await db.write_plan(conn, plan)
    return plan
