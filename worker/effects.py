"""What a batch of inbound events does to the hub's tables (contract section 4).

Load and lock what the events can touch, decide in memory (`worker.batch`, a
pure function), write the result set-based: a constant number of statements
per batch instead of a dozen per event. Runs in the caller's transaction;
the outbound events are written to the outbox in it too.
"""

from __future__ import annotations

from worker import db
from worker.batch import Plan, reach, simulate
from worker.intake import Intake


async def apply_batch(conn: db.Connection, prefix: str, intakes: list[Intake]) -> Plan:
    """Apply decoded events, in stream order, inside the caller's transaction."""
    first_spokes: dict[str, str] = {}
    for intake in intakes:
        first_spokes.setdefault(intake.event.session_id, intake.event.spoke_id)
    snapshot = await db.load_snapshot(
        conn, [i.event.event_id for i in intakes], first_spokes, reach(intakes)
    )
    plan = simulate(prefix, intakes, snapshot)
    await db.write_plan(conn, plan)
    return plan
