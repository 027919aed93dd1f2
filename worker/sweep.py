"""The stall sweep: silence is a signal nobody sends (contract section 4, last bullet)."""

from __future__ import annotations

import asyncio

import structlog

from worker import db, outbound
from worker.bus import Bus
from worker.connection import NATS_ERRORS
from worker.constants import SWEEP_BATCH, SWEEP_TICK_MAX_SECONDS, SWEEP_TICK_MIN_SECONDS
from worker.domain import SESSION_STALL, Severity, dedup_key
from worker.ids import uuid7
from worker.metrics import Metrics
from worker.partitions import Lane
from worker.retry import pause

log = structlog.get_logger("worker.sweep")

SCHEDULE = "stall_sweep"
STALL_SEVERITY: Severity = "medium"


class StallSweep:
    """Opens a SESSION_STALL detection for sessions silent longer than `stall_after_seconds`.

    Two guards keep it to one sweep per interval however many workers run: only
    the sweep leader ticks, and each run first claims the interval in the
    `schedules` table, so a leader elected just after another's run waits for
    the next interval instead of sweeping twice.
    """

    def __init__(
        self,
        prefix: str,
        bus: Bus,
        lanes: list[Lane],
        stall_after_seconds: float,
        interval_seconds: float,
        metrics: Metrics,
    ) -> None:
        self.prefix = prefix
        self.bus = bus
        self.lanes = lanes
        self.stall_after_seconds = stall_after_seconds
        self.interval_seconds = interval_seconds
        self.runs = 0
        self.metrics = metrics

    def __repr__(self) -> str:
        return f"<StallSweep runs={self.runs}>"

    async def duty(self, conn: db.Connection, stopping: asyncio.Event) -> None:
        tick = min(SWEEP_TICK_MAX_SECONDS, max(SWEEP_TICK_MIN_SECONDS, self.interval_seconds / 4))
        while not stopping.is_set():
            run = await db.claim_schedule(conn, SCHEDULE, self.interval_seconds)
            if run is not None:
                self.runs += 1
                self.metrics.sweeps.inc()
                await self.sweep(conn, run)
            await pause(stopping, tick)

    async def sweep(self, conn: db.Connection, run: int) -> list[str]:
        """One sweep; returns the ids of the stall detections it opened."""
        try:
            backlog = await self.bus.backlog_age(self.lanes)
        except NATS_ERRORS as err:
            # Unknown backlog: a stall reported now could be our own lag.
            log.warning("sweep", action="sweep.skipped", run=run, reason="nats", error=str(err))
            return []
        if backlog > self.stall_after_seconds:
            log.info(
                "sweep", action="sweep.skipped", run=run, reason="backlog", backlog_seconds=backlog
            )
            return []
        stalled = await db.stalled_sessions(
            conn, self.stall_after_seconds, SWEEP_BATCH, SESSION_STALL
        )
        opened: list[str] = []
        if stalled:
            candidates = [
                db.StallCandidate(session, dedup_key(SESSION_STALL, session, None), str(uuid7()))
                for session in stalled
            ]
            async with conn.transaction():
                detections = await db.open_stalls(
                    conn,
                    candidates,
                    anomaly_type=SESSION_STALL,
                    severity=STALL_SEVERITY,
                    stall_after_seconds=self.stall_after_seconds,
                )
                await db.enqueue_outbox(
                    conn,
                    [
                        outbound.detection_changed(self.prefix, "opened", dict(d), None)
                        for d in detections
                    ],
                )
            opened = [d.id for d in detections]
        log.info("sweep", action="sweep.ran", run=run, stalled=len(stalled), opened=len(opened))
        return opened
