"""Retention of the once-only ledger (contract section 4, last bullet)."""

from __future__ import annotations

import asyncio

import structlog

from worker import db
from worker.constants import MAINTENANCE_INTERVAL_SECONDS, PURGE_BATCH_ROWS
from worker.retry import pause

log = structlog.get_logger("worker.maintenance")


class LedgerJanitor:
    """Deletes ledger rows older than the streams' max age.

    The stream can redeliver or a publisher republish a message for as long as
    the stream keeps it, so an eventId must be remembered at least that long;
    a margin of one duplicate window more is kept on top.
    """

    def __init__(self, retention_seconds: float) -> None:
        self.retention_seconds = retention_seconds

    async def duty(self, conn: db.Connection, stopping: asyncio.Event) -> None:
        while not stopping.is_set():
            purged = 0
            while (
                deleted := await db.purge_ledger(conn, self.retention_seconds, PURGE_BATCH_ROWS)
            ) > 0:
                purged += deleted
                if stopping.is_set():
                    break
            if purged:
                log.info("ledger.purged", action="ledger.purge", rows=purged)
            await pause(stopping, MAINTENANCE_INTERVAL_SECONDS)
