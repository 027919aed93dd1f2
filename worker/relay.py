"""The outbox relay: publishes committed outbound events to PU_OUT, in change order.

One worker at a time relays (leadership), so no row is published by two
workers at once. Rows are read in id order and published in windows: a
`repeated` event followed by another of its detection is skipped (they may
coalesce, contract section 5), and a window holds consecutive rows of distinct aggregates (a detection, a mapping),
all sent at once on one connection (so they are stored in that order) with
their acks awaited together. A row that fails is retried before anything
after it of its aggregate is sent, because the window ends where an
aggregate repeats: events of one detection or mapping keep their order even
when a publish fails. Rows are deleted only after their ack; a crash between
ack and delete republishes with the same Nats-Msg-Id, which the stream's
duplicate window drops.
"""

from __future__ import annotations

import asyncio
import time

import structlog

from worker import db
from worker.bus import Bus
from worker.constants import RECONNECT_MAX_SECONDS, RELAY_BATCH, RELAY_POLL_SECONDS, RELAY_WINDOW
from worker.leadership import pause
from worker.metrics import Metrics

log = structlog.get_logger("worker.relay")

NOTIFY_CHANNEL = "hub_worker_outbox"


class OutboxRelay:
    def __init__(self, bus: Bus, prefix: str, metrics: Metrics) -> None:
        self.bus = bus
        self.prefix = prefix
        self.metrics = metrics
        self.published = 0

    def __repr__(self) -> str:
        return f"<OutboxRelay published={self.published}>"

    async def duty(self, conn: db.Connection, stopping: asyncio.Event) -> None:
        """Relay until `stopping`, then flush what is left and return."""
        wake = asyncio.Event()

        def on_notify(*_: object) -> None:
            wake.set()

        # Losing a delete in a crash only republishes an event with the same
        # Nats-Msg-Id, so the relay's own commits need not wait for the disk.
        await db.relax_durability(conn)
        await conn.add_listener(NOTIFY_CHANNEL, on_notify)
        try:
            while not stopping.is_set():
                wake.clear()
                if not await self.drain(conn):
                    # NATS is not taking publishes: wait before trying again.
                    await pause(stopping, RECONNECT_MAX_SECONDS)
                    continue
                waiter = asyncio.create_task(wake.wait())
                stopper = asyncio.create_task(stopping.wait())
                # Polling covers a lost notification (e.g. across a reconnect).
                await asyncio.wait(
                    {waiter, stopper}, timeout=RELAY_POLL_SECONDS, return_when="FIRST_COMPLETED"
                )
                waiter.cancel()
                stopper.cancel()
            await self.drain(conn)
        finally:
            if not conn.is_closed():
                await conn.remove_listener(NOTIFY_CHANNEL, on_notify)

    def _type_of(self, subject: str) -> str:
        """`detection.opened`, `mapping.completed`, `deadletter`... from an outbound subject."""
        tokens = subject[len(self.prefix) + 1 :].split(".")
        return tokens[0] if tokens[0] == "deadletter" else ".".join(tokens[:2])

    async def drain(self, conn: db.Connection) -> bool:
        """Publish pending rows until none is left; False if NATS refused one."""
        while True:
            pending = await db.pending_outbox(conn, RELAY_BATCH)
            if not pending:
                return True
            superseded = _superseded(pending, self.prefix)
            done = [r.id for r in pending if r.id in superseded]
            refused = False
            try:
                for window in _windows([r for r in pending if r.id not in superseded]):
                    published = await self._publish(window)
                    done.extend(published)
                    if len(published) < len(window):
                        refused = True
                        break
            finally:
                await db.delete_outbox(conn, done)
                self.published += len(done) - len(superseded)
            if refused:
                return False

    async def _publish(self, window: list[db.PendingOutbound]) -> list[int]:
        """Send a window at once; the ids of the rows JetStream acknowledged."""
        started = time.perf_counter()
        results = await self.bus.publish_window(
            [(r.subject, r.payload, str(r.event_id)) for r in window]
        )
        self.metrics.publish_seconds.observe(time.perf_counter() - started)
        done = []
        for row, error in zip(window, results, strict=True):
            if error is not None:
                log.warning(
                    "relay.publish_failed",
                    action="relay.publish",
                    error=str(error) or type(error).__name__,
                    subject=row.subject,
                )
                continue
            self.metrics.published.labels(self._type_of(row.subject)).inc()
            done.append(row.id)
        return done


def _superseded(rows: list[db.PendingOutbound], prefix: str) -> set[int]:
    """`repeated` events followed, in these rows, by another `repeated` of their detection.

    Contract section 5 lets repeated events coalesce (occurrenceCount is a
    gauge): the later one carries everything the earlier one said.
    """
    repeated = f"{prefix}.detection.repeated."
    dropped: set[int] = set()
    last_repeated: dict[str, int] = {}
    for row in rows:
        earlier = last_repeated.pop(row.aggregate, None)
        if row.subject.startswith(repeated):
            if earlier is not None:
                dropped.add(earlier)
            last_repeated[row.aggregate] = row.id
    return dropped


def _windows(rows: list[db.PendingOutbound]) -> list[list[db.PendingOutbound]]:
    """Consecutive runs of rows with distinct aggregates, at most RELAY_WINDOW long."""
    windows: list[list[db.PendingOutbound]] = []
    current: list[db.PendingOutbound] = []
    aggregates: set[str] = set()
    for row in rows:
        if len(current) >= RELAY_WINDOW or row.aggregate in aggregates:
            windows.append(current)
            current, aggregates = [], set()
        current.append(row)
        aggregates.add(row.aggregate)
    if current:
        windows.append(current)
    return windows
