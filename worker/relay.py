"""The outbox relay: publishes committed outbound events to PU_OUT, in change order.

One worker at a time relays (leadership), so no row is published by two
workers at once and events of one detection or mapping keep their order.
It reads rows in id order, publishes each and waits for JetStream's ack
before the next (a later row must not land before an earlier one that
failed), and deletes rows only after their ack. A crash between ack and
delete republishes the row with the same Nats-Msg-Id, which the stream's
duplicate window drops.
"""

from __future__ import annotations

import asyncio
import time

import structlog

from worker import db
from worker.bus import NATS_ERRORS, Bus
from worker.constants import RECONNECT_MAX_SECONDS, RELAY_BATCH, RELAY_POLL_SECONDS
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
            done: list[int] = []
            try:
                for row in pending:
                    started = time.perf_counter()
                    await self.bus.publish(row.subject, row.payload, str(row.event_id))
                    self.metrics.publish_seconds.observe(time.perf_counter() - started)
                    self.metrics.published.labels(self._type_of(row.subject)).inc()
                    done.append(row.id)
            except NATS_ERRORS as err:
                log.warning(
                    "relay.publish_failed",
                    action="relay.publish",
                    error=str(err) or type(err).__name__,
                    published=len(done),
                    pending=len(pending) - len(done),
                )
                return False
            finally:
                await db.delete_outbox(conn, done)
                self.published += len(done)
