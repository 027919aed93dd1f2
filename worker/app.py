"""The worker process: wires the database, NATS, the lanes and the leader duties."""

from __future__ import annotations

import asyncio

import structlog

from worker import db
from worker.bus import Bus, lanes
from worker.commands import ResolveCommand
from worker.config import Settings
from worker.constants import (
    COMMAND_POOL_SIZE,
    DUPLICATE_WINDOW_SECONDS,
    RECONNECT_BASE_SECONDS,
    RECONNECT_MAX_SECONDS,
)
from worker.domain import retry_delay
from worker.handler import MessageHandler
from worker.lanes import LaneManager
from worker.leadership import Duty, close_quietly, lead, pause
from worker.locks import MAINTENANCE_LEADER, RELAY_LEADER, SWEEP_LEADER, namespace
from worker.maintenance import LedgerJanitor
from worker.relay import OutboxRelay
from worker.sweep import StallSweep

log = structlog.get_logger("worker.app")


async def migrate(dsn: str, stopping: asyncio.Event | None = None) -> list[str]:
    """Apply pending migrations, waiting for the database if it is not up yet."""
    attempt = 0
    while True:
        attempt += 1
        try:
            conn = await db.connect(dsn, application_name="hub-worker:migrate")
        except db.CONNECTION_ERRORS as err:
            if stopping is not None and stopping.is_set():
                raise
            delay = retry_delay(attempt, RECONNECT_BASE_SECONDS, RECONNECT_MAX_SECONDS)
            log.warning("database.unreachable", action="migrate", error=str(err), retry_in=delay)
            await asyncio.sleep(delay)
            continue
        try:
            applied = await db.migrate(conn)
        finally:
            await close_quietly(conn)
        log.info("migrated", action="migrate", applied=applied)
        return applied


class Worker:
    """One hub-worker process.

    Parameters:
        settings: validated configuration (contract section 1).
        database_url: DSN of PostgreSQL (the embedded one's when none was configured).
        nats_urls: NATS servers (the embedded one's when none was configured).

    `run(stopping)` applies migrations, ensures the streams and consumers,
    then processes events until `stopping` is set; it returns after the
    lanes finished the message in hand and the relay flushed the outbox.
    If one of its tasks dies unexpectedly, it stops the others and raises.
    """

    def __init__(self, settings: Settings, database_url: str, nats_urls: list[str]) -> None:
        self.settings = settings
        self.database_url = database_url
        self.nats_urls = nats_urls
        self.lane_manager: LaneManager | None = None
        self.relay: OutboxRelay | None = None
        self.sweep: StallSweep | None = None

    def __repr__(self) -> str:
        return (
            f"<Worker prefix={self.settings.subject_prefix!r} {self.lane_manager!r} {self.relay!r}>"
        )

    async def run(self, stopping: asyncio.Event) -> None:
        s = self.settings
        await migrate(self.database_url)
        bus = await Bus.connect(s, self.nats_urls)
        try:
            partitions = await self._ensure_topology(bus, stopping)
            lock_namespace = namespace(s.subject_prefix)
            self.lane_manager = LaneManager(
                self.database_url,
                bus,
                MessageHandler(s.subject_prefix),
                lock_namespace,
                lanes(s.subject_prefix, partitions),
            )
            self.relay = OutboxRelay(bus)
            self.sweep = StallSweep(
                s.subject_prefix,
                bus,
                lanes(s.subject_prefix, partitions),
                s.stall_after_seconds,
                s.sweep_interval_seconds,
            )
            janitor = LedgerJanitor(s.stream_max_age_seconds + DUPLICATE_WINDOW_SECONDS)
            pool = await db.create_pool(self.database_url, max_size=COMMAND_POOL_SIZE)
            resolve = ResolveCommand(s.subject_prefix, bus, pool)
            await resolve.start()
            lanes_stopping = asyncio.Event()
            duties_stopping = asyncio.Event()

            def duty(role: str, key: int, body: Duty) -> asyncio.Task[None]:
                return asyncio.create_task(
                    lead(role, self.database_url, lock_namespace, key, body, duties_stopping),
                    name=role,
                )

            tasks = {
                asyncio.create_task(self.lane_manager.run(lanes_stopping), name="lanes"),
                duty("relay", RELAY_LEADER, self.relay.duty),
                duty("sweep", SWEEP_LEADER, self.sweep.duty),
                duty("maintenance", MAINTENANCE_LEADER, janitor.duty),
            }
            log.info(
                "worker.started",
                action="worker.start",
                prefix=s.subject_prefix,
                partitions=partitions,
                events_stream=s.events_stream,
                out_stream=s.out_stream,
            )
            stop_waiter = asyncio.create_task(stopping.wait())
            done, _ = await asyncio.wait({stop_waiter, *tasks}, return_when="FIRST_COMPLETED")
            stop_waiter.cancel()
            failed = [t for t in done if t is not stop_waiter]
            # Commands and lanes first (finish what is in hand), then the relay
            # flushes what they committed.
            await resolve.stop()
            lanes_stopping.set()
            await asyncio.gather(
                *(t for t in tasks if t.get_name() == "lanes"), return_exceptions=True
            )
            duties_stopping.set()
            await asyncio.gather(*tasks, return_exceptions=True)
            await pool.close()
            for task in failed:
                error = task.exception() if not task.cancelled() else None
                raise RuntimeError(f"worker task {task.get_name()} stopped unexpectedly") from error
            log.info("worker.stopped", action="worker.stop")
        finally:
            await bus.close()

    async def _ensure_topology(self, bus: Bus, stopping: asyncio.Event) -> int:
        attempt = 0
        while True:
            attempt += 1
            try:
                partitions = await bus.ensure_streams()
                for lane in lanes(self.settings.subject_prefix, partitions):
                    await bus.ensure_consumer(lane)
                return partitions
            except Exception as err:  # JetStream not ready yet, or NATS away
                if attempt >= 30:
                    raise
                delay = retry_delay(attempt, RECONNECT_BASE_SECONDS, RECONNECT_MAX_SECONDS)
                log.warning(
                    "streams.not_ready", action="stream.ensure", error=str(err), retry_in=delay
                )
                await pause(stopping, delay)
