"""The worker process: wires the database, NATS, the lanes and the leader duties."""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime

import structlog
from nats.js.api import ConsumerInfo

from worker import db, schema
from worker.bus import Bus, age_seconds
from worker.commands import ResolveCommand
from worker.config import Settings
from worker.connection import NATS_ERRORS, Stopped
from worker.constants import (
    COMMAND_POOL_SIZE,
    CONSUMER_STALE_SECONDS,
    DUPLICATE_WINDOW_SECONDS,
    LANE_STUCK_AFTER_SECONDS,
    METRICS_SAMPLE_SECONDS,
    READINESS_QUERY_SECONDS,
    RECONNECT_BASE_SECONDS,
    RECONNECT_MAX_SECONDS,
    RELAY_STALL_SECONDS,
)
from worker.handler import MessageHandler
from worker.lanes import LaneManager
from worker.leadership import Duty, close_quietly, lead
from worker.locks import MAINTENANCE_LEADER, RELAY_LEADER, SWEEP_LEADER, namespace
from worker.maintenance import LedgerJanitor
from worker.metrics import Metrics
from worker.partitions import Lane, lanes
from worker.probes import Checks, ProbeServer
from worker.progress import CatchUp
from worker.relay import OutboxRelay
from worker.retry import Backoff, pause
from worker.sweep import StallSweep

log = structlog.get_logger("worker.app")


async def migrate(
    dsn: str, stopping: asyncio.Event | None = None, runtime_role: str | None = None
) -> list[str]:
    """Apply pending migrations, waiting for the database if it is not up yet.

    With `runtime_role`, grant it the runtime rights afterwards (sql/grants.sql).
    With `stopping` (inside `run`), a role that may not apply pending
    migrations waits for the owner to apply them; without it, it fails.
    """
    backoff = Backoff(RECONNECT_BASE_SECONDS, RECONNECT_MAX_SECONDS, stopping=stopping)
    while True:
        try:
            conn = await db.connect(dsn, application_name="hub-worker:migrate", bounded=False)
        except db.CONNECTION_ERRORS as err:
            await _wait_to_retry("database.unreachable", err, backoff)
            continue
        try:
            applied = await schema.migrate(conn)
            if runtime_role is not None:
                await schema.grant_runtime(conn, runtime_role)
        except schema.MigrationsPending as err:
            if stopping is None:
                raise
            await _wait_to_retry("database.migrations_pending", err, backoff)
            continue
        finally:
            await close_quietly(conn)
        log.info("migrated", action="migrate", applied=applied, granted_to=runtime_role)
        return applied


async def _wait_to_retry(event: str, err: Exception, backoff: Backoff) -> None:
    """Log why, wait the backoff (cut short by its stop); raise Stopped if asked to stop."""
    stopping = backoff.stopping
    if stopping is not None and stopping.is_set():
        raise Stopped from err
    delay = backoff.failed()
    log.warning(event, action="migrate", error=str(err), retry_in=delay)
    await backoff.sleep(delay)
    if stopping is not None and stopping.is_set():
        raise Stopped from err


class Worker:
    """One hub-worker process.

    Parameters:
        settings: validated configuration (contract section 1).
        database_url: DSN of PostgreSQL (the embedded one's when none was configured).
        nats_urls: NATS servers (the embedded one's when none was configured).

    `run(stopping)` applies migrations, ensures the streams and consumers,
    then processes events until `stopping` is set; it returns after the
    lanes finished the batch each had fetched and the relay flushed the outbox, or
    when `settings.shutdown_grace_seconds` ran out. If one of its tasks dies
    unexpectedly, it stops the others and raises (the process exits non-zero
    rather than run half-dead).
    """

    def __init__(self, settings: Settings, database_url: str, nats_urls: list[str]) -> None:
        self.settings = settings
        self.database_url = database_url
        self.nats_urls = nats_urls
        self.metrics = Metrics()
        self.bus: Bus | None = None
        self.pool: db.Pool | None = None
        self.lane_manager: LaneManager | None = None
        self.relay: OutboxRelay | None = None
        self.sweep: StallSweep | None = None
        self.tasks: set[asyncio.Task[None]] = set()
        self.consumers_seen_at: float | None = None
        # The relay's progress as every replica sees it in the database: the oldest
        # outbox row (its id), since when it has been the oldest, and the backlog.
        self.relay_stall_seconds = RELAY_STALL_SECONDS
        self.outbox_head: int | None = None
        self.outbox_head_since = time.monotonic()
        self.outbox_rows = 0
        # None until sampled.
        self.out_stream_missing: bool | None = None
        self.catch_up = CatchUp()

    def __repr__(self) -> str:
        return (
            f"<Worker prefix={self.settings.subject_prefix!r} {self.lane_manager!r} {self.relay!r}>"
        )

    async def run(self, stopping: asyncio.Event) -> None:
        s = self.settings
        probes = None
        if s.http_addr:
            probes = ProbeServer(s.http_addr, self.liveness, self.readiness, self.metrics.render)
            await probes.start()
        try:
            try:
                await migrate(self.database_url, stopping, s.database_runtime_role)
                self.bus = bus = await Bus.connect(s, self.nats_urls, stopping=stopping)
            except Stopped:
                # Asked to stop while still waiting for a server: nothing to drain.
                log.info("worker.stopped", action="worker.stop", before="servers answered")
                return
            try:
                await self._serve(bus, stopping)
            finally:
                await bus.close()
        finally:
            if probes is not None:
                await probes.stop()

    async def _serve(self, bus: Bus, stopping: asyncio.Event) -> None:
        s = self.settings
        partitions = await self._ensure_topology(bus, stopping)
        all_lanes = lanes(s.subject_prefix, partitions)
        lock_namespace = namespace(s.subject_prefix)
        self.relay = relay = OutboxRelay(bus, s.subject_prefix, self.metrics)
        self.lane_manager = lane_manager = LaneManager(
            self.database_url,
            bus,
            MessageHandler(s.subject_prefix, self.metrics, bus.nc.max_payload, relay.wake),
            lock_namespace,
            all_lanes,
            self.metrics,
            s.batch_max,
            s.lane_turns,
        )
        self.sweep = StallSweep(
            s.subject_prefix,
            bus,
            all_lanes,
            s.stall_after_seconds,
            s.sweep_interval_seconds,
            self.metrics,
        )
        janitor = LedgerJanitor(s.stream_max_age_seconds + DUPLICATE_WINDOW_SECONDS)
        self.pool = pool = await db.create_pool(self.database_url, max_size=COMMAND_POOL_SIZE)
        resolve = ResolveCommand(s.subject_prefix, bus, pool)
        await resolve.start()
        lanes_stopping = asyncio.Event()
        duties_stopping = asyncio.Event()

        def duty(role: str, key: int, body: Duty) -> asyncio.Task[None]:
            return asyncio.create_task(
                lead(
                    role,
                    self.database_url,
                    lock_namespace,
                    key,
                    body,
                    duties_stopping,
                    # Tagged as the lanes are: a peer ends a hung leader with them.
                    application_name=lane_manager.application_name(role),
                ),
                name=role,
            )

        lane_task = asyncio.create_task(self.lane_manager.run(lanes_stopping), name="lanes")
        self.tasks = {
            lane_task,
            duty("relay", RELAY_LEADER, relay.duty),
            duty("sweep", SWEEP_LEADER, self.sweep.duty),
            duty("maintenance", MAINTENANCE_LEADER, janitor.duty),
            asyncio.create_task(self._sample(all_lanes, duties_stopping), name="sampler"),
            asyncio.create_task(bus.until_unusable(duties_stopping), name="nats"),
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
        done, _ = await asyncio.wait({stop_waiter, *self.tasks}, return_when="FIRST_COMPLETED")
        stop_waiter.cancel()
        failed = [t for t in self.tasks if t in done]
        try:
            async with asyncio.timeout(s.shutdown_grace_seconds):
                # Commands and lanes first (each finishes the batch it fetched, or
                # gives it back), then the relay flushes what they committed.
                await resolve.stop()
                lanes_stopping.set()
                await asyncio.gather(lane_task, return_exceptions=True)
                duties_stopping.set()
                await asyncio.gather(*self.tasks, return_exceptions=True)
        except TimeoutError:
            log.warning(
                "worker.grace_expired",
                action="worker.stop",
                grace_seconds=s.shutdown_grace_seconds,
            )
            for task in self.tasks:
                task.cancel()
            await asyncio.gather(*self.tasks, return_exceptions=True)
        await pool.close()
        for task in failed:
            error = task.exception() if not task.cancelled() else None
            because = f": {type(error).__name__}: {error}" if error is not None else ""
            raise RuntimeError(
                f"worker task {task.get_name()} stopped unexpectedly{because}"
            ) from error
        log.info("worker.stopped", action="worker.stop")

    def liveness(self) -> Checks:
        """The process is alive and none of its loops has died."""
        dead = [t.get_name() for t in self.tasks if t.done()]
        return {"loops": "ok" if not dead else f"stopped: {', '.join(sorted(dead))}"}

    def relay_stalled_for(self) -> float:
        """Seconds the oldest outbox row has stayed the oldest (0: the outbox is empty)."""
        if self.outbox_head is None:
            return 0.0
        return time.monotonic() - self.outbox_head_since

    async def readiness(self) -> Checks:
        """NATS connected, the consumers answered recently, the lanes this worker owns
        move, PostgreSQL answers, the relay moves, the outbound stream exists."""
        checks: Checks = {}
        bus = self.bus
        checks["nats"] = "ok" if bus is not None and bus.nc.is_connected else "not connected"
        seen = self.consumers_seen_at
        fresh = seen is not None and time.monotonic() - seen < CONSUMER_STALE_SECONDS
        checks["consumer"] = (
            "ok" if fresh else "no consumer info in the last " + (f"{CONSUMER_STALE_SECONDS:.0f}s")
        )
        checks["lanes"] = self._lanes_check()
        if self.pool is None:
            checks["postgres"] = "not connected yet"
        else:
            writable = False
            try:
                async with asyncio.timeout(READINESS_QUERY_SECONDS):
                    writable = await db.writable(self.pool)
                checks["postgres"] = "ok" if writable else "read-only (a standby?)"
            # A probe reports and never raises: besides the usual errors, a
            # connection cut mid-query (a timeout, a terminated backend) can leave
            # asyncpg's protocol in a state it refuses to use again.
            except Exception as err:
                checks["postgres"] = f"unreachable: {type(err).__name__}"
            if not writable:
                # Fresh connections for the next probe and command: after a failover
                # they may reach the new primary, after a cut they work again.
                await self.pool.expire_connections()
        # Seen in the database and in JetStream, so every replica answers the
        # same whichever runs the relay (docs/decisions.md, "Outbound").
        stalled = self.relay_stalled_for()
        checks["relay"] = (
            "ok"
            if stalled < self.relay_stall_seconds
            else f"stuck: {self.outbox_rows} outbound events wait and the oldest has been "
            f"neither published nor set aside for {stalled:.0f}s"
        )
        checks["out_stream"] = (
            "missing: the outbound stream does not exist (the relay recreates it when it "
            "next publishes)"
            if self.out_stream_missing
            else "ok"
        )
        return checks

    def _lanes_check(self) -> str:
        """ "ok", or which owned lanes have messages waiting and stopped advancing."""
        manager = self.lane_manager
        if manager is None:
            return "ok"
        stuck = manager.stuck(time.monotonic(), LANE_STUCK_AFTER_SECONDS)
        return (
            "; ".join(
                f"lane {s.durable} has {s.waiting} messages waiting and has not advanced "
                f"for {s.idle_seconds:.0f}s"
                for s in stuck
            )
            or "ok"
        )

    async def _sample(self, all_lanes: list[Lane], stopping: asyncio.Event) -> None:
        """Refresh the gauges that come from outside: consumer info, outbox backlog."""
        assert self.bus is not None
        assert self.pool is not None
        while not stopping.is_set():
            try:
                lane_backlog = 0  # of the lanes this worker owns, for the catch-up report
                for lane in all_lanes:
                    info = await self.bus.consumer_info(lane)
                    await self._sample_lane(lane, info)
                    if self.lane_manager is not None and lane.key in self.lane_manager.owned:
                        lane_backlog += (info.num_pending or 0) + (info.num_ack_pending or 0)
                self.consumers_seen_at = time.monotonic()
                if self.lane_manager is not None:
                    self.catch_up.sample(lane_backlog, self.lane_manager.handled)
            except NATS_ERRORS as err:
                log.warning("sample.consumers_failed", action="sample", error=str(err))
            try:
                subjects = await self.bus.out_stream_subjects()
                self.out_stream_missing = subjects is None
                self.metrics.out_stream_missing.set(1 if subjects is None else 0)
            except NATS_ERRORS as err:
                log.warning("sample.out_stream_failed", action="sample", error=str(err))
            try:
                backlog = await db.outbox_backlog(self.pool)
                oldest = backlog.oldest
                self.metrics.outbox_backlog.set(backlog.rows)
                self.metrics.outbox_oldest_age.set(
                    0 if oldest is None else max(0.0, (datetime.now(UTC) - oldest).total_seconds())
                )
                if backlog.head is None or backlog.head != self.outbox_head:
                    self.outbox_head_since = time.monotonic()
                self.outbox_head, self.outbox_rows = backlog.head, backlog.rows
                self.metrics.relay_stalled.set(self.relay_stalled_for())
            # A gauge is not worth the worker: whatever the pool's connection
            # does (see readiness), sample again next time.
            except Exception as err:
                log.warning("sample.outbox_failed", action="sample", error=repr(err))
            if self.lane_manager is not None:
                self.metrics.lanes_owned.set(len(self.lane_manager.owned))
                self.metrics.db_connections.labels("lanes").set(len(self.lane_manager.owned))
            self.metrics.db_connections.labels("commands").set(
                self.pool.get_size() - self.pool.get_idle_size()
            )
            await pause(stopping, METRICS_SAMPLE_SECONDS)

    async def _sample_lane(self, lane: Lane, info: ConsumerInfo) -> None:
        """A lane's progress and gauges, when this worker owns it (only its owner reports it)."""
        assert self.bus is not None
        manager = self.lane_manager
        progress = manager.reporting(lane.key) if manager is not None else None
        if manager is None or progress is None:
            return
        stored = await self.bus.oldest_unacked(lane, info)
        if manager.reporting(lane.key) is not progress:
            return  # handed over (or lost) meanwhile: the series are gone, leave them so
        pending, ack_pending = info.num_pending or 0, info.num_ack_pending or 0
        now = time.monotonic()
        progress.observe(
            info.ack_floor.stream_seq if info.ack_floor else 0, pending + ack_pending, now
        )
        self.metrics.report_lane(
            lane.durable,
            pending=pending,
            ack_pending=ack_pending,
            lag=age_seconds(stored),
            idle=progress.idle_seconds(now),
        )

    async def _ensure_topology(self, bus: Bus, stopping: asyncio.Event) -> int:
        # JetStream may take a moment to answer after a (re)start; then it is broken.
        backoff = Backoff(
            RECONNECT_BASE_SECONDS, RECONNECT_MAX_SECONDS, stopping=stopping, limit=30
        )
        while True:
            try:
                partitions = await bus.ensure_streams()
                for lane in lanes(self.settings.subject_prefix, partitions):
                    await bus.ensure_consumer(lane)
                return partitions
            except Exception as err:  # JetStream not ready yet, or NATS away
                bus.raise_if_unusable()
                delay = backoff.failed()
                if backoff.exhausted:
                    raise
                log.warning(
                    "streams.not_ready", action="stream.ensure", error=str(err), retry_in=delay
                )
                await backoff.sleep(delay)
